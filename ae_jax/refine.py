"""Refine: fill each person's missing joints (mmpose HeatmapParser.refine).

For person p with mean tag t_p (over its detected joints, tags read at
int(x), int(y)) and missing joint k, the new joint is the argmax over pixels
of score = heatmap_k - round(|tag_k - t_p|) in float32 (first maximum in
row-major order), with quarter-pixel offsets toward the higher neighbour;
it is used if its heatmap value is > 0.

mmpose scans all K full maps per person. Here every (person, joint) query is
answered exactly by branch and bound, vectorised over the people missing a
joint (a Python loop runs over the K joints, never over people):
1. A lower bound per query: exact scores at probe pixels (everyone's joint,
   the person's own joints, the 8 hottest tiles; 32 for people whose tag is
   rare there).
2. Spatial tiles (`grouping._Blocks`): a tile scores at most its heatmap max
   minus the rounded distance from t_p to the tile's tag range. Where that
   leaves under half a map's worth of pixels to score (tags smooth in image
   space), those tiles are scored.
3. Else tag-space cells (tags noisy pixel to pixel: random-weight networks,
   early checkpoints): the pixels hot enough for some query are binned on
   a grid over tag space (at most _CELLS non-empty cells); each cell's heat
   max and tag range give every query an upper bound and an achievable
   score. Only the cells that can reach a query's best achievable score are
   kept; their pixels are sorted by (cell, heat descending) and each query
   scores only the prefix of each kept cell hot enough to matter. This runs
   first on the pixels hot enough for half of the bounds, then on the colder
   ones only for the queries it did not settle. The cost is a few passes
   over the map plus a small search per query, whatever the tags look like
   in image space.
Both keep every pixel that can reach the best score, then take the exact
maximum and the smallest flat index among its pixels, so the result equals
a full scan. All bounds use the same float32 operations as the score (each
monotone in its inputs), so they bound it exactly.

Why numpy on the host, not a jitted scan: on the 2-core CPU (loaded) a
jitted XLA full scan measured 2.4-3.8 ms per query (one 512 x 680 map, all
queries in one call) plus ~0.1 s to put the maps on the device: more than
this search costs per joint. On an accelerator a full scan of all queries
would be the simpler choice (not measured here).

Legend: K joints, H x W map, L tag dim, P people, m people missing a joint,
C tag cells, B tile side.
"""

import jax
import numpy as np

from ae_jax import refine_scan

# Choice of method (choose_method): cost of the scan per query and map
# pass, of the search per joint, in map passes (measured on the bench maps,
# bench/RESULTS_eval.md).
_SCAN_PER_QUERY = 1.0
_SEARCH_PASSES = 8.0
# Tiles per person above which tag ranges per tile are worth computing.
_TAG_BOUND_TILES = 8
# Tiles scored at once (x 256 pixels): bounds the tile path's memory.
_CHUNK_TILES = 8192
# Take the tag-space path when the tiles left (summed over the people
# missing the joint) hold more pixels than this many full maps.
_TAG_SPACE_MAPS = 0.5
# Hottest tiles probed for people whose tag is rare in the 8 hottest.
_PROBE_TILES = 32
# Tag-space path: non-empty cells (at most), bits of the finest grid (halved
# per side until the cells fit), pixels scored at once.
_CELLS = 4096
_GRID_BITS = 16
_CHUNK_PIXELS = 1 << 21
# Percentile of the queries' bounds that splits hot and cold pixels.
_CUT_PERCENTILE = 50


def _scores(heat: np.ndarray, tag: np.ndarray,
            mean_tags: np.ndarray) -> np.ndarray:
  """heat - round(|tag - mean tag|) in float32, as mmpose's refine.

  heat [...], tag [..., L], mean_tags broadcast against tag.
  """
  total = None
  for l in range(tag.shape[-1]):
    d = tag[..., l] - mean_tags[..., l]
    total = d * d if total is None else total + d * d
  return heat - np.round(np.sqrt(total))


def _rounded_dist(gap: np.ndarray) -> np.ndarray:
  """round(|gap|) over the last axis, float32, same operations as _scores."""
  total = None
  for l in range(gap.shape[-1]):
    total = gap[..., l] * gap[..., l] if total is None else (
        total + gap[..., l] * gap[..., l])
  return np.round(np.sqrt(total))


def _first_max(score: np.ndarray, pixel: np.ndarray,
               starts: np.ndarray) -> np.ndarray:
  """Per segment of rows (starting at `starts`): smallest pixel of the max."""
  best = np.maximum.reduceat(score, starts)
  seg = np.repeat(np.arange(starts.size), np.diff(np.append(starts,
                                                            score.size)))
  big = np.iinfo(np.int64).max
  return np.minimum.reduceat(np.where(score == best[seg], pixel, big), starts)


def _argmax_tiles(heat_k, tags_k, t, need, blocks):
  """Flat argmax per query, scoring the tiles in need [m, num_blocks]."""
  big = np.iinfo(np.int64).max
  m = t.shape[0]
  flat = np.empty(m, np.int64)
  # Rows of one person are contiguous (np.nonzero order), so per-person
  # maxima are segment reductions; chunks of people bound memory.
  chunk = np.cumsum(need.sum(axis=1)) // _CHUNK_TILES
  for c in np.unique(chunk):
    sel = np.nonzero(chunk == c)[0]
    row_person, row_tile = np.nonzero(need[sel])
    pixels = blocks.pixels[row_tile]  # [rows, B*B]
    score = _scores(heat_k[pixels], tags_k[pixels],
                    t[sel][row_person][:, None])
    starts = np.searchsorted(row_person, np.arange(sel.size))
    best = np.maximum.reduceat(score.max(axis=1), starts)
    first = np.where(score == best[row_person][:, None], pixels, big)
    flat[sel] = np.minimum.reduceat(first.min(axis=1), starts)
  return flat


def _order_key(x: np.ndarray) -> np.ndarray:
  """uint32 keys of float32 values, ascending in the values."""
  u = x.astype(np.float32).view(np.uint32)
  return np.where(u >> 31 == 1, ~u, u | np.uint32(1 << 31))


def _argmax_tag_cells(heat_k, tags_k, t, lower):
  """Flat argmax per query through tag-space cells (module docstring, 3).

  heat_k [H*W], tags_k [H*W, L], t [m, L] mean tags, lower [m] exact
  achievable scores (lower bounds of each query's best).
  """
  # Pixels colder than a query's bound cannot win for it: fl(h - n) <= h.
  # First the pixels hot enough for the top half of the bounds (the cut);
  # a query is done if it found a score >= the cut there (colder pixels
  # score below it), else it searches the colder pixels too.
  cut = max(lower.min(), np.percentile(lower, _CUT_PERCENTILE))
  hot = heat_k >= cut
  flat, best = _search_cells(heat_k, tags_k, t, lower, np.flatnonzero(hot))
  rest = np.flatnonzero(best < cut)
  if rest.size:
    cold = np.flatnonzero(~hot & (heat_k >= lower[rest].min()))
    flat2, best2 = _search_cells(heat_k, tags_k, t[rest],
                                 np.maximum(lower[rest], best[rest]), cold)
    take = (best2 > best[rest]) | ((best2 == best[rest]) &
                                   (flat2 < flat[rest]))
    flat[rest[take]] = flat2[take]
  return flat


def _search_cells(heat_k, tags_k, t, lower, pix):
  """Best score and its first flat index per query among pixels `pix`.

  Queries whose best there is below `lower` get (-1, -inf).
  """
  m = t.shape[0]
  flat = np.full(m, -1, np.int64)
  best = np.full(m, -np.inf, np.float32)
  if pix.size == 0:
    return flat, best
  tag_dim = tags_k.shape[1]
  heat, cols = heat_k[pix], np.ascontiguousarray(tags_k[pix].T)  # [L, n]
  # Cells: a grid of 2^_GRID_BITS cells over the tags' range, its side
  # halved until at most _CELLS hold pixels; those are numbered 0..C-1.
  side = int(2 ** (_GRID_BITS // tag_dim))
  coords = []
  for col in cols:
    lo, hi = col.min(), col.max()
    scale = np.float32(side / max(float(hi) - float(lo), 1e-30))
    coords.append(np.minimum((col - lo) * scale,
                             np.float32(side - 1)).astype(np.int32))
  while True:
    cell = coords[0].copy()
    for c in coords[1:]:
      cell *= side
      cell += c
    counts = np.bincount(cell, minlength=side ** tag_dim)
    if side == 1 or np.count_nonzero(counts) <= _CELLS:
      break
    side //= 2
    coords = [c >> 1 for c in coords]
  slot = np.cumsum(counts > 0, dtype=np.int32) - 1
  num_cells = int(slot[-1]) + 1
  cell = slot[cell]
  # Per cell the exact heat max and tag range.
  cmax = np.full(num_cells, -np.inf, np.float32)
  np.maximum.at(cmax, cell, heat)
  tmin = np.full((tag_dim, num_cells), np.inf, np.float32)
  tmax = np.full((tag_dim, num_cells), -np.inf, np.float32)
  for l in range(tag_dim):
    np.minimum.at(tmin[l], cell, cols[l])
    np.maximum.at(tmax[l], cell, cols[l])
  # Bounds per (query, cell), float32 as in _scores: the nearest distance
  # to the cell's tag range, and (triangle inequality) that plus the
  # range's diagonal, rounded up with a margin for float32 rounding.
  near, diag = None, None
  for l in range(tag_dim):
    gap = np.maximum(np.maximum(tmin[l][None] - t[:, l:l + 1],
                                t[:, l:l + 1] - tmax[l][None]), 0)  # [m, C]
    near = gap * gap if near is None else near + gap * gap
    span = tmax[l] - tmin[l]
    diag = span * span if diag is None else diag + span * span
  near = np.sqrt(near)
  n_lo = np.round(near)
  upper = cmax[None] - n_lo
  n_hi = np.floor(near + (np.sqrt(diag) + np.float32(0.5 + 1e-3))[None])
  lower = np.maximum(lower, (cmax[None] - n_hi).max(axis=1))
  q_idx, c_idx = np.nonzero(upper >= lower[:, None])  # query-major
  # Only the chosen cells' pixels, sorted once by packed keys: cell, heat
  # descending (its top bits: an order of a superset is enough), position.
  chosen = np.zeros(num_cells, bool)
  chosen[c_idx] = True
  sub = np.flatnonzero(chosen[cell])
  pix_bits = max(1, int(sub.size).bit_length())
  cell_bits = max(1, int(num_cells - 1).bit_length())
  heat_bits = min(32, 64 - pix_bits - cell_bits)
  shift = np.uint32(32 - heat_bits)
  cell_shift = np.uint64(heat_bits + pix_bits)
  key = cell[sub].astype(np.uint64) << cell_shift
  key |= (~_order_key(heat[sub]) >> shift).astype(np.uint64) << np.uint64(
      pix_bits)
  key |= np.arange(sub.size, dtype=np.uint64)
  key.sort()
  at = sub[(key & np.uint64((1 << pix_bits) - 1)).astype(np.int64)]
  # Prefix of each chosen cell hot enough for the query: h >= lower + n_lo
  # (less a margin for float32 rounding), found on the keys.
  thr = lower[q_idx].astype(np.float64) + n_lo[q_idx, c_idx]
  thr = (thr - 1e-5 * (1 + np.abs(thr))).astype(np.float32)
  probe = c_idx.astype(np.uint64) << cell_shift
  begin = np.searchsorted(key, probe)
  probe |= (~_order_key(thr) >> shift).astype(np.uint64) << np.uint64(
      pix_bits)
  probe |= np.uint64((1 << pix_bits) - 1)
  length = np.searchsorted(key, probe, side='right') - begin
  # Score the prefixes, in chunks of whole queries.
  per_query = np.bincount(q_idx, weights=length, minlength=m)
  chunk = np.cumsum(per_query).astype(np.int64) // _CHUNK_PIXELS
  for c in np.unique(chunk[per_query > 0]):
    sel = (chunk[q_idx] == c) & (length > 0)
    b, ln, q = begin[sel], length[sel], q_idx[sel]
    offs = np.cumsum(ln) - ln
    idx = at[np.repeat(b - offs, ln) + np.arange(ln.sum())]
    row_q = np.repeat(q, ln)
    score = _scores(heat[idx], cols[:, idx].T, t[row_q])
    seg = np.flatnonzero(np.diff(row_q, prepend=-1))
    flat[row_q[seg]] = _first_max(score, pix[idx], seg)
    best[row_q[seg]] = np.maximum.reduceat(score, seg)
  return flat, best


def mean_tags(own_tags: np.ndarray, detected: np.ndarray) -> np.ndarray:
  """np.mean of each person's detected joints' tags, as mmpose (float32).

  own_tags [P, K, L] (tags at each joint's int position), detected [P, K].
  """
  return np.stack([np.mean(own_tags[p][detected[p]], axis=0)
                   for p in range(own_tags.shape[0])]).astype(np.float32)


def fill_joints(poses: np.ndarray, persons: np.ndarray, joints: np.ndarray,
                flat: np.ndarray, heat5: np.ndarray, width: int) -> np.ndarray:
  """Writes refine's answers into a copy of poses [P, K, 3 + L].

  persons, joints, flat [Q]: query q's argmax flat index y * W + x; heat5
  [Q, 5] heat at (y, x), (y, x+1), (y, x-1), (y+1, x), (y-1, x), border
  clipped. Quarter offsets toward the higher neighbour; only values > 0.
  """
  poses = poses.copy()
  yy, xx = flat // width, flat % width
  x = xx + 0.5 + np.where(heat5[:, 1] > heat5[:, 2], 0.25, -0.25)
  y = yy + 0.5 + np.where(heat5[:, 3] > heat5[:, 4], 0.25, -0.25)
  val = heat5[:, 0]
  fill = val > 0
  p, k = persons[fill], joints[fill]
  poses[p, k, 0], poses[p, k, 1], poses[p, k, 2] = x[fill], y[fill], val[fill]
  return poses


def heat_around(heatmaps: np.ndarray, joints: np.ndarray,
                flat: np.ndarray) -> np.ndarray:
  """[Q, 5] heat at and around each flat index (fill_joints' heat5)."""
  _, height, width = heatmaps.shape
  y, x = flat // width, flat % width
  return np.stack([
      heatmaps[joints, y, x], heatmaps[joints, y, np.minimum(width - 1, x + 1)],
      heatmaps[joints, y, np.maximum(0, x - 1)],
      heatmaps[joints, np.minimum(height - 1, y + 1), x],
      heatmaps[joints, np.maximum(0, y - 1), x]], -1)


def search_argmax(heatmaps: np.ndarray, tags: np.ndarray, blocks,
                  block_max: np.ndarray, own_flat: np.ndarray,
                  detected: np.ndarray, persons: np.ndarray,
                  joints: np.ndarray, means: np.ndarray) -> np.ndarray:
  """Flat argmax [Q] of each query by branch and bound (module docstring).

  heatmaps [K, H, W], tags [K, H, W, L] on the host (only the queries'
  joints are read), blocks / block_max [K, num_blocks] their tiling,
  own_flat / detected [P, K] the people's joint pixels, queries (persons,
  joints, means [Q, L]).
  """
  num_joints = heatmaps.shape[0]
  tag_dim = tags.shape[-1]
  flat_heat = heatmaps.reshape(num_joints, -1)
  flat_tags = tags.reshape(num_joints, -1, tag_dim)
  out = np.empty(joints.size, np.int64)
  for k in np.unique(joints):
    sel = np.flatnonzero(joints == k)
    m = sel.size
    t = means[sel]  # [m, L]
    heat_k, tags_k, bmax = flat_heat[k], flat_tags[k], block_max[k]
    # Lower bound per person from a few exact scores: everyone's joint k and
    # the person's own joints (tags there are likely close to its mean).
    # (Undetected own joints sit at pixel 0: any pixel gives a valid bound.)
    shared = own_flat[detected[:, k], k]
    probe = np.concatenate(
        [np.broadcast_to(shared, (m, shared.size)), own_flat[persons[sel]]], 1)
    lower = _scores(heat_k[probe], tags_k[probe], t[:, None]).max(axis=1)
    # Then the hottest tiles: 8 for everyone, 64 for people still below the
    # 8th tile's max (their tag is rare among the hottest pixels).
    order = np.argsort(-bmax, kind='stable')
    for num_tiles, pick in ((8, np.arange(m)), (_PROBE_TILES, None)):
      top = order[:num_tiles]
      if pick is None:
        pick = np.flatnonzero(lower < bmax[order[min(7, order.size - 1)]])
      if pick.size and num_tiles:
        pixels = blocks.pixels[top].ravel()
        lower[pick] = np.maximum(lower[pick], _scores(
            heat_k[pixels], tags_k[pixels], t[pick][:, None]).max(axis=1))
    # Tiles that may hold a pixel >= lower (so every maximiser) per person.
    need = bmax[None] >= lower[:, None]  # [m, num_blocks]
    if need.sum() > _TAG_BOUND_TILES * m:
      tag_min = blocks.reduce(tags[k], np.minimum, axis=0)  # [num_blocks, L]
      tag_max = blocks.reduce(tags[k], np.maximum, axis=0)
      gap = np.maximum(np.maximum(tag_min[None] - t[:, None],
                                  t[:, None] - tag_max[None]), 0)
      need = bmax[None] - _rounded_dist(gap) >= lower[:, None]
    tile_pixels = need.sum() * blocks.block ** 2
    if tile_pixels > _TAG_SPACE_MAPS * heat_k.size:
      out[sel] = _argmax_tag_cells(heat_k, tags_k, t, lower)
    else:
      out[sel] = _argmax_tiles(heat_k, tags_k, t, need, blocks)
  return out


def choose_method(heatmaps, joints: np.ndarray) -> str:
  """'scan' or 'search' for these maps and query joints [Q] (module doc).

  Maps on an accelerator: always the scan (the search needs them on the
  host). On the host (numpy or XLA:CPU arrays), in units of one query's
  scan of one map: the scan scores every queried joint's map for
  max(queries per joint) rounded up to chunks (refine_scan.chunk_size);
  the search costs about _SEARCH_PASSES per queried joint. The cheaper
  estimate wins.
  """
  if isinstance(heatmaps, jax.Array) and any(
      d.platform != 'cpu' for d in heatmaps.devices()):
    return 'scan'
  counts = np.bincount(joints)
  counts = counts[counts > 0]
  # The scan passes over every queried joint's map max(counts) / C times.
  chunk = refine_scan.chunk_size(int(counts.max()))
  scan = counts.size * -(-counts.max() // chunk) * chunk * _SCAN_PER_QUERY
  search = counts.size * _SEARCH_PASSES
  return 'scan' if scan <= search else 'search'


def refine_poses(poses: np.ndarray, heatmaps, tags, *,
                 own_tags: np.ndarray | None = None, blocks=None,
                 block_max: np.ndarray | None = None,
                 method: str = 'auto',
                 stats: dict | None = None) -> np.ndarray:
  """Fills missing joints (module docstring); returns new poses.

  Args:
    poses: [P, K, 3 + L] after adjust.
    heatmaps: [K, H, W] float32, numpy or a jax array on its device.
    tags: [K, H, W, L] float32, alike.
    own_tags: [P, K, L] tags at the people's joints (int x, int y); read
      from the maps when None (host maps only).
    blocks, block_max: grouping._Blocks tiling and [K, num_blocks] tile
      maxima of heatmaps, for the search (computed when None).
    method: 'scan', 'search' or 'auto' (choose_method).
    stats: if given, 'bytes_to_host' grows by the scan's results.
  """
  if method not in ('auto', 'scan', 'search'):
    raise ValueError(f"refine method must be 'auto', 'scan' or 'search', "
                     f'got {method!r}')
  num_people = poses.shape[0]
  if num_people == 0:
    return poses.copy()
  num_joints, height, width = heatmaps.shape
  detected = poses[:, :, 2] > 0
  persons, joints = np.nonzero(~detected)
  if persons.size == 0:
    return poses.copy()
  xs = np.clip(poses[:, :, 0].astype(np.int64), 0, width - 1)
  ys = np.clip(poses[:, :, 1].astype(np.int64), 0, height - 1)
  if own_tags is None:
    own_tags = np.asarray(tags)[np.arange(num_joints)[None], ys, xs]
  means = mean_tags(own_tags, detected)[persons]  # [Q, L]
  if method == 'auto':
    method = choose_method(heatmaps, joints)
  if method == 'scan':
    if isinstance(heatmaps, jax.Array):
      out = refine_scan.argmax_queries(heatmaps, tags, joints, means,
                                       stats=stats)
    else:  # host maps: only the pixels that can win
      out = refine_scan.argmax_queries_host(heatmaps, tags, joints, means)
    flat, heat5 = out['flat'], out['heat']
  else:
    heatmaps, tags = np.asarray(heatmaps), np.asarray(tags)
    if blocks is None:
      from ae_jax import grouping  # pylint: disable=g-import-not-at-top
      blocks = grouping._Blocks(height, width)  # pylint: disable=protected-access
    if block_max is None:
      block_max = np.zeros((num_joints, blocks.num), np.float32)
      need = np.unique(joints)
      block_max[need] = blocks.reduce(heatmaps[need], np.maximum, axis=1)
    flat = search_argmax(heatmaps, tags, blocks, block_max, ys * width + xs,
                         detected, persons, joints, means)
    heat5 = heat_around(heatmaps, joints, flat)
  return fill_joints(poses, persons, joints, flat, heat5, width)

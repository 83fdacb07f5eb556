"""Refine's argmax as one jitted scan over all (person, missing joint) pairs.

For query q = (joint k, mean tag t_q) the answer is mmpose's
  argmax over pixels of  heat_k - round(sqrt(sum_l (tag_k[l] - t_q[l])^2))
in float32 (numpy's operation order, round half to even), the first
maximum in row-major order; with the heat at that pixel and at its 4
neighbours (for refine's quarter offsets). The maps stay on their device;
only the queries and [Q] / [Q, 5] results cross.

Exactness: XLA:CPU (and GPU) contract a * a + b * b into an FMA, which
rounds differently from numpy; each square passes through an integer OR
with a runtime zero (`zero`) that no compiler can see through, so squares
and sums round as in numpy. max is exact in any order; the first index is
found by recomputing one row group (below), so ties follow numpy's argmax.

Layout: the queries in slots per joint, [J, S]; one pass scores chunk C
of every joint's slots over its whole map (a fori_loop runs over the
max(queries per joint) / C passes: no Python loop over people or joints,
one compile per padded shape). The map's rows in groups of _ROWS: a tree
of elementwise maxima over each group's rows (XLA:CPU vectorises
elementwise fusions well and fused reductions poorly) gives per-group
column maxima [J, G, C, W], reduced to the max; the first group holding it
is rescored in full to find the first pixel. Memory: O(J x C x H x W /
_ROWS) whatever the number of people.

Host maps (argmax_queries_host): numpy maps are scanned by XLA:CPU from a
reused aligned buffer (no device_put copy, no fresh pages), and only over
the pixels hot enough to win: exact sampled scores bound each query's best
from below, and colder pixels cannot reach it (score <= heat). Calls of at
most _NUMPY_WORK query-pixels run the numpy formula instead (no compile).

Legend: K joints, J joints scanned, H x W map, L tag dim, Q queries,
S slots per joint, C queries per chunk, G row groups.
"""

import functools
import threading
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

# Rows per group of the first tree; queries scored per pass over a map (4
# and 8 measured alike per query; 4 pads less).
_ROWS = 8
CHUNK = 4
# argmax_queries_host: step of the sampled pixels, width of the rows of hot
# pixels, fraction of a map above which the full map is scanned instead,
# percentile of the sampled scores left out of the cut.
_SAMPLE_STEP = 61
_HOT_WIDTH = 256
_HOT_FRACTION = 0.5
_LOW_PERCENTILE = 10
# Query-pixels up to which argmax_queries_host scans in numpy (~5 ms).
_NUMPY_WORK = 1 << 20


def _tree(fn, xs):
  """fn-reduction of a list of arrays as a balanced tree."""
  while len(xs) > 1:
    xs = [fn(xs[i], xs[i + 1]) if i + 1 < len(xs) else xs[i]
          for i in range(0, len(xs), 2)]
  return xs[0]


def _score(heat, tags, mean, zero):
  """heat - round(|tags - mean|), numpy's float32 operations.

  heat [...], tags: L arrays [...], mean [L] broadcastable, zero int32 0.
  """
  total = None
  for l, tag in enumerate(tags):
    d = tag - mean[l]
    sq = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(d * d, jnp.int32) | zero, jnp.float32)
    total = sq if total is None else total + sq
  return heat - jnp.round(jnp.sqrt(total))


def _chunk_argmax(heat, tags, means, zero):
  """First flat argmax per query.

  heat [J, H, W], tags: L arrays [J, H, W], means [J, C, L] -> [J, C] int32.
  """
  height, width = heat.shape[1:]
  rows = min(_ROWS, height)
  groups, tail = divmod(height, rows)
  mean = [means[:, None, :, l, None] for l in range(means.shape[2])]

  def group_max(start, num):  # [J, num, C, W]: max over `rows` rows
    sl = lambda x, r: x[:, start + r:start + num * rows:rows, None]
    return _tree(jnp.maximum, [
        _score(sl(heat, r), [sl(t, r) for t in tags], mean, zero)
        for r in range(rows)])

  per_group = group_max(0, groups)
  if tail:  # the last `rows` rows as one more group (overlap is harmless)
    per_group = jnp.concatenate([per_group, group_max(height - rows, 1)], 1)
  best = per_group.max(axis=(1, 3))  # [J, C]
  first = jnp.argmax((per_group == best[:, None, :, None]).any(axis=3),
                     axis=1)  # [J, C] first group holding the max
  # Rows of that group (the tail group ends at the last row); earlier rows
  # hold no maximum, so the first maximum among them is the answer.
  start = jnp.minimum(first * rows, height - rows).astype(jnp.int32)

  def window(j, m, s, b):
    pick = lambda x: jax.lax.dynamic_slice(x, (j, s, 0), (1, rows, width))
    hit = (_score(pick(heat), [pick(t) for t in tags], m, zero) == b)
    hit = hit.reshape(-1)
    index = jnp.arange(hit.size, dtype=jnp.int32)
    return s * width + jnp.min(jnp.where(hit, index, hit.size))

  num_j, num_c = means.shape[:2]
  j = jnp.broadcast_to(jnp.arange(num_j, dtype=jnp.int32)[:, None],
                       (num_j, num_c))
  return jax.vmap(window)(j.reshape(-1), means.reshape(num_j * num_c, -1),
                          start.reshape(-1), best.reshape(-1)).reshape(
                              num_j, num_c)


@functools.partial(jax.jit, static_argnames=('chunk',))
def _scan(heat, tags, means, num_chunks, zero, *, chunk):
  """Per joint and slot: flat argmax [J, S] int32, heat there [J, S, 5].

  heat [J, H, W], tags [J, H, W, L], means [J, S, L] (S a multiple of
  chunk); slots of chunks >= num_chunks are left 0.
  """
  num_j, height, width = heat.shape
  tag_planes = [tags[..., l] for l in range(tags.shape[-1])]

  def body(c, flat):
    m = jax.lax.dynamic_slice_in_dim(means, c * chunk, chunk, 1)
    return jax.lax.dynamic_update_slice_in_dim(
        flat, _chunk_argmax(heat, tag_planes, m, zero), c * chunk, 1)

  flat = jax.lax.fori_loop(0, num_chunks, body,
                           jnp.zeros(means.shape[:2], jnp.int32))
  y, x = flat // width, flat % width
  hk = heat.reshape(num_j, 1, -1)

  def at(yy, xx):
    return jnp.take_along_axis(hk, (yy * width + xx)[:, :, None], 2)[..., 0]

  vals = jnp.stack([
      at(y, x), at(y, jnp.minimum(width - 1, x + 1)),
      at(y, jnp.maximum(0, x - 1)), at(jnp.minimum(height - 1, y + 1), x),
      at(jnp.maximum(0, y - 1), x)], -1)
  return flat, vals


_BUFFERS = threading.local()


def _buffer(name: str, shape) -> np.ndarray:
  """A float32 view of this thread's reused 64-byte aligned buffer `name`."""
  nbytes = int(np.prod(shape)) * 4
  buf = getattr(_BUFFERS, name, None)
  if buf is None or buf.nbytes < nbytes + 64:
    buf = np.empty(nbytes + 64, np.uint8)
    setattr(_BUFFERS, name, buf)
  start = (-buf.ctypes.data) % 64
  return buf[start:start + nbytes].view(np.float32).reshape(shape)


def _to_device(x, rows: np.ndarray | None, name: str):
  """x[rows] (all of x if rows is None) as a jax array on its device.

  A numpy x is copied into a reused 64-byte aligned buffer of this thread
  (unless x is aligned and whole), which XLA:CPU then reads without a copy
  and without fresh pages: much cheaper than device_put's copy.
  """
  if isinstance(x, jax.Array):
    return x if rows is None else x[rows]
  x = np.asarray(x, np.float32)
  if rows is None and x.flags.c_contiguous and x.ctypes.data % 64 == 0:
    return jax.device_put(x)
  view = _buffer(name, x.shape if rows is None else
                 (rows.size,) + x.shape[1:])
  if rows is None:
    np.copyto(view, x)
  else:
    np.take(x, rows, axis=0, out=view)
  return jax.device_put(view)


def numpy_scores(heat: np.ndarray, tag: np.ndarray,
                 mean_tags: np.ndarray) -> np.ndarray:
  """heat - round(|tag - mean tag|) in numpy float32, as mmpose's refine.

  heat [...], tag [..., L], mean_tags broadcast against tag.
  """
  total = None
  for l in range(tag.shape[-1]):
    d = tag[..., l] - mean_tags[..., l]
    total = d * d if total is None else total + d * d
  return heat - np.round(np.sqrt(total))


def heat_around(heatmaps: np.ndarray, joints: np.ndarray,
                flat: np.ndarray) -> np.ndarray:
  """[Q, 5] host heat at and around flat indices, as argmax_queries'."""
  _, height, width = heatmaps.shape
  y, x = flat // width, flat % width
  return np.stack([
      heatmaps[joints, y, x], heatmaps[joints, y, np.minimum(width - 1, x + 1)],
      heatmaps[joints, y, np.maximum(0, x - 1)],
      heatmaps[joints, np.minimum(height - 1, y + 1), x],
      heatmaps[joints, np.maximum(0, y - 1), x]], -1)


def argmax_queries_host(heat: np.ndarray, tags: np.ndarray,
                        joint: np.ndarray, mean_tags: np.ndarray
                        ) -> Dict[str, np.ndarray]:
  """argmax_queries for numpy maps, scanning only pixels that can win.

  Scans of at most _NUMPY_WORK query-pixels run in numpy (the formula
  itself; a compile would cost more). Exact scores at every _SAMPLE_STEP-th pixel give each query an
  achievable score; a pixel colder than its query's best cannot win (its
  score <= its heat). Per joint a cut is the lowest such score of its
  queries (less the lowest _LOW_PERCENTILE of all, whose samples were
  unlucky); the pixels at least that hot are gathered in flat order (so
  first-index ties are kept) and scanned for all queries. A query whose
  best there is >= the cut is done (colder pixels score below it); the
  rest scan the full maps. On maps of flat heat (random-weight networks)
  a few % of the pixels are that hot. Falls back to the full scan where
  over _HOT_FRACTION of a map is.
  """
  joint = np.asarray(joint, np.int64)
  mean_tags = np.asarray(mean_tags, np.float32)
  num_joints = heat.shape[0]
  tag_dim = tags.shape[-1]
  flat_heat = heat.reshape(num_joints, -1)
  flat_tags = tags.reshape(num_joints, -1, tag_dim)
  active, slot_joint = np.unique(joint, return_inverse=True)

  def scan(heat, tags, joint, mean_tags):  # small: numpy, beats a compile
    if joint.size * heat[0].size > _NUMPY_WORK:
      return argmax_queries(heat, tags, joint, mean_tags)['flat']
    flat = np.empty(joint.size, np.int64)
    for k in np.unique(joint):
      sel = joint == k
      flat[sel] = np.argmax(numpy_scores(
          heat[k].reshape(1, -1), tags[k].reshape(1, -1, tag_dim),
          mean_tags[sel][:, None]), axis=1)
    return flat

  full_scan = functools.partial(scan, heat, tags)
  if joint.size * flat_heat.shape[1] <= _NUMPY_WORK:
    flat = full_scan(joint, mean_tags)
    return {'flat': flat, 'heat': heat_around(heat, joint, flat)}
  sample = np.arange(0, flat_heat.shape[1], _SAMPLE_STEP)
  lower = np.empty(joint.size, np.float32)
  for j, k in enumerate(active):
    sel = slot_joint == j
    lower[sel] = numpy_scores(flat_heat[k, sample][None],
                              flat_tags[k, sample][None],
                              mean_tags[sel][:, None]).max(axis=1)
  good = lower >= np.percentile(lower, _LOW_PERCENTILE)
  cut = np.full(active.size, np.inf, np.float32)
  np.minimum.at(cut, slot_joint[good], lower[good])
  cut = np.where(np.isinf(cut), -np.inf, cut)  # joints of only low queries
  hot = [np.flatnonzero(flat_heat[k] >= c) for k, c in zip(active, cut)]
  most = max(h.size for h in hot)
  if most > _HOT_FRACTION * flat_heat.shape[1]:
    flat = full_scan(joint, mean_tags)
    return {'flat': flat, 'heat': heat_around(heat, joint, flat)}
  # Hot pixels as rows of _HOT_WIDTH, their count padded to a power of 2
  # (few shapes compile) with -inf heat, which never wins.
  rows = 1 << (-(-most // _HOT_WIDTH) - 1).bit_length()
  size = rows * _HOT_WIDTH
  hot_heat = _buffer('hot_heat', (active.size, size))
  hot_tags = _buffer('hot_tags', (active.size, size, tag_dim))
  index = np.zeros((active.size, size), np.int64)
  for j, (k, h) in enumerate(zip(active, hot)):
    np.take(flat_heat[k], h, out=hot_heat[j, :h.size])
    np.take(flat_tags[k], h, axis=0, out=hot_tags[j, :h.size])
    hot_heat[j, h.size:], hot_tags[j, h.size:] = -np.inf, 0
    index[j, :h.size] = h
  shape = (active.size, rows, _HOT_WIDTH)
  if slot_joint.size * size > _NUMPY_WORK:  # XLA:CPU reads the buffers
    pos = argmax_queries(jax.device_put(hot_heat.reshape(shape)),
                         jax.device_put(hot_tags.reshape(shape + (tag_dim,))),
                         slot_joint, mean_tags)['flat']
  else:
    pos = scan(hot_heat.reshape(shape), hot_tags.reshape(
        shape + (tag_dim,)), slot_joint, mean_tags)
  flat = index[slot_joint, pos]
  best = numpy_scores(flat_heat[joint, flat], flat_tags[joint, flat],
                      mean_tags)
  rest = np.flatnonzero(best < cut[slot_joint])
  if rest.size:
    flat[rest] = full_scan(joint[rest], mean_tags[rest])
  return {'flat': flat, 'heat': heat_around(heat, joint, flat)}


def argmax_queries(heat, tags, joint: np.ndarray, mean_tags: np.ndarray,
                   chunk: int | None = None,
                   stats: Dict[str, int] | None = None
                   ) -> Dict[str, np.ndarray]:
  """Refine's argmax for queries (joint [Q], mean_tags [Q, L]), any order.

  Args:
    heat: [K, H, W] float32 maps (jax array on its device, or numpy).
    tags: [K, H, W, L] float32.
    joint: [Q] joint index of each query.
    mean_tags: [Q, L] float32 mean tag of the query's person.
    chunk: queries per map pass (default CHUNK).
    stats: if given, 'bytes_to_host' grows by the bytes of the results.

  Returns:
    numpy 'flat' [Q] int64 first argmax y * W + x and 'heat' [Q, 5]
    float32 heat at (y, x), (y, x+1), (y, x-1), (y+1, x), (y-1, x), border
    clipped.
  """
  joint = np.asarray(joint, np.int64)
  mean_tags = np.asarray(mean_tags, np.float32)
  num = joint.size
  active, slot_joint = np.unique(joint, return_inverse=True)
  # Slot of each query among its joint's queries, in query order.
  order = np.argsort(slot_joint, kind='stable')
  counts = np.bincount(slot_joint, minlength=active.size)
  slot = np.empty(num, np.int64)
  slot[order] = np.arange(num) - np.repeat(np.cumsum(counts) - counts,
                                           counts)
  chunk = chunk or CHUNK
  num_chunks = -(-int(counts.max(initial=0)) // chunk)
  # Slots padded to a power of 2 chunks, so that few shapes compile.
  slots = chunk * (1 << max(0, num_chunks - 1).bit_length())
  means = np.zeros((active.size, slots, mean_tags.shape[1]), np.float32)
  means[slot_joint, slot] = mean_tags
  if active.size <= heat.shape[0] // 2:  # scan only joints with queries
    # (their number padded to a power of 2 by repeats: few shapes compile)
    rows = np.resize(active, 1 << (active.size - 1).bit_length())
    means = np.concatenate([means, np.zeros(
        (rows.size - active.size,) + means.shape[1:], np.float32)])
  else:  # all joints, slots of those without queries left empty
    rows = None
    full = np.zeros((heat.shape[0],) + means.shape[1:], np.float32)
    full[active] = means
    means, slot_joint = full, active[slot_joint]
  # (The buffers are reused by this thread's next call: the results are
  # fetched, and the arrays that alias them dropped, before it.)
  heat, tags = _to_device(heat, rows, 'heat'), _to_device(tags, rows, 'tags')
  flat, vals = jax.device_get(_scan(heat, tags, means, np.int32(num_chunks),
                                    np.int32(0), chunk=chunk))
  del heat, tags
  if stats is not None:
    stats['bytes_to_host'] = (stats.get('bytes_to_host', 0) + flat.nbytes +
                              vals.nbytes)
  return {'flat': flat[slot_joint, slot].astype(np.int64),
          'heat': vals[slot_joint, slot]}

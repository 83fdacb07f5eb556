"""Refine: fill each person's missing joints (mmpose HeatmapParser.refine).

numpy only. For person p with mean tag t_p (np.mean over its detected
joints' own tags) and missing joint k, the new joint is the first argmax
over pixels of score = heatmap_k - round(|tag_k - t_p|) in float32
(row-major order), with quarter-pixel offsets toward the higher neighbour;
it is used if its heat is > 0.

All (person, missing joint) queries of an image go to one ArgmaxFn at once:
`host_argmax` over numpy maps (only the pixels that can win are scanned,
below), or the JAX side's jitted scan over maps that stay on the device
(refine_scan.argmax_queries). Both equal a full numpy scan.

Legend: K joints, J joints scanned, H x W map, L tag dim, P people,
Q (person, missing joint) queries.
"""

import functools
import threading
from typing import Callable, NamedTuple

import numpy as np

# argmax_queries_host: query-pixels up to which a scan runs in numpy (the
# formula; a compiled scan costs more to start); step of the sampled
# pixels, width of the rows of hot pixels, fraction of a map above which the
# full map is scanned instead, percentile of the sampled scores left out of
# the cut.
_NUMPY_WORK = 1 << 20
_SAMPLE_STEP = 61
_HOT_WIDTH = 256
_HOT_FRACTION = 0.5
_LOW_PERCENTILE = 10
_BUFFERS = threading.local()


class Argmax(NamedTuple):
  """Refine's answers to Q queries.

  flat [Q] int64 first argmax y * W + x of the query's score map; heat
  [Q, 5] float32 heat at (y, x), (y, x+1), (y, x-1), (y+1, x), (y-1, x),
  border clipped.
  """
  flat: np.ndarray
  heat: np.ndarray


# (joints [Q], mean_tags [Q, L]) -> Argmax, over one image's maps.
ArgmaxFn = Callable[[np.ndarray, np.ndarray], Argmax]
# A full scan (heat [J, H, W], tags [J, H, W, L], joints [Q], means [Q, L])
# -> first flat argmax [Q], e.g. the jitted refine_scan.scan_flat.
ScanFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                  np.ndarray]


def mean_tags(own_tags: np.ndarray, detected: np.ndarray) -> np.ndarray:
  """np.mean of each person's detected joints' tags, as mmpose (float32).

  own_tags [P, K, L] (tags at each joint's int position), detected [P, K].
  """
  return np.stack([np.mean(own_tags[p][detected[p]], axis=0)
                   for p in range(own_tags.shape[0])]).astype(np.float32)


def fill_joints(rows: np.ndarray, persons: np.ndarray, joints: np.ndarray,
                answers: Argmax, width: int) -> np.ndarray:
  """Writes refine's answers into a copy of rows [P, K, 3 + L].

  Query q is (persons[q], joints[q]); quarter offsets toward the higher
  neighbour; only answers whose heat is > 0 are written.
  """
  rows = rows.copy()
  flat, heat5 = answers.flat, answers.heat
  yy, xx = flat // width, flat % width
  x = xx + 0.5 + np.where(heat5[:, 1] > heat5[:, 2], 0.25, -0.25)
  y = yy + 0.5 + np.where(heat5[:, 3] > heat5[:, 4], 0.25, -0.25)
  val = heat5[:, 0]
  fill = val > 0
  p, k = persons[fill], joints[fill]
  rows[p, k, 0], rows[p, k, 1], rows[p, k, 2] = x[fill], y[fill], val[fill]
  return rows


def refine(rows: np.ndarray, argmax: ArgmaxFn, width: int) -> np.ndarray:
  """Fills each person's missing joints (mmpose HeatmapParser.refine).

  For person p with mean tag t_p (over its detected joints' own tags) and
  missing joint k, the new joint is the first argmax over pixels of
  heatmap_k - round(|tag_k - t_p|) in float32, with quarter offsets; it is
  used if its heat is > 0. All queries go to `argmax` at once.

  Args:
    rows: [P, K, 3 + L] after adjust; the tags are the candidates' own
      (mmpose reads the tag maps at int(x), int(y): the same pixels).
    argmax: answers the queries over the image's maps.
    width: W of the maps.

  Returns:
    New rows.
  """
  detected = rows[:, :, 2] > 0
  persons, joints = np.nonzero(~detected)
  if persons.size == 0:
    return rows.copy()
  means = mean_tags(rows[:, :, 3:], detected)[persons]  # [Q, L]
  return fill_joints(rows, persons, joints, argmax(joints, means), width)


def numpy_scores(heat: np.ndarray, tag: np.ndarray,
                 means: np.ndarray) -> np.ndarray:
  """heat - round(|tag - mean tag|) in numpy float32, as mmpose's refine.

  heat [...], tag [..., L], means broadcast against tag.
  """
  total = None
  for l in range(tag.shape[-1]):
    d = tag[..., l] - means[..., l]
    total = d * d if total is None else total + d * d
  return heat - np.round(np.sqrt(total))


def heat_around(heat: np.ndarray, joints: np.ndarray,
                flat: np.ndarray) -> np.ndarray:
  """[Q, 5] heat of maps [K, H, W] at and around flat indices (Argmax)."""
  _, height, width = heat.shape
  y, x = flat // width, flat % width
  return np.stack([
      heat[joints, y, x], heat[joints, y, np.minimum(width - 1, x + 1)],
      heat[joints, y, np.maximum(0, x - 1)],
      heat[joints, np.minimum(height - 1, y + 1), x],
      heat[joints, np.maximum(0, y - 1), x]], -1)


def numpy_argmax(heat: np.ndarray, tags: np.ndarray, joints: np.ndarray,
                 means: np.ndarray) -> np.ndarray:
  """First flat argmax [Q] of numpy_scores per query, in numpy.

  heat [J, H, W], tags [J, H, W, L]; queries joints [Q], means [Q, L];
  scored in blocks of at most _NUMPY_WORK query-pixels.
  """
  flat = np.empty(joints.size, np.int64)
  pixels = heat[0].size
  step = max(1, _NUMPY_WORK // max(pixels, 1))
  for k in np.unique(joints):
    sel = np.flatnonzero(joints == k)
    heat_k = heat[k].reshape(1, -1)
    tags_k = tags[k].reshape(1, pixels, -1)
    for i in range(0, sel.size, step):
      q = sel[i:i + step]
      flat[q] = np.argmax(numpy_scores(heat_k, tags_k, means[q][:, None]),
                          axis=1)
  return flat


def aligned_buffer(name: str, shape) -> np.ndarray:
  """A float32 view of this thread's reused 64-byte aligned buffer `name`.

  (An aligned array is what XLA:CPU reads without a copy.)
  """
  nbytes = int(np.prod(shape)) * 4
  buf = getattr(_BUFFERS, name, None)
  if buf is None or buf.nbytes < nbytes + 64:
    buf = np.empty(nbytes + 64, np.uint8)
    setattr(_BUFFERS, name, buf)
  start = (-buf.ctypes.data) % 64
  return buf[start:start + nbytes].view(np.float32).reshape(shape)


def argmax_queries_host(heat: np.ndarray, tags: np.ndarray,
                        joints: np.ndarray, means: np.ndarray,
                        scan: ScanFn | None = None) -> Argmax:
  """Refine's argmax over numpy maps, scanning only pixels that can win.

  Exact scores at every _SAMPLE_STEP-th pixel give each query an achievable
  score; a pixel colder than its query's best cannot win (its score <= its
  heat). Per joint a cut is the lowest such score of its queries (less the
  lowest _LOW_PERCENTILE of all, whose samples were unlucky); the pixels at
  least that hot are gathered in flat order (so first-index ties are kept)
  and scanned for all queries. A query whose best there is >= the cut is
  done (colder pixels score below it); the rest scan the full maps. Falls
  back to the full scan where over _HOT_FRACTION of a map is that hot.

  Args:
    heat: [K, H, W] float32 maps of one image.
    tags: [K, H, W, L] float32.
    joints: [Q] joint of each query.
    means: [Q, L] float32 mean tag of the query's person.
    scan: runs scans of more than _NUMPY_WORK query-pixels (e.g. a
      compiled one); default numpy_argmax. It may read the (aligned,
      reused) buffers it is given only until it returns.

  Returns:
    Argmax, equal to a full numpy scan's.
  """
  joints = np.asarray(joints, np.int64)
  means = np.asarray(means, np.float32)
  num_joints, tag_dim = heat.shape[0], tags.shape[-1]
  flat_heat = heat.reshape(num_joints, -1)
  flat_tags = tags.reshape(num_joints, -1, tag_dim)

  def run(heat, tags, joints, means):
    if scan is not None and joints.size * heat[0].size > _NUMPY_WORK:
      return np.asarray(scan(heat, tags, joints, means), np.int64)
    return numpy_argmax(heat, tags, joints, means)

  def answer(flat):
    return Argmax(flat, heat_around(heat, joints, flat))

  if joints.size * flat_heat.shape[1] <= _NUMPY_WORK:
    return answer(run(heat, tags, joints, means))
  active, slot_joint = np.unique(joints, return_inverse=True)
  sample = np.arange(0, flat_heat.shape[1], _SAMPLE_STEP)
  lower = np.empty(joints.size, np.float32)
  for j, k in enumerate(active):
    sel = slot_joint == j
    lower[sel] = numpy_scores(flat_heat[k, sample][None],
                              flat_tags[k, sample][None],
                              means[sel][:, None]).max(axis=1)
  good = lower >= np.percentile(lower, _LOW_PERCENTILE)
  cut = np.full(active.size, np.inf, np.float32)
  np.minimum.at(cut, slot_joint[good], lower[good])
  cut = np.where(np.isinf(cut), -np.inf, cut)  # joints of only low queries
  hot = [np.flatnonzero(flat_heat[k] >= c) for k, c in zip(active, cut)]
  most = max(h.size for h in hot)
  if most > _HOT_FRACTION * flat_heat.shape[1]:
    return answer(run(heat, tags, joints, means))
  # Hot pixels as rows of _HOT_WIDTH, their count padded to a power of 2
  # (few shapes compile) with -inf heat, which never wins.
  rows = 1 << (-(-most // _HOT_WIDTH) - 1).bit_length()
  size = rows * _HOT_WIDTH
  hot_heat = aligned_buffer('hot_heat', (active.size, size))
  hot_tags = aligned_buffer('hot_tags', (active.size, size, tag_dim))
  index = np.zeros((active.size, size), np.int64)
  for j, (k, h) in enumerate(zip(active, hot)):
    np.take(flat_heat[k], h, out=hot_heat[j, :h.size])
    np.take(flat_tags[k], h, axis=0, out=hot_tags[j, :h.size])
    hot_heat[j, h.size:], hot_tags[j, h.size:] = -np.inf, 0
    index[j, :h.size] = h
  shape = (active.size, rows, _HOT_WIDTH)
  pos = run(hot_heat.reshape(shape), hot_tags.reshape(shape + (tag_dim,)),
            slot_joint, means)
  flat = index[slot_joint, pos]
  best = numpy_scores(flat_heat[joints, flat], flat_tags[joints, flat], means)
  rest = np.flatnonzero(best < cut[slot_joint])
  if rest.size:
    flat[rest] = run(heat, tags, joints[rest], means[rest])
  return answer(flat)


def host_argmax(heat: np.ndarray, tags: np.ndarray,
                scan: ScanFn | None = None) -> ArgmaxFn:
  """Refine's ArgmaxFn over one image's numpy maps (argmax_queries_host).

  heat [K, H, W], tags [K, H, W, L] float32 (made contiguous here).
  """
  return functools.partial(argmax_queries_host,
                           np.ascontiguousarray(heat, np.float32),
                           np.ascontiguousarray(tags, np.float32), scan=scan)

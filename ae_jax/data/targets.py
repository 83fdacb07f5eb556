"""AE training targets: Gaussian heatmaps and joint encodings.

mmpose 0.x `HeatmapGenerator` and `JointsEncoder` (tag_per_joint True), as
vectorised TF graph ops (usable in any tf.data map or graph) and as numpy
twins (`*_np`), which the train pipeline's loader uses because they were
~6x cheaper per core (bench/bench_pipeline.py). Both are tested against
the same loop references.

Facts kept from mmpose:
  * a joint counts when v > 0 and its integer position (int(), i.e.
    truncation toward zero, so x in (-1, 0) gives 0) lies in the map;
  * the Gaussian patch is g[i, j] = exp(-((j - x0)^2 + (i - y0)^2) / 2s^2)
    with x0 = y0 = 3s + 1 on a ceil(6s + 3) grid, pasted with its corner at
    round(x - 3s - 1) (so it is centred on the integer joint), clipped to
    the map, max over people;
  * the joint encoding packs each person's kept joints to the front:
    slot t of person m holds (k * h * w + y * w + x, 1) for its t-th kept
    joint k, zeros after; only the first M people are encoded.

heatmap_size is an int (square map) or (w, h), as mmpose's output_size.

Shapes: joints [P, K, 3] float32 (x, y, v) in heatmap pixels; heatmaps
[h, w, K] float32 in [0, 1] (NHWC); encodings [M, K, 2] int32.
"""

import math

import numpy as np
import tensorflow as tf

from ae_jax.data.transforms import as_wh


def _kept_positions(joints, width: int, height: int):
  """Integer positions [P, K] (x, y) and the kept flag [P, K] bool."""
  xy = tf.cast(joints[..., :2], tf.int32)  # truncation toward zero, as int()
  x, y = xy[..., 0], xy[..., 1]
  kept = ((joints[..., 2] > 0) & (x >= 0) & (y >= 0) & (x < width) &
          (y < height))
  return x, y, kept


def generate_heatmaps(joints, heatmap_size, sigma: float):
  """Gaussian heatmaps, max over people (mmpose HeatmapGenerator).

  Args:
    joints: [P, K, 3] float32 in heatmap pixels (P may be 0).
    heatmap_size: int h (square) or (w, h).
    sigma: Gaussian sigma in heatmap pixels.

  Returns:
    [h, w, K] float32 in [0, 1].
  """
  width, height = as_wh(heatmap_size)
  joints = tf.convert_to_tensor(joints, tf.float32)
  num_joints = joints.shape[1]
  x, y, kept = _kept_positions(joints, width, height)
  size = int(math.ceil(6 * sigma + 3))  # len(np.arange(0, 6s + 3))
  center = 3.0 * sigma + 1.0
  # Patch corner and exclusive end, rounded half to even like np.round.
  ulx = tf.cast(tf.round(tf.cast(x, tf.float32) - center), tf.int32)
  uly = tf.cast(tf.round(tf.cast(y, tf.float32) - center), tf.int32)
  brx = tf.cast(tf.round(tf.cast(x, tf.float32) + center + 1), tf.int32)
  bry = tf.cast(tf.round(tf.cast(y, tf.float32) + center + 1), tf.int32)
  grid = tf.range(size, dtype=tf.int32)
  gridf = tf.cast(grid, tf.float32)
  # Separable per-axis parts of the patch: [P, K, size].
  px = ulx[..., None] + grid
  py = uly[..., None] + grid
  okx = (px >= 0) & (px < width) & (px < brx[..., None])
  oky = (py >= 0) & (py < height) & (py < bry[..., None])
  # exp of the summed squares in float32, as mmpose computes g.
  d2 = ((gridf - center)**2)[:, None] + ((gridf - center)**2)[None, :]
  g = tf.exp(-d2 / (2.0 * sigma**2))  # [size(y), size(x)]
  ok = (oky[..., :, None] & okx[..., None, :]) & kept[..., None, None]
  values = tf.where(ok, g, 0.0)  # [P, K, size, size]
  # Indices into [K, h, w]; masked updates go to (k, 0, 0) with value 0,
  # harmless under a max because heatmaps are >= 0.
  kk = tf.broadcast_to(tf.range(num_joints)[None, :, None, None],
                       tf.shape(values))
  yy = tf.where(ok, tf.broadcast_to(py[..., :, None], tf.shape(values)), 0)
  xx = tf.where(ok, tf.broadcast_to(px[..., None, :], tf.shape(values)), 0)
  idx = tf.reshape(tf.stack([kk, yy, xx], -1), [-1, 3])
  maps = tf.tensor_scatter_nd_max(
      tf.zeros([num_joints, height, width], tf.float32), idx,
      tf.reshape(values, [-1]))
  return tf.transpose(maps, [1, 2, 0])


def encode_joints(joints, heatmap_size, max_people: int):
  """mmpose JointsEncoder: (flat tag-map index, 1) per kept joint.

  Args:
    joints: [P, K, 3] float32 in heatmap pixels (P may be 0 or > M).
    heatmap_size: int h (square) or (w, h).
    max_people: M; people beyond it are dropped (mmpose would fail).

  Returns:
    [M, K, 2] int32.
  """
  width, height = as_wh(heatmap_size)
  joints = tf.convert_to_tensor(joints, tf.float32)[:max_people]
  num_joints = joints.shape[1]
  num_people = tf.shape(joints)[0]
  x, y, kept = _kept_positions(joints, width, height)
  k = tf.range(num_joints, dtype=tf.int32)[None, :]
  flat = k * height * width + y * width + x
  code = tf.stack([flat, tf.ones_like(flat)], -1) * tf.cast(
      kept, tf.int32)[..., None]
  # Stable sort puts each person's kept joints first, in joint order.
  order = tf.argsort(tf.cast(~kept, tf.int32), axis=1, stable=True)
  code = tf.gather(code, order, axis=1, batch_dims=1)
  return tf.pad(code, [[0, max_people - num_people], [0, 0], [0, 0]])


def _gaussian_patch(sigma: float) -> tuple[np.ndarray, float]:
  xs = np.arange(0, 6 * sigma + 3, 1, np.float32)
  center = 3 * sigma + 1
  return np.exp(-((xs - center)**2 + (xs[:, None] - center)**2) /
                (2 * sigma**2)), center


def generate_heatmaps_np(joints: np.ndarray, heatmap_size,
                         sigma: float) -> np.ndarray:
  """numpy twin of generate_heatmaps, used inside the pipeline's loader.

  One clipped patch maximum per kept joint (about 2 us each): measured
  faster on one core than any TF formulation (TF scatters cost ~110 ns per
  update, the dense [P, K, h, h] outer product ~2 ms), see the bench.

  Args:
    joints: [P, K, 3] float32 in heatmap pixels.
    heatmap_size: int h (square) or (w, h).
    sigma: Gaussian sigma in heatmap pixels.

  Returns:
    [h, w, K] float32 in [0, 1].
  """
  wh = np.array(as_wh(heatmap_size))
  g, center = _gaussian_patch(sigma)
  size_y, size_x = g.shape
  # [K, h, w] keeps each patch row contiguous; one transpose at the end.
  out = np.zeros((joints.shape[1], wh[1], wh[0]), np.float32)
  xy = joints[..., :2].astype(np.int64)  # truncation toward zero, as int()
  kept = ((joints[..., 2] > 0) & (xy >= 0).all(-1) & (xy < wh).all(-1))
  p, k = np.nonzero(kept)
  pts = xy[p, k].astype(np.float64)
  # Corner and end rounded half to even, as np.round in mmpose.
  ul = np.rint(pts - center).astype(np.int64)
  br = np.minimum(np.rint(pts + center + 1).astype(np.int64),
                  ul + (size_x, size_y))
  lo, hi = np.maximum(ul, 0), np.minimum(br, wh)
  for (kk, (ux, uy), (x0, y0), (x1, y1)) in zip(
      k.tolist(), ul.tolist(), lo.tolist(), hi.tolist()):
    view = out[kk, y0:y1, x0:x1]
    np.maximum(view, g[y0 - uy:y1 - uy, x0 - ux:x1 - ux], out=view)
  return out.transpose(1, 2, 0)


def encode_joints_np(joints: np.ndarray, heatmap_size,
                     max_people: int) -> np.ndarray:
  """numpy twin of encode_joints (vectorised, stable packing)."""
  w, h = as_wh(heatmap_size)
  joints = joints[:max_people]
  num_people, num_joints = joints.shape[:2]
  xy = joints[..., :2].astype(np.int64)
  kept = ((joints[..., 2] > 0) & (xy >= 0).all(-1) &
          (xy < (w, h)).all(-1))
  flat = (np.arange(num_joints) * h * w + xy[..., 1] * w + xy[..., 0])
  out = np.zeros((max_people, num_joints, 2), np.int32)
  slot = np.cumsum(kept, axis=1) - 1
  p, k = np.nonzero(kept)
  out[p, slot[p, k], 0] = flat[p, k]
  out[p, slot[p, k], 1] = 1
  return out

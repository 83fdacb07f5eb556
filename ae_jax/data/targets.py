"""AE training targets: Gaussian heatmaps and joint encodings (numpy).

mmpose 0.x `HeatmapGenerator` and `JointsEncoder` (tag_per_joint True),
vectorised in numpy for the pipeline's host loader: one clipped patch
maximum per kept joint, 0.29 ms for 6 people on one core against 1.56 ms
for a TF-graph formulation (scatters at ~110 ns per update), measured in
bench/RESULTS_pipeline.md.

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

heatmap_wh is the map size (w, h), as normalised once by
`transforms.train_sizes`.

Shapes: joints [P, K, 3] float32 (x, y, v) in heatmap pixels; heatmaps
[h, w, K] float32 in [0, 1] (NHWC); encodings [M, K, 2] int32.
"""

import numpy as np


def _gaussian_patch(sigma: float) -> tuple[np.ndarray, float]:
  xs = np.arange(0, 6 * sigma + 3, 1, np.float32)
  center = 3 * sigma + 1
  return np.exp(-((xs - center)**2 + (xs[:, None] - center)**2) /
                (2 * sigma**2)), center


def generate_heatmaps(joints: np.ndarray, heatmap_wh: tuple[int, int],
                      sigma: float) -> np.ndarray:
  """Gaussian heatmaps, max over people (mmpose HeatmapGenerator).

  One clipped patch maximum per kept joint (about 2 us each).

  Args:
    joints: [P, K, 3] float32 in heatmap pixels (P may be 0).
    heatmap_wh: (w, h) of the map.
    sigma: Gaussian sigma in heatmap pixels.

  Returns:
    [h, w, K] float32 in [0, 1].
  """
  wh = np.array(heatmap_wh, np.int64)
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


def encode_joints(joints: np.ndarray, heatmap_wh: tuple[int, int],
                  max_people: int) -> np.ndarray:
  """mmpose JointsEncoder: (flat tag-map index, 1) per kept joint.

  Args:
    joints: [P, K, 3] float32 in heatmap pixels (P may be 0 or > M).
    heatmap_wh: (w, h) of the map.
    max_people: M; people beyond it are dropped (mmpose would fail).

  Returns:
    [M, K, 2] int32.
  """
  w, h = heatmap_wh
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

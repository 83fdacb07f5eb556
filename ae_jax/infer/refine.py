"""Refine: fill each person's missing joints (mmpose HeatmapParser.refine).

For person p with mean tag t_p (np.mean over its detected joints' tags,
read at int(x), int(y)) and missing joint k, the new joint is the argmax
over pixels of score = heatmap_k - round(|tag_k - t_p|) in float32 (first
maximum in row-major order), with quarter-pixel offsets toward the higher
neighbour; it is used if its heatmap value is > 0.

mmpose scans all K full maps per person. Here all (person, missing joint)
pairs are answered at once by the jitted scan of refine_scan.py, on the
device where the maps are (only the queries and [Q] / [Q, 5] results
cross); for numpy maps on the host, only the pixels that can win are
scanned (refine_scan.argmax_queries_host). Both equal a full numpy scan.

(An earlier numpy branch and bound over tiles and tag-space cells is gone:
on the bench maps, sparse and missing-joint, 3-150 people, the scan was
as fast or faster everywhere, bench/RESULTS_eval.md.)

Legend: K joints, H x W map, L tag dim, P people, Q (person, missing
joint) queries.
"""

import jax
import numpy as np

from ae_jax.infer import refine_scan


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


def refine_poses(poses: np.ndarray, heatmaps, tags, *,
                 own_tags: np.ndarray | None = None,
                 stats: dict | None = None) -> np.ndarray:
  """Fills missing joints (module docstring); returns new poses.

  Args:
    poses: [P, K, 3 + L] after adjust.
    heatmaps: [K, H, W] float32, numpy or a jax array on its device.
    tags: [K, H, W, L] float32, alike.
    own_tags: [P, K, L] tags at the people's joints (int x, int y); read
      from the maps when None (host maps only).
    stats: if given, 'bytes_to_host' grows by the device scan's results.
  """
  num_people = poses.shape[0]
  detected = poses[:, :, 2] > 0
  persons, joints = np.nonzero(~detected)
  if num_people == 0 or persons.size == 0:
    return poses.copy()
  num_joints, height, width = heatmaps.shape
  if own_tags is None:
    if isinstance(heatmaps, jax.Array):
      raise ValueError('refine_poses needs own_tags with device maps')
    xs = np.clip(poses[:, :, 0].astype(np.int64), 0, width - 1)
    ys = np.clip(poses[:, :, 1].astype(np.int64), 0, height - 1)
    own_tags = tags[np.arange(num_joints)[None], ys, xs]
  means = mean_tags(own_tags, detected)[persons]  # [Q, L]
  if isinstance(heatmaps, jax.Array):
    out = refine_scan.argmax_queries(heatmaps, tags, joints, means,
                                     stats=stats)
  else:
    out = refine_scan.argmax_queries_host(
        np.ascontiguousarray(heatmaps, np.float32),
        np.ascontiguousarray(tags, np.float32), joints, means)
  return fill_joints(poses, persons, joints, out['flat'], out['heat'], width)

"""Grouping of full host maps: numpy NMS / top-k, then ae_jax's decode.

Code only tests and benches use. `find_candidates` is an NMS / top-k of its
own (tiles that skip dull areas, a lexsort), independent of the device's
candidates.top_candidates, which tests compare with it; `group_poses` feeds
its candidates to decode.decode_candidates with refine over the numpy maps
(refine.host_argmax), so that decode's matching, adjust and refine can be
compared with the mmpose-style parser (mmpose_grouping.py) on any maps.

Legend: K joints, H x W map size, L tag dim, N candidates of one joint
(<= max_people), M = max_people, P people.
Maps: heatmaps [K, H, W] float32, tags [K, H, W, L] float32.
"""

from typing import List

import numpy as np

from ae_jax.infer import decode
from ae_jax.infer import matching
from ae_jax.infer import refine
from ae_jax.infer import refine_scan


class _Blocks:
  """B x B pixel tiles of an H x W grid, for searches that skip dull areas.

  Block maxima bound what a tile can contribute: NMS only needs tiles whose
  max is above the detection threshold. Indices of pixels past the border
  are clipped (duplicates of border pixels), which leaves maxima unchanged.
  """

  def __init__(self, height: int, width: int, block: int = 16,
               halo: int = 2):
    self.height, self.width, self.block, self.halo = height, width, block, halo
    nbh, nbw = -(-height // block), -(-width // block)
    self.num = nbh * nbw
    self.shape = (nbh, nbw)
    core_y = np.arange(nbh)[:, None] * block + np.arange(block)  # [nbh, B]
    core_x = np.arange(nbw)[:, None] * block + np.arange(block)
    self.valid = ((core_y < height)[:, None, :, None] &
                  (core_x < width)[None, :, None, :]).reshape(
                      self.num, block, block)
    self.pixels = (np.minimum(core_y, height - 1)[:, None, :, None] * width +
                   np.minimum(core_x, width - 1)[None, :, None, :]).reshape(
                       self.num, block * block)
    win = np.arange(-halo, block + halo)
    win_y = np.clip(np.arange(nbh)[:, None] * block + win, 0, height - 1)
    win_x = np.clip(np.arange(nbw)[:, None] * block + win, 0, width - 1)
    self.windows = (win_y[:, None, :, None] * width +
                    win_x[None, :, None, :]).reshape(
                        self.num, block + 2 * halo, block + 2 * halo)

  def block_max(self, maps: np.ndarray) -> np.ndarray:
    """[K, H, W] -> [K, num_blocks] per-tile maxima."""
    b = self.block
    nbh, nbw = self.shape
    if self.height % b:  # edge padding duplicates pixels: maxima unchanged
      maps = np.pad(maps, [(0, 0), (0, nbh * b - self.height), (0, 0)],
                    mode='edge')
    rows = np.maximum.reduce(
        maps.reshape(maps.shape[0], nbh, b, maps.shape[2]), axis=2)
    if self.width % b:
      rows = np.pad(rows, [(0, 0), (0, 0), (0, nbw * b - self.width)],
                    mode='edge')
    return rows.reshape(rows.shape[0], nbh, nbw, b).max(axis=3).reshape(
        rows.shape[0], self.num)


def find_candidates(heatmaps: np.ndarray, tags: np.ndarray, max_people: int,
                    detection_threshold: float, nms_kernel: int = 5
                    ) -> List[matching.JointCandidates]:
  """NMS peaks above the threshold, top `max_people` per joint.

  NMS keeps pixels equal to the max of their kernel x kernel window, as
  torch MaxPool2d(kernel, 1, (kernel - 1) // 2) (padding -inf) followed by
  `maxpool == heatmap`. mmpose takes the top-k of the NMS'd map and then
  drops values <= threshold; for a threshold >= 0 that equals the top-k of
  the peaks above the threshold, so only tiles with a pixel above the
  threshold are examined. Ties are ordered by ascending flat index.

  Returns:
    A list of K JointCandidates.
  """
  num_joints, height, width = heatmaps.shape
  radius = nms_kernel // 2
  blocks = _Blocks(height, width, halo=max(radius, 2))
  b, halo = blocks.block, blocks.halo
  k_sel, b_sel = np.nonzero(blocks.block_max(heatmaps) > detection_threshold)
  flat_heat = heatmaps.reshape(num_joints, -1)
  win = flat_heat[k_sel[:, None, None], blocks.windows[b_sel]]
  # Separable max over the window, within the halo.
  lo, hi = halo - radius, halo + radius
  rows = win[:, :, lo:lo + b]
  for d in range(lo + 1, hi + 1):
    rows = np.maximum(rows, win[:, :, d:d + b])
  pooled = rows[:, lo:lo + b]
  for d in range(lo + 1, hi + 1):
    pooled = np.maximum(pooled, rows[:, d:d + b])
  core = win[:, halo:halo + b, halo:halo + b]
  keep = ((core == pooled) & (core > detection_threshold) &
          blocks.valid[b_sel])
  n_idx, cy, cx = np.nonzero(keep)
  k_idx = k_sel[n_idx]
  flat = blocks.pixels[b_sel[n_idx], cy * b + cx]
  val = core[n_idx, cy, cx]
  order = np.lexsort((flat, -val, k_idx))
  k_idx, flat, val = k_idx[order], flat[order], val[order]
  starts = np.searchsorted(k_idx, np.arange(num_joints + 1))
  flat_tags = tags.reshape(num_joints, height * width, -1)
  out = []
  for k in range(num_joints):
    sl = slice(starts[k], min(starts[k + 1], starts[k] + max_people))
    f = flat[sl].astype(np.int64)
    out.append(matching.JointCandidates(
        loc=np.stack([f % width, f // width], 1), val=val[sl],
        tag=flat_tags[k, f]))
  return out


def host_candidates(heatmaps: np.ndarray, tags: np.ndarray,
                    params: decode.GroupingParams) -> decode.Candidates:
  """find_candidates as decode.Candidates, padded to M with -inf values."""
  num_joints, height, width = heatmaps.shape
  found = find_candidates(heatmaps, tags, params.max_people,
                          params.detection_threshold, params.nms_kernel)
  m = params.max_people
  val = np.full((num_joints, m), -np.inf, np.float32)
  idx = np.zeros((num_joints, m), np.int32)
  tag = np.zeros((num_joints, m, tags.shape[-1]), np.float32)
  neighbors = np.zeros((num_joints, m, 4), np.float32)
  for k, joint in enumerate(found):
    n = joint.val.size
    x, y = joint.loc[:, 0], joint.loc[:, 1]
    val[k, :n], idx[k, :n], tag[k, :n] = joint.val, y * width + x, joint.tag
    h = heatmaps[k]
    neighbors[k, :n] = np.stack([
        h[np.minimum(height - 1, y + 1), x], h[np.maximum(0, y - 1), x],
        h[y, np.minimum(width - 1, x + 1)], h[y, np.maximum(0, x - 1)]], -1)
  return decode.Candidates(val, idx, tag, neighbors)


def group_poses(heatmaps: np.ndarray, tags: np.ndarray,
                params: decode.GroupingParams = decode.GroupingParams(),
                scan: refine.ScanFn | None = refine_scan.scan_flat
                ) -> decode.Poses:
  """One image's full host maps -> Poses on the map grid (mmpose's parse).

  scan: refine.argmax_queries_host's large scans (default the jitted one,
  as eval on XLA:CPU; None: numpy).
  """
  heatmaps = np.ascontiguousarray(heatmaps, np.float32)
  tags = np.asarray(tags, np.float32)
  if tags.ndim == 3:
    tags = tags[..., None]
  return decode.decode_candidates(
      host_candidates(heatmaps, tags, params), heatmaps.shape[2], params,
      refine.host_argmax(heatmaps, tags, scan))


def rows(poses: decode.Poses) -> np.ndarray:
  """[P, K, 3 + L] (x, y, value, tags): the mmpose_grouping layout."""
  return np.concatenate(
      [poses.coords, poses.joint_scores[..., None], poses.tags], -1)


def poses_from_keypoints(keypoints, scores) -> decode.Poses:
  """decode.Poses (no tags) from [P, K, 3] (x, y, joint score), scores [P]."""
  keypoints = np.asarray(keypoints, np.float32)
  return decode.Poses(keypoints[..., :2], keypoints[..., 2],
                      np.asarray(scores, np.float32),
                      np.zeros(keypoints.shape[:2] + (0,), np.float32))

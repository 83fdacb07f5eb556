"""Associative-embedding grouping on the host (mmpose 0.x HeatmapParser).

Turns one image's aggregated heatmaps and tag maps into people:
5x5 max-pool NMS -> top-k peaks per joint -> joint-by-joint Hungarian
matching on tag distance -> quarter-pixel adjust -> person score -> refine
(fill missing joints) -> map back to the original image.

Legend: K joints (17 for COCO), H x W map size (the resized input size with
project2image), L tag dim (2 with flip test: original and flipped tags,
else 1), N candidates of one joint (<= max_people), P people found.
Maps are one image's, joint-major (predict.py transposes on device so that
each joint's map is contiguous here): heatmaps [K, H, W] float32,
tags [K, H, W, L] float32.
Poses [P, K, 3 + L] float32: x, y on the map grid (mmpose's +0.5 pixel
convention after adjust), detection value (0 = missing), tags.

Everything is vectorised numpy/scipy except the inherently sequential
matching (K joint steps, each one linear_sum_assignment); refine's scan is
jitted (refine.py). Float32/float64
arithmetic follows mmpose's operation by operation so that the rounded tag
distances, and hence the grouping, come out identical.
"""

import dataclasses
from typing import List, NamedTuple, Tuple

import numpy as np
import scipy.optimize

from ae_jax.infer import refine as refine_lib

# mmpose's joint_order for COCO: head, shoulders, hips, then limbs. As in
# mmpose, it is used whenever K == 17; other K match in index order.
JOINT_ORDER = (0, 1, 2, 3, 4, 5, 6, 11, 12, 7, 8, 9, 10, 13, 14, 15, 16)


@dataclasses.dataclass(frozen=True)
class GroupingParams:
  """mmpose test_cfg keys of the HeatmapParser (config.test.grouping)."""
  nms_kernel: int = 5  # nms_kernel (nms_padding = (kernel - 1) // 2)
  max_people: int = 30  # max_num_people: top-k candidates per joint
  detection_threshold: float = 0.1
  tag_threshold: float = 1.0
  use_detection_val: bool = True
  ignore_too_much: bool = False
  adjust: bool = True
  refine: bool = True


class JointCandidates(NamedTuple):
  """Peaks of one joint above the threshold, in top-k order.

  loc [N, 2] int64 (x, y); val [N] float32 descending; tag [N, L] float32.
  """
  loc: np.ndarray
  val: np.ndarray
  tag: np.ndarray


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

  def reduce(self, maps: np.ndarray, ufunc, axis: int) -> np.ndarray:
    """Per-tile ufunc (np.maximum / np.minimum) of maps, H, W at axis, +1.

    Returns the maps with (H, W) replaced by one num_blocks axis.
    """
    b = self.block
    nbh, nbw = self.shape
    pad = [(0, 0)] * maps.ndim
    if self.height % b:  # edge padding duplicates pixels: extrema unchanged
      pad[axis] = (0, nbh * b - self.height)
      maps = np.pad(maps, pad, mode='edge')
      pad[axis] = (0, 0)
    shape = maps.shape
    rows = ufunc.reduce(
        maps.reshape(shape[:axis] + (nbh, b) + shape[axis + 1:]),
        axis=axis + 1)  # [..., nbh, W, *rest]
    if self.width % b:
      pad[axis + 1] = (0, nbw * b - self.width)
      rows = np.pad(rows, pad, mode='edge')
    shape = rows.shape
    cols = rows.reshape(shape[:axis + 1] + (nbw, b) + shape[axis + 2:])
    # A loop over the b columns of a tile: numpy reduces a short strided axis
    # with a small inner dimension slowly.
    index = (slice(None),) * (axis + 2)
    tiles = cols[index + (0,)].copy()
    for i in range(1, b):
      ufunc(tiles, cols[index + (i,)], out=tiles)
    return tiles.reshape(shape[:axis] + (self.num,) + shape[axis + 2:])


def find_candidates(heatmaps: np.ndarray, tags: np.ndarray, max_people: int,
                    detection_threshold: float, nms_kernel: int = 5,
                    blocks: _Blocks | None = None,
                    block_max: np.ndarray | None = None
                    ) -> List[JointCandidates]:
  """NMS peaks above the threshold, top `max_people` per joint.

  NMS keeps pixels equal to the max of their kernel x kernel window, as
  torch MaxPool2d(kernel, 1, (kernel - 1) // 2) (padding -inf) followed by
  `maxpool == heatmap`. mmpose takes the top-k of the NMS'd map and then
  drops values <= threshold; for a threshold >= 0 that equals the top-k of
  the peaks above the threshold, so only tiles with a pixel above the
  threshold are examined. Ties are ordered by ascending flat index
  (torch.topk leaves them unspecified).

  Args:
    heatmaps: [K, H, W] float32.
    tags: [K, H, W, L] float32.
    max_people: top-k per joint.
    detection_threshold: keep values > this (must be >= 0).
    nms_kernel: odd NMS window.
    blocks, block_max: optional precomputed tiling and [K, num_blocks] tile
      maxima of heatmaps.

  Returns:
    A list of K JointCandidates.
  """
  if detection_threshold < 0:
    raise ValueError('detection_threshold must be >= 0, got '
                     f'{detection_threshold}')
  if nms_kernel % 2 != 1:
    raise ValueError(f'nms_kernel must be odd, got {nms_kernel}')
  num_joints, height, width = heatmaps.shape
  radius = nms_kernel // 2
  if blocks is None or blocks.halo < radius:
    blocks = _Blocks(height, width, halo=max(radius, 2))
  if block_max is None:
    block_max = blocks.reduce(heatmaps, np.maximum, axis=1)
  b, halo = blocks.block, blocks.halo
  k_sel, b_sel = np.nonzero(block_max > detection_threshold)
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
    out.append(JointCandidates(
        loc=np.stack([f % width, f // width], 1), val=val[sl],
        tag=flat_tags[k, f]))
  return out


class _People:
  """Growing person table with mmpose's dict-by-first-tag semantics.

  mmpose keys each person by tag[0] of the candidate that created it; a new
  person whose key already exists overwrites that person's joint and resets
  its tag list (this happens with plateaus, e.g. duplicated border pixels of
  upsampled maps). We keep that behaviour so the output is the same.
  """

  def __init__(self, num_joints: int, tag_dim: int):
    self.num_joints = num_joints
    self.joints = np.zeros((8, num_joints, 3 + tag_dim), np.float32)
    # Tag history per person in append order; mean = np.mean of it, so the
    # float32 reduction is the same as mmpose's np.mean over a list.
    self.history = np.zeros((8, num_joints, tag_dim), np.float32)
    self.count = np.zeros(8, np.int64)
    self.keys = {}
    self.num = 0
    self._means = np.zeros((8, tag_dim), np.float32)
    self._dirty = set()

  def _grow(self):
    cap = self.joints.shape[0] * 2
    for name in ('joints', 'history', 'count', '_means'):
      old = getattr(self, name)
      new = np.zeros((cap,) + old.shape[1:], old.dtype)
      new[:old.shape[0]] = old
      setattr(self, name, new)

  def join(self, person: int, joint: int, row: np.ndarray, tag: np.ndarray):
    self.joints[person, joint] = row
    self.history[person, self.count[person]] = tag
    self.count[person] += 1
    self._dirty.add(person)

  def create(self, joint: int, row: np.ndarray, tag: np.ndarray):
    key = float(tag[0])
    person = self.keys.get(key)
    if person is None:
      if self.num == self.joints.shape[0]:
        self._grow()
      person = self.num
      self.keys[key] = person
      self.num += 1
    self.joints[person, joint] = row
    self.history[person, 0] = tag
    self.count[person] = 1
    self._dirty.add(person)

  def mean_tags(self, num: int) -> np.ndarray:
    """[num, L] float32 mean tag of the first `num` people."""
    for p in self._dirty:
      self._means[p] = np.mean(self.history[p, :self.count[p]], axis=0)
    self._dirty.clear()
    return self._means[:num]


def match_candidates(candidates: List[JointCandidates], *,
                     tag_threshold: float = 1.0,
                     use_detection_val: bool = True,
                     ignore_too_much: bool = False,
                     max_people: int = 30) -> np.ndarray:
  """Groups candidates into people joint by joint (mmpose _match_by_tag).

  For each joint in JOINT_ORDER the cost of candidate i (rows, top-k order)
  to person j (columns, creation order) is round(|tag_i - mean_tag_j|) * 100
  - val_i, padded with 1e10 columns to square when there are more candidates
  than people, solved with scipy's linear_sum_assignment. A pair counts only
  if the un-rounded distance < tag_threshold; every other candidate starts a
  new person.

  Returns:
    poses [P, K, 3 + L] float32 in creation order (x, y integer grid).
  """
  num_joints = len(candidates)
  tag_dim = candidates[0].tag.shape[1]
  order = JOINT_ORDER if num_joints == 17 else tuple(range(num_joints))
  people = _People(num_joints, tag_dim)
  for idx in order:
    cand = candidates[idx]
    n = cand.val.shape[0]
    if n == 0:
      continue
    # mmpose concatenates int64 locations with float32 values: float64 rows.
    rows = np.concatenate(
        [cand.loc, cand.val[:, None], cand.tag], 1).astype(np.float64)
    if people.num == 0:
      for r in range(n):
        people.create(idx, rows[r], cand.tag[r])
      continue
    num_cols = people.num
    if ignore_too_much:
      num_cols = min(num_cols, max_people)
    means = people.mean_tags(num_cols)
    # float64 difference of float32 values, as mmpose's float64 rows.
    diff = rows[:, None, 3:] - means[None].astype(np.float64)
    dist = np.sqrt(np.sum(diff * diff, axis=2))
    cost = dist
    if use_detection_val:
      cost = np.round(dist) * 100 - rows[:, 2:3]
    if n > num_cols:
      cost = np.concatenate(
          [cost, np.full((n, n - num_cols), 1e10, np.float64)], 1)
    row_ind, col_ind = scipy.optimize.linear_sum_assignment(cost)
    for r, c in zip(row_ind.tolist(), col_ind.tolist()):
      if c < num_cols and dist[r, c] < tag_threshold:
        people.join(c, idx, rows[r], cand.tag[r])
      else:
        people.create(idx, rows[r], cand.tag[r])
  num = people.num
  if ignore_too_much:
    num = min(num, max_people)
  return people.joints[:num].copy()


def adjust_poses(poses: np.ndarray, heatmaps: np.ndarray) -> np.ndarray:
  """Quarter-pixel shift toward the higher neighbour, then +0.5 (mmpose).

  Only joints with a value > 0 move. Returns a new array.
  """
  poses = poses.copy()
  _, height, width = heatmaps.shape
  p_idx, k_idx = np.nonzero(poses[:, :, 2] > 0)
  x = poses[p_idx, k_idx, 0]
  y = poses[p_idx, k_idx, 1]
  xx, yy = x.astype(np.int64), y.astype(np.int64)
  up = heatmaps[k_idx, np.minimum(height - 1, yy + 1), xx]
  down = heatmaps[k_idx, np.maximum(0, yy - 1), xx]
  right = heatmaps[k_idx, yy, np.minimum(width - 1, xx + 1)]
  left = heatmaps[k_idx, yy, np.maximum(0, xx - 1)]
  y = y + np.where(up > down, np.float32(0.25), np.float32(-0.25))
  x = x + np.where(right > left, np.float32(0.25), np.float32(-0.25))
  poses[p_idx, k_idx, 0] = x + np.float32(0.5)
  poses[p_idx, k_idx, 1] = y + np.float32(0.5)
  return poses


def refine_poses(poses: np.ndarray, heatmaps: np.ndarray,
                 tags: np.ndarray) -> np.ndarray:
  """Fills each person's missing joints (mmpose HeatmapParser.refine).

  See refine.py. poses [P, K, 3 + L] after adjust, heatmaps [K, H, W],
  tags [K, H, W, L]. Returns new poses.
  """
  return refine_lib.refine_poses(poses, heatmaps, tags)


def group_poses(heatmaps: np.ndarray, tags: np.ndarray,
                params: GroupingParams = GroupingParams()
                ) -> Tuple[np.ndarray, np.ndarray]:
  """Groups one image's maps into people (mmpose HeatmapParser.parse).

  Args:
    heatmaps: [K, H, W] float32 aggregated heatmaps.
    tags: [K, H, W, L] float32 tag maps (L=2 with flip test).
    params: grouping options.

  Returns:
    poses [P, K, 3 + L] float32 on the map grid and scores [P] float32, the
    mean joint value after adjust and before refine.
  """
  heatmaps = np.ascontiguousarray(heatmaps, np.float32)
  tags = np.asarray(tags, np.float32)
  if tags.ndim == 3:
    tags = tags[..., None]
  if tags.shape[:3] != heatmaps.shape:
    raise ValueError(f'tags {tags.shape} do not match heatmaps '
                     f'{heatmaps.shape}')
  blocks = _Blocks(heatmaps.shape[1], heatmaps.shape[2],
                   halo=max(2, params.nms_kernel // 2))
  block_max = blocks.reduce(heatmaps, np.maximum, axis=1)
  candidates = find_candidates(
      heatmaps, tags, params.max_people, params.detection_threshold,
      params.nms_kernel, blocks, block_max)
  poses = match_candidates(
      candidates, tag_threshold=params.tag_threshold,
      use_detection_val=params.use_detection_val,
      ignore_too_much=params.ignore_too_much, max_people=params.max_people)
  if params.adjust:
    poses = adjust_poses(poses, heatmaps)
  scores = poses[:, :, 2].mean(axis=1)
  if params.refine:
    poses = refine_poses(poses, heatmaps, tags)
  return poses, scores


def transform_to_image(poses: np.ndarray, center, scale,
                       map_size) -> np.ndarray:
  """Maps x, y from the map grid to original image pixels (transform_preds).

  Args:
    poses: [P, K, C] with x, y in the first two channels.
    center: [2] (x, y) image px, as from predict.get_multi_scale_size.
    scale: [2] (w, h) in units of 200 px.
    map_size: (w, h) of the maps the poses live on.

  Returns:
    A float32 copy with x, y in image pixels.
  """
  out = np.array(poses, np.float32, copy=True)
  scale_px = np.asarray(scale, np.float64) * 200.0
  center = np.asarray(center, np.float64)
  for d in range(2):
    out[..., d] = (poses[..., d] * (scale_px[d] / map_size[d]) + center[d] -
                   scale_px[d] * 0.5)
  return out

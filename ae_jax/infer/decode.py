"""Grouping's host half: candidates -> people, in numpy/scipy only.

mmpose 0.x HeatmapParser.parse after its NMS / top-k: threshold the
candidates -> joint-by-joint Hungarian matching on tag distance
(`match_candidates`) -> quarter-pixel adjust from the neighbour values ->
person score -> refine (fill missing joints) -> back to image pixels.
This module imports no jax, flax, tensorflow or torch: the same code decodes
the jitted predict's candidates (infer/predict.py, maps on the device) and
those of an exported model run without JAX (maps in numpy). Refine's argmax
is a callable: `host_argmax` for numpy maps; the JAX side passes its jitted
scan over maps that stay on the device (refine_scan.argmax_queries).

Float32/float64 arithmetic follows mmpose operation by operation, so the
rounded tag distances, and hence the grouping, come out identical.

Legend: K joints, M candidates per joint (max_people), N candidates of one
joint above the threshold, L tag dim (2 with flip test), H x W map (the
resized input with project2image), P people, Q (person, missing joint)
refine queries.
"""

import dataclasses
from typing import Any, Callable, Hashable, Iterable, Mapping, NamedTuple
from typing import Tuple

import numpy as np

from ae_jax.infer import matching
from ae_jax.infer import refine as refine_lib


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

  def __post_init__(self):
    if self.nms_kernel <= 0 or self.nms_kernel % 2 != 1:
      raise ValueError(f'nms_kernel must be odd, got {self.nms_kernel}')
    if self.max_people <= 0:
      raise ValueError(f'max_people must be positive, got {self.max_people}')
    if self.detection_threshold < 0:
      raise ValueError('detection_threshold must be >= 0, got '
                       f'{self.detection_threshold}')


def grouping_params(value: GroupingParams | Mapping[str, Any]
                    ) -> GroupingParams:
  """GroupingParams from itself or a mapping of its fields.

  Raises:
    ValueError: naming a key that is not a GroupingParams field, or a bad
      value.
  """
  if isinstance(value, GroupingParams):
    return value
  fields = [f.name for f in dataclasses.fields(GroupingParams)]
  unknown = sorted(set(value.keys()) - set(fields))
  if unknown:
    raise ValueError(f'unknown grouping key(s) {unknown}; known: {fields}')
  return GroupingParams(**value)


class Candidates(NamedTuple):
  """NMS'd top-M peaks per joint of one image (a NamedTuple: a JAX pytree).

  val [K, M] float32 descending; idx [K, M] int32 flat index y * W + x;
  tag [K, M, L] float32 tags there; neighbors [K, M, 4] float32 heat at
  (y+1, x), (y-1, x), (y, x+1), (y, x-1), clipped at the border.
  """
  val: Any
  idx: Any
  tag: Any
  neighbors: Any


@dataclasses.dataclass(frozen=True)
class Poses:
  """People of one image.

  coords: [P, K, 2] float32 x, y: on the map grid (mmpose's +0.5 pixel
    convention after adjust) or, after `to_image`, in image pixels.
  joint_scores: [P, K] float32 heat value of each joint (0: missing).
  scores: [P] float32 person score, the mean joint score after adjust and
    before refine.
  tags: [P, K, L] float32 tags at the joints matching placed (0 for joints
    refine filled or none found).
  """
  coords: np.ndarray
  joint_scores: np.ndarray
  scores: np.ndarray
  tags: np.ndarray

  def __len__(self) -> int:
    return self.scores.shape[0]

  @property
  def keypoints(self) -> np.ndarray:
    """[P, K, 3] float32 (x, y, joint score): COCO json and drawing."""
    return np.concatenate([self.coords, self.joint_scores[..., None]], -1)

  def to_image(self, center, scale, map_size) -> 'Poses':
    """These poses with coords mapped from the map grid to image pixels."""
    return dataclasses.replace(self, coords=transform_to_image(
        self.coords, center, scale, map_size))


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One image's people, as a predictor's stream yields them.

  key: the caller's key of the image.
  poses: Poses in image pixels.
  bytes_to_host: device->host bytes its decode fetched (the candidates and
    refine's answers).
  full_map_bytes: bytes of its full maps (what moving them would cost).
  """
  key: Hashable
  poses: Poses
  bytes_to_host: int = 0
  full_map_bytes: int = 0


# (key, [H, W, 3] uint8 RGB image) pairs -> their Predictions (in any
# order), e.g. predict.Predictor(...).stream.
StreamFn = Callable[[Iterable[Tuple[Hashable, np.ndarray]]],
                    Iterable[Prediction]]


def _poses(rows: np.ndarray, scores: np.ndarray) -> Poses:
  """Poses from mmpose's rows [P, K, 3 + L] (x, y, value, tags)."""
  return Poses(rows[..., :2].copy(), rows[..., 2].copy(), scores,
               rows[..., 3:].copy())


def adjust(rows: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
  """Quarter-pixel shift toward the higher neighbour, then +0.5 (mmpose).

  rows [P, K, 3 + L]; neighbors [P, K, 4] heat at (y+1, x), (y-1, x),
  (y, x+1), (y, x-1) of each joint. Only joints with a value > 0 move.
  Returns new rows.
  """
  rows = rows.copy()
  p_idx, k_idx = np.nonzero(rows[:, :, 2] > 0)
  up, down, right, left = np.moveaxis(neighbors[p_idx, k_idx], -1, 0)
  y = rows[p_idx, k_idx, 1] + np.where(up > down, np.float32(0.25),
                                       np.float32(-0.25))
  x = rows[p_idx, k_idx, 0] + np.where(right > left, np.float32(0.25),
                                       np.float32(-0.25))
  rows[p_idx, k_idx, 0] = x + np.float32(0.5)
  rows[p_idx, k_idx, 1] = y + np.float32(0.5)
  return rows


def _threshold(cands: Candidates, width: int, params: GroupingParams):
  """Per joint, the candidates above the threshold (at most max_people).

  Returns:
    (K JointCandidates, {(joint, flat index): neighbors [4]}).
  """
  val = np.asarray(cands.val, np.float32)
  idx = np.asarray(cands.idx)
  tag = np.asarray(cands.tag, np.float32)
  neigh = np.asarray(cands.neighbors, np.float32)
  joint_cands, neigh_of = [], {}
  for k in range(val.shape[0]):
    n = min(int(np.sum(val[k] > params.detection_threshold)),
            params.max_people)  # val is descending: the first n
    f = idx[k, :n].astype(np.int64)
    joint_cands.append(matching.JointCandidates(
        loc=np.stack([f % width, f // width], 1), val=val[k, :n],
        tag=tag[k, :n]))
    for i in range(n):
      neigh_of[(k, int(f[i]))] = neigh[k, i]
  return joint_cands, neigh_of


def decode_candidates(cands: Candidates, width: int,
                      params: GroupingParams = GroupingParams(),
                      argmax: refine_lib.ArgmaxFn | None = None) -> Poses:
  """One image's candidates -> people on the map grid.

  Args:
    cands: numpy Candidates of one image (M >= params.max_people).
    width: W of the maps the candidate indices refer to.
    params: grouping options.
    argmax: refine's argmax over the image's maps (`host_argmax` for numpy
      maps); needed when params.refine and someone misses a joint.

  Returns:
    Poses on the map grid, in mmpose's order (creation order).
  """
  joint_cands, neigh_of = _threshold(cands, width, params)
  rows = matching.match_candidates(
      joint_cands, tag_threshold=params.tag_threshold,
      use_detection_val=params.use_detection_val,
      ignore_too_much=params.ignore_too_much, max_people=params.max_people)
  detected = rows[:, :, 2] > 0
  if params.adjust:
    xs = rows[:, :, 0].astype(np.int64)
    ys = rows[:, :, 1].astype(np.int64)
    neigh = np.zeros(rows.shape[:2] + (4,), np.float32)
    for p, k in zip(*np.nonzero(detected)):
      neigh[p, k] = neigh_of[(int(k), int(ys[p, k] * width + xs[p, k]))]
    rows = adjust(rows, neigh)
  scores = rows[:, :, 2].mean(axis=1)
  if params.refine and rows.shape[0] and not detected.all():
    if argmax is None:
      raise ValueError('refine needs the maps: pass argmax (host_argmax for '
                       'numpy maps) or set grouping.refine False')
    rows = refine_lib.refine(rows, argmax, width)
  return _poses(rows, scores)


def transform_to_image(coords: np.ndarray, center, scale,
                       map_size) -> np.ndarray:
  """Maps x, y from the map grid to original image pixels (transform_preds).

  Args:
    coords: [..., C >= 2] with x, y in the first two channels.
    center: [2] (x, y) image px, as from eval_input.get_multi_scale_size.
    scale: [2] (w, h) in units of 200 px.
    map_size: (w, h) of the maps the coords live on.

  Returns:
    A float32 copy with x, y in image pixels.
  """
  out = np.array(coords, np.float32, copy=True)
  scale_px = np.asarray(scale, np.float64) * 200.0
  center = np.asarray(center, np.float64)
  for d in range(2):
    out[..., d] = (coords[..., d] * (scale_px[d] / map_size[d]) + center[d] -
                   scale_px[d] * 0.5)
  return out

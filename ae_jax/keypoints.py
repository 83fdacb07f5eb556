"""Keypoint metadata in one place: `KeypointSpec` (names, flip, skeleton,
OKS sigmas), COCO's by default.

The spec is resolved once, at the entry point, from the config's
`data.keypoints` group (`spec_from_config`; ae_jax.data.coco.resolve_spec
adds the person category of the annotation file for
`source='annotations'`), or read from a checkpoint, which records the spec
it was trained with (`spec_to_dict`); its fields then reach the pieces as
plain arguments: num_joints to the model and the loss, flip_index to the
train pipeline and the flip test, sigmas to the COCO scoring, skeleton to
the drawing.

COCO joint order (and mmpose's `dataset_info` for coco):
0 nose, 1/2 eyes, 3/4 ears, 5/6 shoulders, 7/8 elbows, 9/10 wrists,
11/12 hips, 13/14 knees, 15/16 ankles (left first in each pair).
"""

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

# Sigma of a joint that is not one of COCO's (by name): the mean of COCO's
# 17 sigmas (1.138 / 17 = 0.067), i.e. an unknown joint is scored as strictly
# as an average COCO joint. Set config.data.keypoints.sigmas for real values
# (the per-joint spread of repeated human annotations, as COCO measured).
DEFAULT_SIGMA = 0.067

COCO_NAMES = (
    'nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear',
    'left_shoulder', 'right_shoulder', 'left_elbow', 'right_elbow',
    'left_wrist', 'right_wrist', 'left_hip', 'right_hip', 'left_knee',
    'right_knee', 'left_ankle', 'right_ankle')
# pycocotools COCOeval.params.kpt_oks_sigmas (= mmpose coco sigmas).
COCO_SIGMAS = (.026, .025, .025, .035, .035, .079, .079, .072, .072, .062,
               .062, .107, .107, .087, .087, .089, .089)
# Limbs as 0-based joint pairs (COCO `skeleton` minus one).
COCO_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12),
    (5, 6), (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2),
    (1, 3), (2, 4), (3, 5), (4, 6))

# CrowdPose: names, sigmas and flip pairs (left_/right_) as mmpose 0.x's
# configs/_base_/datasets/crowdpose.py; the limbs (drawing only) join
# head-neck-shoulders, the arms, the torso and the legs.
CROWDPOSE_NAMES = (
    'left_shoulder', 'right_shoulder', 'left_elbow', 'right_elbow',
    'left_wrist', 'right_wrist', 'left_hip', 'right_hip', 'left_knee',
    'right_knee', 'left_ankle', 'right_ankle', 'top_head', 'neck')
CROWDPOSE_SIGMAS = (0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107,
                    0.087, 0.087, 0.089, 0.089, 0.079, 0.079)
CROWDPOSE_SKELETON = (
    (12, 13), (13, 0), (13, 1), (0, 2), (2, 4), (1, 3), (3, 5), (0, 6),
    (1, 7), (6, 7), (6, 8), (8, 10), (7, 9), (9, 11))


class KeypointSpecError(ValueError):
  """Keypoint metadata that does not fit (message: the file / key)."""


@dataclasses.dataclass(frozen=True)
class KeypointSpec:
  """The keypoints of a dataset (K joints).

  Attributes:
    names: K joint names, in the order of the annotation keypoints.
    flip_index: K ints, the joint mirrored by a horizontal flip.
    skeleton: limbs as 0-based (a, b) joint pairs (drawing only).
    sigmas: K OKS sigmas (COCOeval params.kpt_oks_sigmas).
  """
  names: tuple[str, ...]
  flip_index: tuple[int, ...]
  skeleton: tuple[tuple[int, int], ...]
  sigmas: tuple[float, ...]

  def __post_init__(self):
    k = len(self.names)
    if k == 0:
      raise KeypointSpecError('a keypoint spec needs at least one joint')
    if len(set(self.names)) != k:
      raise KeypointSpecError(f'repeated keypoint names: {self.names}')
    if sorted(self.flip_index) != list(range(k)) or any(
        self.flip_index[j] != i for i, j in enumerate(self.flip_index)):
      raise KeypointSpecError(
          f'flip_index {self.flip_index} is not a pairing of {k} joints')
    if len(self.sigmas) != k or min(self.sigmas) <= 0:
      raise KeypointSpecError(
          f'{len(self.sigmas)} sigmas {self.sigmas} for {k} joints (need '
          f'{k} positive values)')
    for a, b in self.skeleton:
      if not (0 <= a < k and 0 <= b < k):
        raise KeypointSpecError(
            f'skeleton limb ({a}, {b}) (0-based) is outside the {k} joints')

  @property
  def num_joints(self) -> int:
    return len(self.names)


def flip_index_from_names(names: Sequence[str],
                          flip_pairs: Sequence[Sequence[int]] = ()
                          ) -> tuple[int, ...]:
  """Mirror index: `flip_pairs` (0-based) if given, else left_/right_ names.

  A joint named 'left_X' pairs with 'right_X'; joints without a partner
  map to themselves (other naming schemes need `flip_pairs`).
  """
  index = list(range(len(names)))
  if flip_pairs:
    pairs = [tuple(int(v) for v in p) for p in flip_pairs]
  else:
    where = {n: i for i, n in enumerate(names)}
    pairs = [(i, where['right_' + n[5:]]) for i, n in enumerate(names)
             if n.startswith('left_') and 'right_' + n[5:] in where]
  for a, b in pairs:
    if not (0 <= a < len(names) and 0 <= b < len(names)):
      raise KeypointSpecError(
          f'flip pair ({a}, {b}) is outside the {len(names)} joints')
    index[a], index[b] = b, a
  return tuple(index)


def default_sigmas(names: Sequence[str]) -> tuple[float, ...]:
  """COCO's sigma for a COCO joint name, else DEFAULT_SIGMA."""
  coco = dict(zip(COCO_NAMES, COCO_SIGMAS))
  return tuple(coco.get(n, DEFAULT_SIGMA) for n in names)


def make_spec(names: Sequence[str], *, skeleton=(), flip_pairs=(),
              sigmas=(), one_based_skeleton: bool = False) -> KeypointSpec:
  """A spec from names plus optional skeleton / flip pairs / sigmas."""
  names = tuple(str(n) for n in names)
  off = 1 if one_based_skeleton else 0
  limbs = tuple((int(a) - off, int(b) - off) for a, b in skeleton)
  return KeypointSpec(
      names, flip_index_from_names(names, flip_pairs), limbs,
      tuple(float(s) for s in sigmas) if len(sigmas) else
      default_sigmas(names))


COCO = KeypointSpec(COCO_NAMES, flip_index_from_names(COCO_NAMES),
                    COCO_SKELETON, COCO_SIGMAS)
CROWDPOSE = KeypointSpec(CROWDPOSE_NAMES,
                         flip_index_from_names(CROWDPOSE_NAMES),
                         CROWDPOSE_SKELETON, CROWDPOSE_SIGMAS)
BUILTIN = {'coco': COCO, 'crowdpose': CROWDPOSE}

# The COCO spec as arrays, for code written against the 17 joints.
NUM_JOINTS = COCO.num_joints
FLIP_INDEX = np.array(COCO.flip_index, np.int32)


def spec_from_category(category: Mapping[str, Any], *, flip_pairs=(),
                       sigmas=(), skeleton=(), ann_file: str = ''
                       ) -> KeypointSpec:
  """Names and 1-based skeleton from a COCO keypoint category (the dict
  of an annotation file's `categories`); flip pairs / sigmas as given.

  A non-empty `skeleton` (1-based, as COCO) replaces the category's.
  """
  try:
    return make_spec(category['keypoints'],
                     skeleton=skeleton or category.get('skeleton') or (),
                     flip_pairs=flip_pairs, sigmas=sigmas,
                     one_based_skeleton=True)
  except (KeypointSpecError, TypeError, ValueError) as e:
    raise KeypointSpecError(f'{ann_file}: keypoint category: {e}') from None


def spec_from_config(keypoints_config: Mapping[str, Any],
                     category: Mapping[str, Any] | None = None,
                     ann_file: str = '') -> KeypointSpec:
  """config.data.keypoints -> the KeypointSpec.

  source 'coco' / 'crowdpose': the built-in spec; 'annotations': names and
  skeleton from `category`, the person category of the annotation file
  (ae_jax.data.coco.resolve_spec reads it). Flip pairs from `flip_pairs`
  (0-based) else left_/right_ names; sigmas from `sigmas` else COCO's per
  matching name and DEFAULT_SIGMA otherwise; a non-empty `skeleton`
  (1-based, as COCO) replaces the file's / built-in one.
  """
  kp = keypoints_config or {}
  source = kp.get('source', 'coco')
  flip_pairs, sigmas = kp.get('flip_pairs', ()), kp.get('sigmas', ())
  skeleton = kp.get('skeleton', ())
  if source == 'annotations':
    if category is None:
      raise KeypointSpecError("config.data.keypoints.source='annotations' "
                              'needs the annotation file\'s category')
    return spec_from_category(category, flip_pairs=flip_pairs,
                              sigmas=sigmas, skeleton=skeleton,
                              ann_file=ann_file)
  if source not in BUILTIN:
    raise KeypointSpecError(
        f'config.data.keypoints.source {source!r}: one of '
        f"{sorted(BUILTIN) + ['annotations']}")
  spec = BUILTIN[source]
  if flip_pairs or sigmas or skeleton:
    spec = make_spec(spec.names,
                     skeleton=skeleton or tuple((a + 1, b + 1) for a, b in
                                                spec.skeleton),
                     flip_pairs=flip_pairs or tuple(
                         (i, j) for i, j in enumerate(spec.flip_index)
                         if i < j),
                     sigmas=sigmas or spec.sigmas, one_based_skeleton=True)
  return spec


def spec_to_dict(spec: KeypointSpec) -> dict:
  """The spec as json-able lists (what a checkpoint records)."""
  return {'names': list(spec.names), 'flip_index': list(spec.flip_index),
          'skeleton': [list(limb) for limb in spec.skeleton],
          'sigmas': list(spec.sigmas)}


def spec_from_dict(record: Mapping[str, Any]) -> KeypointSpec:
  """Inverse of `spec_to_dict` (KeypointSpecError if it is not one)."""
  try:
    return KeypointSpec(
        tuple(str(n) for n in record['names']),
        tuple(int(i) for i in record['flip_index']),
        tuple((int(a), int(b)) for a, b in record['skeleton']),
        tuple(float(s) for s in record['sigmas']))
  except (KeyError, TypeError, ValueError) as e:
    raise KeypointSpecError(f'not a keypoint spec record ({e})') from None


def spec_difference(have: KeypointSpec, want: KeypointSpec,
                    fields=('names', 'flip_index', 'skeleton', 'sigmas')
                    ) -> str | None:
  """None if the specs agree in `fields`, else '{field} X there, Y here'
  for the first that differs (`have`: a checkpoint's, `want`: asked for)."""
  for name in fields:
    a, b = getattr(have, name), getattr(want, name)
    if a != b:
      return f'{name} {a} there, {b} here'
  return None


# ImageNet normalisation of RGB images in [0, 1] (mmpose NormalizeTensor).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

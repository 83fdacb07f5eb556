"""COCO person keypoints -> raw examples, and image decoding (host side).

The one place for the files of a COCO root (`split_paths`: the annotation
json and image folder of a split), for decoding an image file
(`decode_image`, used by the train pipeline, evaluation and the demo) and
for the keypoint names / skeleton an annotation file lists (`resolve_spec`,
`check_spec_matches`).

Reads a COCO-format root (by default `annotations/person_keypoints_{split}
.json` and `{split}/*.jpg`; other file names via `split_paths`), checked
up front (annotation_file.py: one line naming the file and annotation id),
the way mmpose 0.x `BottomUpCocoDataset` (test_mode False) does:
  * image ids: those with at least one annotation (`getAnnIds(iscrowd=None)`);
  * people kept for targets: `iscrowd == 0 or num_keypoints > 0`;
  * ignore regions (`_get_mask`): crowd segmentations and the segmentations
    of persons with `num_keypoints == 0`, unioned (mmpose sums the decoded
    masks and keeps `m < 0.5`, which is the complement of the union).
On top of mmpose we skip (and count) crowd-only images, which would give an
example without any person (mmpose trains on them as pure negatives).

The ignore union is stored as one compressed COCO RLE per image, so the index
stays small (train2017: ~60 k images) and the mask is rasterised per example
with pycocotools only when an image has ignore regions.

Shapes: P people kept in an image (any number; targets use the first
M=30 for the joint encoding), K joints (the category's; 17 for COCO);
keypoints [P, K, 3] float32 (x, y in image pixels, v in {0, 1, 2}); masks
[H, W] uint8 in {0, 1}.
"""

import collections
import contextlib
import dataclasses
import io
import os
from typing import Any

import cv2
import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import mask as mask_utils

from ae_jax import keypoints
from ae_jax.data import annotation_file
from ae_jax.data.annotation_file import AnnotationError  # pylint: disable=unused-import (coco.AnnotationError)


# Skip reasons reported by the index (static) and by the pipeline (runtime).
NO_PEOPLE = 'no_people'  # no annotation at all (mmpose drops these too)
CROWD_ONLY = 'crowd_only'  # only crowd annotations: no person to learn
MISSING = 'missing_image'  # file absent at read time
CORRUPT = 'corrupt_image'  # file present but not decodable
# Decoded size differs from the annotation's width/height: the file is not
# the annotated image (keypoints and masks would land elsewhere).
SIZE_MISMATCH = 'size_mismatch'

# Keys every annotation must have (mmpose's BottomUpCocoDataset reads them).
def split_paths(coco_root: str, split: str, annotations: str = '',
                images: str = '') -> tuple[str, str]:
  """Files of one split of a COCO root.

  Args:
    coco_root: folder with `annotations/` and `{split}/`.
    split: e.g. 'train2017'.
    annotations: the annotation json, if not the standard one (relative
      paths are taken under coco_root; '{split}' in it is replaced by the
      split); config.data.{train,val}_annotations.
    images: the image folder, likewise (config.data.{train,val}_images).

  Returns:
    (annotation json, default
    `{coco_root}/annotations/person_keypoints_{split}.json`; image folder,
    default `{coco_root}/{split}`).
  """
  ann_file = os.path.join(
      coco_root, annotations.replace('{split}', split) or os.path.join(
          'annotations', f'person_keypoints_{split}.json'))
  return ann_file, os.path.join(coco_root, images.replace('{split}', split)
                                or split)


class ImageError(IOError):
  """An image file that is missing or cannot be decoded (message: the file).

  Attributes:
    reason: MISSING or CORRUPT (the pipeline counts skips by it).
  """

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


def decode_image(path_or_bytes, name: str | None = None) -> np.ndarray:
  """Decodes a JPEG/PNG file (or its bytes) to RGB with cv2, as mmcv does.

  Args:
    path_or_bytes: a file path, or the file's bytes (TFDS records).
    name: file name for error messages (default: the path).

  Returns:
    [H, W, 3] uint8 RGB.

  Raises:
    ImageError: the file cannot be read (MISSING) or is empty or not a
      decodable image (CORRUPT).
  """
  if isinstance(path_or_bytes, (bytes, np.bytes_)):
    data = path_or_bytes
  else:
    name = name or str(path_or_bytes)
    try:
      with open(path_or_bytes, 'rb') as f:
        data = f.read()
    except OSError as e:
      raise ImageError(f'cannot read image {name}: {e.strerror}',
                       MISSING) from None
  buf = np.frombuffer(data, np.uint8)
  # cv2.imdecode asserts on an empty buffer: a zero-byte file is corrupt.
  image = cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB) if buf.size else None
  if image is None:
    raise ImageError(f'cannot decode image {name} ({len(data)} bytes)',
                     CORRUPT)
  return image


@dataclasses.dataclass
class CocoExample:
  """One training image before any transform (what both sources produce).

  Attributes:
    image_id: COCO image id.
    file_name: image file name inside the split folder.
    height: image height from the annotation file (px).
    width: image width (px).
    keypoints: [P, K, 3] float32 keypoints of the kept people.
    ignore_rle: compressed COCO RLE dict ({'size', 'counts' bytes}) of the
      union of ignore regions, or None when the image has none.
  """
  image_id: int
  file_name: str
  height: int
  width: int
  keypoints: np.ndarray
  ignore_rle: dict[str, Any] | None


def build_example(coco: coco_lib.COCO, image_id: int) -> CocoExample:
  """Collects keypoints and the ignore-region RLE of one image (mmpose rules).

  Args:
    coco: a loaded pycocotools COCO object.
    image_id: COCO image id.

  Returns:
    The CocoExample; keypoints may have P == 0 (crowd-only image).
  """
  info = coco.imgs[image_id]
  height, width = int(info['height']), int(info['width'])
  anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
  rles = []
  for ann in anns:
    if 'segmentation' not in ann:
      continue
    if ann['iscrowd'] or ann['num_keypoints'] == 0:
      seg = mask_utils.frPyObjects(ann['segmentation'], height, width)
      rles.extend(seg if isinstance(seg, list) else [seg])
  ignore_rle = mask_utils.merge(rles, intersect=0) if rles else None
  people = [a for a in anns if a['iscrowd'] == 0 or a['num_keypoints'] > 0]
  num_joints = len(people[0]['keypoints']) // 3 if people else 0
  keypoints = np.zeros((len(people), num_joints, 3), np.float32)
  for i, ann in enumerate(people):
    keypoints[i] = np.asarray(ann['keypoints'], np.float32).reshape(-1, 3)
  return CocoExample(image_id, info['file_name'], height, width, keypoints,
                     ignore_rle)


def decode_ignore_mask(ignore_rle: dict[str, Any] | None, height: int,
                       width: int) -> np.ndarray:
  """Rasterises the ignore RLE: [H, W] uint8, 1 = ignore, 0 = train on it."""
  if ignore_rle is None:
    return np.zeros((height, width), np.uint8)
  return np.asarray(mask_utils.decode(ignore_rle), np.uint8)


@dataclasses.dataclass
class CocoIndex:
  """The filtered train split: examples in COCO image-id order.

  Attributes:
    image_dir: folder holding the split's image files.
    examples: the kept examples.
    skipped: reason -> image ids dropped when building the index.
  """
  image_dir: str
  examples: list[CocoExample]
  skipped: dict[str, list[int]]

  def __len__(self) -> int:
    return len(self.examples)

  def image_path(self, i: int) -> str:
    return os.path.join(self.image_dir, self.examples[i].file_name)


class ExampleSource:
  """Random access to raw train examples: annotations + image file or bytes.

  Built from a CocoIndex (json) or from TFDS records (tfds_coco.py); the
  pipeline reads both the same way.
  """

  def __init__(self, examples, image_dir: str = '', image_bytes=None):
    self.examples = examples  # sequence of CocoExample
    self.image_dir = image_dir
    self._image_bytes = image_bytes  # callable i -> bytes (TFDS source)

  def __len__(self) -> int:
    return len(self.examples)

  def image(self, i: int):
    """The path of example i's image file, or its bytes (TFDS)."""
    if self._image_bytes is not None:
      return self._image_bytes(i)
    return os.path.join(self.image_dir, self.examples[i].file_name)


def filter_examples(coco: coco_lib.COCO):
  """Yields (image_id, CocoExample | skip reason) for every image id."""
  for image_id in sorted(coco.getImgIds()):
    if not coco.getAnnIds(imgIds=image_id, iscrowd=None):
      yield image_id, NO_PEOPLE
      continue
    example = build_example(coco, image_id)
    if not example.keypoints.shape[0]:
      yield image_id, CROWD_ONLY
      continue
    yield image_id, example


def check_root(coco_root: str) -> None:
  """FileNotFoundError (one line, naming the config key) if it is absent."""
  if not os.path.isdir(coco_root):
    raise FileNotFoundError(
        f'COCO root not found: {coco_root} (config.data.coco_root)')


def check_split_files(coco_root: str, split: str, annotations: str = '',
                      images: str = '', key: str = '') -> tuple[str, str]:
  """The split's annotation file and image folder (split_paths), checked.

  Args:
    coco_root, split, annotations, images: as split_paths.
    key: 'train' or 'val': the config keys to name (config.data.{key}_split,
      _annotations, _images); '' names none.

  Raises:
    FileNotFoundError: coco_root, the annotation file or the image folder
      is missing (named).
  """
  check_root(coco_root)
  ann_file, image_dir = split_paths(coco_root, split, annotations, images)
  keys = (f' (config.data.{key}_split = {split!r}, {key}_annotations, '
          f'{key}_images)') if key else ''
  if not os.path.isfile(ann_file):
    raise FileNotFoundError(f'COCO annotation file not found: {ann_file}'
                            + keys)
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f'COCO image folder not found: {image_dir}'
                            + keys)
  return ann_file, image_dir


def read_category(ann_file: str) -> dict:
  """The keypoint category (id 1 or the only one) of an annotation file."""
  if not os.path.isfile(ann_file):
    raise FileNotFoundError(f'annotation file not found: {ann_file}')
  dataset = annotation_file.read_annotations(ann_file)
  cats = [c for c in dataset.get('categories') or () if c.get('keypoints')]
  if not cats:
    raise keypoints.KeypointSpecError(
        f'{ann_file}: no category lists "keypoints"')
  return ([c for c in cats if c.get('id') == 1] or cats)[0]


def resolve_spec(data_config, split: str = 'train',
                 split_name: str | None = None) -> keypoints.KeypointSpec:
  """config.data -> the KeypointSpec (`keypoints.spec_from_config`).

  For config.data.keypoints.source 'annotations' the names and skeleton
  come from the person category of the `split` ('train' or 'val')
  annotation file (`split_paths`; `split_name` overrides
  config.data.{split}_split, e.g. eval.py --split).
  """
  kp = data_config.get('keypoints') or {}
  if kp.get('source', 'coco') != 'annotations':
    return keypoints.spec_from_config(kp)
  ann_file = _annotation_file(data_config, split, split_name)
  return keypoints.spec_from_config(kp, read_category(ann_file), ann_file)


def check_spec_matches(data_config, split_name: str,
                       spec: keypoints.KeypointSpec, source: str) -> None:
  """Raises KeypointSpecError unless the `split_name` annotation file lists
  `spec`'s joints, by name and in order (the model's channel order).

  `source` names where `spec` came from (a checkpoint) in the message.
  """
  ann_file = _annotation_file(data_config, 'val', split_name)
  names = tuple(read_category(ann_file)['keypoints'])
  if names == spec.names:
    return
  i = next((i for i, (a, b) in enumerate(zip(names, spec.names)) if a != b),
           None)
  where = (f'joint {i} is {names[i]!r} there, {spec.names[i]!r} in the '
           'checkpoint' if len(names) == spec.num_joints else
           f'{len(names)} joints ({", ".join(names)}), the checkpoint head '
           f'predicts {spec.num_joints} joints')
  raise keypoints.KeypointSpecError(
      f'{ann_file} does not list the joints of {source}: {where} '
      f'({", ".join(spec.names)}); its predictions would be scored against '
      'other joints')


def _annotation_file(data_config, split: str, split_name: str | None) -> str:
  if split not in ('train', 'val'):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  check_root(data_config['coco_root'])
  ann_file, _ = split_paths(
      data_config['coco_root'], split_name or data_config[f'{split}_split'],
      data_config.get(f'{split}_annotations', ''))
  return ann_file


def load_coco(coco_root: str, split: str, annotations: str = '',
              num_joints: int | None = None
              ) -> coco_lib.COCO:
  """The split's keypoint annotations (pycocotools), checked.

  Args:
    coco_root, split, annotations: as `split_paths`.
    num_joints: the keypoints trained on / evaluated (checked), if given.

  Raises:
    FileNotFoundError: coco_root or the annotation file is missing (named).
    AnnotationError: malformed json (file and annotation id named).
  """
  check_root(coco_root)
  ann_file, _ = split_paths(coco_root, split, annotations)
  if not os.path.isfile(ann_file):
    raise FileNotFoundError(f'COCO annotation file not found: {ann_file}')
  dataset = annotation_file.read_annotations(ann_file)
  annotation_file.check_annotations(dataset, ann_file, num_joints)
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints
    coco = coco_lib.COCO()
    coco.dataset = dataset
    coco.createIndex()
  return coco


def load_coco_index(coco_root: str, split: str, annotations: str = '',
                    images: str = '',
                    num_joints: int | None = None
                    ) -> CocoIndex:
  """Loads and filters the person-keypoint annotations of one split.

  Args:
    coco_root: folder with `annotations/` and `{split}/`.
    split: e.g. 'train2017'.
    annotations, images: other files than the standard ones (split_paths).
    num_joints: the keypoints trained on (the annotations are checked).

  Returns:
    The CocoIndex (image files are not opened here; a missing, corrupt or
    wrongly sized file is found and counted by the pipeline when read).

  Raises:
    FileNotFoundError: coco_root, the annotation file or image folder is
      missing.
    AnnotationError: a malformed annotation file, or no image with people.
    ImageError: none of the images tried can be read (check_some_readable).
  """
  ann_file, image_dir = check_split_files(coco_root, split, annotations,
                                          images)
  coco = load_coco(coco_root, split, annotations, num_joints)
  examples, skipped = [], collections.defaultdict(list)
  for image_id, item in filter_examples(coco):
    if isinstance(item, str):
      skipped[item].append(image_id)
    else:
      examples.append(item)
  if not examples:
    raise AnnotationError(
        f'{ann_file}: no training image with people (' + ', '.join(
            f'{len(ids)} {reason}' for reason, ids in skipped.items())
        + '; crowd annotations and people without keypoints are masked, '
        'not trained on)')
  index = CocoIndex(image_dir, examples, dict(skipped))
  check_some_readable(index)
  return index


def check_some_readable(index: CocoIndex, tries: int = 8) -> None:
  """Raises ImageError if none of `tries` images spread over the index
  decodes: a wrong image folder or placeholder files (zero bytes, LFS
  pointers), which would otherwise fail later, inside the input pipeline.
  One readable image ends the check (a few broken files are replaced and
  counted by the pipeline)."""
  n = len(index)
  count = min(tries, n)
  errors = []
  for i in (k * n // count for k in range(count)):
    try:
      decode_image(index.image_path(i), index.examples[i].file_name)
      return
    except ImageError as e:
      errors.append(e)
  raise ImageError(
      f'{len(errors)} of {len(errors)} images tried in {index.image_dir} '
      f'could not be read ({errors[0]}, ...); check config.data.coco_root '
      'and the image folder', errors[0].reason)

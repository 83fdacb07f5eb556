"""COCO person keypoints -> raw examples, and image decoding (host side).

The one place for the files of a COCO root (`split_paths`: the annotation
json and image folder of a split) and for decoding an image file
(`decode_image`, used by the train pipeline, evaluation and the demo).

Reads a standard COCO root (`annotations/person_keypoints_{split}.json` and
`{split}/*.jpg`) the way mmpose 0.x `BottomUpCocoDataset` (test_mode False)
does:
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
M=30 for the joint encoding), K=17 joints; keypoints [P, K, 3] float32
(x, y in image pixels, v in {0, 1, 2}); masks [H, W] uint8 in {0, 1}.
"""

import collections
import dataclasses
import os
from typing import Any

import cv2
import numpy as np
from pycocotools import coco as coco_lib
from pycocotools import mask as mask_utils

from ae_jax.keypoints import NUM_JOINTS

# Skip reasons reported by the index (static) and by the pipeline (runtime).
NO_PEOPLE = 'no_people'  # no annotation at all (mmpose drops these too)
CROWD_ONLY = 'crowd_only'  # only crowd annotations: no person to learn
MISSING = 'missing_image'  # file absent at read time
CORRUPT = 'corrupt_image'  # file present but not decodable


def split_paths(coco_root: str, split: str) -> tuple[str, str]:
  """Files of one split of a COCO root.

  Args:
    coco_root: folder with `annotations/` and `{split}/`.
    split: e.g. 'train2017'.

  Returns:
    (annotation json `{coco_root}/annotations/person_keypoints_{split}.json`,
    image folder `{coco_root}/{split}`).
  """
  return (os.path.join(coco_root, 'annotations',
                       f'person_keypoints_{split}.json'),
          os.path.join(coco_root, split))


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
  keypoints = np.zeros((len(people), NUM_JOINTS, 3), np.float32)
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


def load_coco(coco_root: str, split: str) -> coco_lib.COCO:
  """The split's keypoint annotations (pycocotools); a clear error if absent.

  Raises:
    FileNotFoundError: the annotation file is missing (named).
  """
  ann_file, _ = split_paths(coco_root, split)
  if not os.path.isfile(ann_file):
    raise FileNotFoundError(f'COCO annotation file not found: {ann_file}')
  return coco_lib.COCO(ann_file)


def load_coco_index(coco_root: str, split: str) -> CocoIndex:
  """Loads and filters the person-keypoint annotations of one split.

  Args:
    coco_root: folder with `annotations/` and `{split}/`.
    split: e.g. 'train2017'.

  Returns:
    The CocoIndex (image files are not opened here; a missing or corrupt
    file is found and counted by the pipeline when it is read).

  Raises:
    FileNotFoundError: the annotation file or image folder is missing.
    ValueError: no usable image in the split.
  """
  ann_file, image_dir = split_paths(coco_root, split)
  if os.path.isfile(ann_file) and not os.path.isdir(image_dir):
    raise FileNotFoundError(f'COCO image folder not found: {image_dir}')
  coco = load_coco(coco_root, split)
  examples, skipped = [], collections.defaultdict(list)
  for image_id, item in filter_examples(coco):
    if isinstance(item, str):
      skipped[item].append(image_id)
    else:
      examples.append(item)
  if not examples:
    raise ValueError(f'No training image with people in {ann_file}')
  return CocoIndex(image_dir, examples, dict(skipped))

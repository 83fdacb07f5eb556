"""Evaluation input: every image of a COCO split, decoded RGB, in id order.

mmpose's bottom-up test set is all images of the split (val2017: 5000),
people or not. Images are read with cv2 (as mmcv does) and converted to RGB.
A missing or undecodable file is not fatal: it is logged by name, counted in
`EvalImages.skipped` and left out (its ground truth still counts in AP).

Shapes: image [H, W, 3] uint8 RGB, pixels 0-255.
"""

import concurrent.futures
import dataclasses
import os
from typing import Iterator, List, NamedTuple, Optional, Tuple

from absl import logging
import cv2
import numpy as np
from pycocotools import coco as coco_api


class ImageError(IOError):
  """An image file that is missing or cannot be decoded."""


class EvalExample(NamedTuple):
  image_id: int
  file_name: str
  image: np.ndarray  # [H, W, 3] uint8 RGB


def annotation_path(coco_root: str, split: str) -> str:
  """Path of the person keypoints json of `split` under `coco_root`."""
  return os.path.join(coco_root, 'annotations',
                      f'person_keypoints_{split}.json')


def load_coco(coco_root: str, split: str) -> coco_api.COCO:
  """Loads the split's keypoint annotations; a clear error if absent."""
  path = annotation_path(coco_root, split)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'COCO annotation file not found: {path}')
  return coco_api.COCO(path)


def decode_image(path: str) -> np.ndarray:
  """Reads an image file as [H, W, 3] uint8 RGB; ImageError names the file."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise ImageError(f'cannot read image {path}: {e.strerror}') from None
  image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if image is None:
    raise ImageError(f'cannot decode image {path} ({len(data)} bytes)')
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclasses.dataclass
class EvalImages:
  """Iterable over (image_id, file_name, image) of a COCO split.

  Decoding runs in `num_threads` threads, up to `prefetch` images ahead
  (cv2 releases the GIL while decoding).

  Attributes:
    coco: the split's COCO api object (ground truth for scoring).
    image_ids: ids in ascending order, optionally the first `max_images`.
    skipped: (file_name, reason) of images that could not be read, filled
      during iteration.
  """
  coco_root: str
  split: str = 'val2017'
  max_images: Optional[int] = None
  num_threads: int = 2
  prefetch: int = 8

  def __post_init__(self):
    self.coco = load_coco(self.coco_root, self.split)
    ids = sorted(self.coco.getImgIds())
    if self.max_images is not None:
      ids = ids[:self.max_images]
    self.image_ids: List[int] = ids
    self.image_dir = os.path.join(self.coco_root, self.split)
    self.skipped: List[Tuple[str, str]] = []

  def __len__(self) -> int:
    return len(self.image_ids)

  def _load(self, image_id: int):
    name = self.coco.imgs[image_id]['file_name']
    try:
      return name, decode_image(os.path.join(self.image_dir, name)), None
    except ImageError as e:
      return name, None, str(e)

  def __iter__(self) -> Iterator[EvalExample]:
    self.skipped = []
    with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
      pending = []
      ids = iter(self.image_ids)
      for image_id in ids:
        pending.append((image_id, pool.submit(self._load, image_id)))
        if len(pending) >= self.prefetch:
          break
      while pending:
        image_id, future = pending.pop(0)
        nxt = next(ids, None)
        if nxt is not None:
          pending.append((nxt, pool.submit(self._load, nxt)))
        name, image, error = future.result()
        if error is not None:
          logging.warning('Skipping image %s (id %d): %s', name, image_id,
                          error)
          self.skipped.append((name, error))
          continue
        yield EvalExample(image_id, name, image)

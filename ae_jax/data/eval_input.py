"""Evaluation input: every image of a COCO split, decoded RGB, in id order.

mmpose's bottom-up test set is all images of the split (val2017: 5000),
people or not. Images are decoded by `coco.decode_image` (cv2, as mmcv,
RGB), the decoder the train pipeline uses. A missing, empty or undecodable
file, or one whose size is not the annotation's width/height, is not
fatal: it is logged by name, counted in `EvalImages.skipped` and left out
(its ground truth still counts in AP).

Shapes: image [H, W, 3] uint8 RGB, pixels 0-255.
"""

import concurrent.futures
import dataclasses
import os
from typing import Iterator, List, NamedTuple, Optional, Tuple

from absl import logging
import numpy as np

from ae_jax.data import coco as coco_lib


class EvalExample(NamedTuple):
  image_id: int
  file_name: str
  image: np.ndarray  # [H, W, 3] uint8 RGB


@dataclasses.dataclass
class EvalImages:
  """Iterable over (image_id, file_name, image) of a COCO split.

  Decoding runs in `num_threads` threads, up to `prefetch` images ahead
  (cv2 releases the GIL while decoding).

  Attributes:
    coco: the split's COCO api object (ground truth for scoring).
    all_image_ids: ids in ascending order, optionally the first
      `max_images`.
    image_ids: this process's share of them (`shard` = (index, count):
      every count-th id from index).
    skipped: (file_name, reason) of images that could not be read, filled
      during iteration.
  """
  coco_root: str
  split: str = 'val2017'
  max_images: Optional[int] = None
  num_threads: int = 2
  prefetch: int = 8
  annotations: str = ''  # other files than the standard ones (split_paths)
  images: str = ''
  num_joints: Optional[int] = None  # checked against the annotations
  shard: Tuple[int, int] = (0, 1)

  def __post_init__(self):
    self.coco = coco_lib.load_coco(self.coco_root, self.split,
                                   self.annotations, self.num_joints)
    ids = sorted(self.coco.getImgIds())
    if self.max_images is not None:
      ids = ids[:self.max_images]
    self.all_image_ids: List[int] = ids
    index, count = self.shard
    self.image_ids: List[int] = ids[index::count]
    _, self.image_dir = coco_lib.split_paths(self.coco_root, self.split,
                                             self.annotations, self.images)
    self.skipped: List[Tuple[str, str]] = []

  def __len__(self) -> int:
    return len(self.image_ids)

  def _load(self, image_id: int):
    info = self.coco.imgs[image_id]
    name = info['file_name']
    try:
      image = coco_lib.decode_image(os.path.join(self.image_dir, name))
    except coco_lib.ImageError as e:
      return name, None, str(e)
    if image.shape[:2] != (info['height'], info['width']):
      return name, None, (
          f'{coco_lib.SIZE_MISMATCH}: {image.shape[1]}x{image.shape[0]} '
          f'file, {info["width"]}x{info["height"]} in the annotations')
    return name, image, None

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

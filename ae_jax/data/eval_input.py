"""Test-time input: COCO split images and their resize-align per scale.

`EvalImages`: every image of a split, decoded RGB, in id order. mmpose's
bottom-up test set is all images of the split (val2017: 5000), people or
not. Images are decoded by `coco.decode_image` (cv2, as mmcv, RGB), the
decoder the train pipeline uses. A missing, empty or undecodable file, or
one whose size is not the annotation's width/height, is not fatal: it is
logged by name, counted in `EvalImages.skipped` and left out (its ground
truth still counts in AP).

`resize_inputs`: mmpose 0.x's BottomUpGetImgSize + BottomUpResizeAlign.
Each test scale's input is the image warped (cv2 bilinear, OpenCV 4's
arithmetic) so that its short side is input_size x scale and its long side
a multiple of 64 (the min-scale alignment rule); center / scale of the
scale-1 size map the results back to the image. numpy / cv2 only, so an
exported model's predictor can share it.

Shapes: image [H, W, 3] uint8 RGB, pixels 0-255; H_s x W_s one scale's
input (multiples of 64).
"""

import concurrent.futures
import dataclasses
import math
import os
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import cv2
import numpy as np

from ae_jax.data import affine
from ae_jax.data import coco as coco_lib

BASE_LENGTH = 64  # Input sides are multiples of this (stride 32, x2 margin).


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


def _ceil_to_multiple(x: float, base: int) -> int:
  return int(math.ceil(x / base)) * base


def get_multi_scale_size(height: int, width: int, input_size: int,
                         current_scale: float, min_scale: float,
                         base_length: int = BASE_LENGTH):
  """Input size, center and scale for one test scale (mmpose's rule).

  The short side becomes ceil64(input_size x min_scale) x current_scale /
  min_scale; the long side keeps the aspect ratio, rounded up to a multiple
  of base_length at min_scale, then scaled the same way.

  Returns:
    (w_resized, h_resized), center [2] (x, y) px, scale [2] (w, h) in 200 px
    units of the image region that maps onto the resized input.
  """
  min_input = _ceil_to_multiple(min_scale * input_size, base_length)
  ratio = current_scale / min_scale
  if width < height:
    w_resized = int(min_input * ratio)
    h_resized = int(
        _ceil_to_multiple(min_input / width * height, base_length) * ratio)
    scale_w = width / 200.0
    scale_h = h_resized / w_resized * width / 200.0
  else:
    h_resized = int(min_input * ratio)
    w_resized = int(
        _ceil_to_multiple(min_input / height * width, base_length) * ratio)
    scale_h = height / 200.0
    scale_w = w_resized / h_resized * height / 200.0
  # Python's round (half to even), as mmpose.
  center = np.array([round(width / 2.0), round(height / 2.0)], np.float64)
  return (w_resized, h_resized), center, np.array([scale_w, scale_h])


def resize_align(image: np.ndarray, input_size: int, current_scale: float,
                 min_scale: float) -> np.ndarray:
  """Warps [H, W, 3] uint8 to its test size for one scale (cv2 bilinear)."""
  size, center, scale = get_multi_scale_size(
      image.shape[0], image.shape[1], input_size, current_scale, min_scale)
  matrix = affine.get_affine_transform(center, scale, 0, size)
  return cv2.warpAffine(image, matrix, size)


@dataclasses.dataclass(frozen=True)
class ScaledInputs:
  """One image's model inputs and what maps results back to it.

  images: one [H_s, W_s, 3] uint8 input per scale, in the scales' order.
  center: [2] (x, y) image px and scale: [2] (w, h) in 200 px units, of
    the scale-1 input (decode.transform_to_image).
  base_hw: (H_1, W_1) the scale-1 input size (project2image's target).
  """
  images: Tuple[np.ndarray, ...]
  center: np.ndarray
  scale: np.ndarray
  base_hw: Tuple[int, int]

  @property
  def shapes(self) -> Tuple[Tuple[int, ...], ...]:
    """The input shapes: images of equal shapes batch together."""
    return tuple(x.shape for x in self.images)


def resize_inputs(image: np.ndarray, input_size: int,
                  scales: Sequence[float]) -> ScaledInputs:
  """[H, W, 3] uint8 RGB -> its ScaledInputs at each of `scales`."""
  min_scale = min(scales)
  (base_w, base_h), center, scale = get_multi_scale_size(
      image.shape[0], image.shape[1], input_size, 1.0, min_scale)
  images = tuple(resize_align(image, input_size, s, min_scale)
                 for s in scales)
  return ScaledInputs(images, center, scale, (base_h, base_w))

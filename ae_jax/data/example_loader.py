"""The per-example host work of the train input: one image -> one example.

`ExampleLoader` reads and decodes an image (the next usable one if it is
missing, corrupt or not the annotated size), rasterises its ignore mask,
warps image and mask (mmpose's affine) and flips: what each input worker
process runs per example (pipeline.py). cv2 releases the GIL in the heavy
calls and is the decoder/warp mmpose uses, so images and masks match it
exactly; the targets are rendered on device from the keypoints.

Replacements are reported through a `skips` object: `SkipLog` collects a
batch's in a worker, `SkipCounter` counts them in the training process
and logs each file once.

Shapes: image [H, W, 3] uint8 RGB 0-255 (input size), mask [h, w] uint8
{0, 1} (1 = train on the pixel), keypoints [M, K, 3] float32 (x, y, v) in
heatmap pixels, the first M people of the image, zero padded.
"""

import collections
import threading

from absl import logging
import numpy as np

from ae_jax import keypoints as keypoints_lib
from ae_jax.data import coco as coco_lib
from ae_jax.data import transforms
from ae_jax.data import workers as workers_lib

_MAX_REPLACEMENTS = 64  # consecutive unreadable images before giving up


class InputDataError(RuntimeError):
  """Too many consecutive images could not be used (the data is broken)."""


class SkipCounter:
  """Thread-safe counts of replaced examples by reason (logs each file once).

  Attributes:
    counts: reason -> replacements so far.
    files: file name -> reason, every file replaced so far.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self.counts = collections.Counter()
    self.files: dict[str, str] = {}

  def add(self, reason: str, name: str, n: int = 1, detail: str = '') -> None:
    with self._lock:
      self.counts[reason] += n
      if name not in self.files:
        self.files[name] = reason
        logging.warning('Skipping %s (%s%s): replaced by the next image.',
                        name, reason, f': {detail}' if detail else '')


class CompactExamples:
  """A list of CocoExample held in a few flat arrays (picklable, small).

  Every input worker holds the whole train index: as Python objects that
  is ~3 KB per image (~200 MB per worker for train2017), as arrays little
  more than the keypoints themselves. `[i]` rebuilds example i.

  Args:
    examples: the CocoExamples (coco.load_coco_index's order).
  """

  def __init__(self, examples):
    people = [len(ex.keypoints) for ex in examples]
    self._people = np.concatenate([[0], np.cumsum(people)]).astype(np.int64)
    joints = examples[0].keypoints.shape[1] if examples else 0
    self._keypoints = (np.concatenate([ex.keypoints for ex in examples])
                       if examples else np.zeros((0, joints, 3), np.float32))
    self._info = np.array([(ex.image_id, ex.height, ex.width)
                           for ex in examples], np.int64).reshape(-1, 3)
    names = [ex.file_name.encode() for ex in examples]
    rles = [ex.ignore_rle['counts'] if ex.ignore_rle else b''
            for ex in examples]
    self._names, self._name_at = _pack(names)
    self._rles, self._rle_at = _pack(rles)

  def __len__(self) -> int:
    return len(self._info)

  def __getitem__(self, i: int) -> coco_lib.CocoExample:
    image_id, height, width = (int(v) for v in self._info[i])
    counts = self._rles[self._rle_at[i]:self._rle_at[i + 1]]
    return coco_lib.CocoExample(
        image_id, self._names[self._name_at[i]:self._name_at[i + 1]].decode(),
        height, width,
        self._keypoints[self._people[i]:self._people[i + 1]],
        {'size': [height, width], 'counts': counts} if counts else None)


def _pack(items: list[bytes]) -> tuple[bytes, np.ndarray]:
  """(the items joined, [n + 1] start offsets)."""
  return b''.join(items), np.concatenate(
      [[0], np.cumsum([len(b) for b in items])]).astype(np.int64)


class ExampleLoader:
  """Index + augmentation draws -> one train example (picklable, host cv2).

  Decode, affine and flip run in cv2/numpy (GIL-free in the heavy calls,
  the decoder and warps mmpose uses, so images and masks match it
  exactly); the targets are rendered on device from the keypoints.
  """

  def __init__(self, source: coco_lib.ExampleSource, *,
               input_wh: tuple[int, int], heatmap_wh: tuple[int, int],
               scale_type: str, trans_factor: float, max_people: int,
               flip_index=keypoints_lib.COCO.flip_index):
    """See make_loader."""
    self.source = source
    self.input_wh, self.heatmap_wh = tuple(input_wh), tuple(heatmap_wh)
    self.scale_type, self.trans_factor = scale_type, trans_factor
    self.max_people = max_people
    self.flip_index = tuple(int(j) for j in flip_index)

  def _read(self, i: int, skips, step: int):
    """(example, decoded image) of the first usable image from index i."""
    for _ in range(_MAX_REPLACEMENTS):
      ex = self.source.examples[i]
      workers_lib.note(step, ex.file_name)
      try:
        image = coco_lib.decode_image(self.source.image(i), ex.file_name)
        if image.shape[:2] == (ex.height, ex.width):
          return ex, image
        # Not the annotated image: its keypoints and masks would land
        # elsewhere (or outside), so it is replaced like an unreadable one.
        skips.add(coco_lib.SIZE_MISMATCH, ex.file_name, detail=(
            f'{image.shape[1]}x{image.shape[0]} file, {ex.width}x'
            f'{ex.height} in the annotations'))
      except coco_lib.ImageError as e:
        skips.add(e.reason, ex.file_name)
      i = (i + 1) % len(self.source)
    raise InputDataError(
        f'{_MAX_REPLACEMENTS} consecutive COCO images could not be read or '
        f'had the wrong size (last: {ex.file_name}); check the data.')

  def __call__(self, index: int, params, skips, step: int = -1):
    """Loads example `index` (or its replacement) with draws `params`.

    Args:
      index: example index in the source.
      params: [5] (rot, scale, u_dx, u_dy, flip), `sample_augmentation`.
      skips: `.add(reason, name, detail=...)` for each replaced image.
      step: the batch being made (named if the process dies here).

    Returns:
      image [H, W, 3] uint8, mask [h, w] uint8, keypoints [M, K, 3]
      float32 in heatmap pixels.
    """
    ex, image = self._read(int(index), skips, step)
    height, width = image.shape[:2]
    ignore = coco_lib.decode_ignore_mask(ex.ignore_rle, ex.height, ex.width)
    rot, scale, u_dx, u_dy, flip = (float(v) for v in params)
    aug = transforms.AugParams(
        rot=rot, scale=scale,
        dx=transforms.shift_from_uniform(u_dx, width, scale,
                                         self.trans_factor),
        dy=transforms.shift_from_uniform(u_dy, height, scale,
                                         self.trans_factor),
        flip=flip > 0.5)
    out, mask, joints = transforms.transform_example(
        image, ignore, ex.keypoints[:self.max_people], aug, self.input_wh,
        self.heatmap_wh, self.scale_type, self.flip_index)
    keypoints = np.zeros((self.max_people, len(self.flip_index), 3),
                         np.float32)
    keypoints[:joints.shape[0]] = joints
    return out, mask, keypoints


def make_loader(source: coco_lib.ExampleSource, *, input_wh, heatmap_wh,
                scale_type: str, trans_factor: float, max_people: int,
                flip_index=keypoints_lib.COCO.flip_index) -> ExampleLoader:
  """The per-example host work (what the workers run for each example).

  Args:
    source: the examples.
    input_wh: network input (W, H).
    heatmap_wh: target map (w, h).
    scale_type: 'short' or 'long'.
    trans_factor: max center shift (mmpose units), 0 = none.
    max_people: M, the people kept (the first M of the image).
    flip_index: [K] mirrored joint of each joint (KeypointSpec.flip_index).

  Returns:
    load(index, params, skips, step=-1) -> (image [H, W, 3] uint8,
    mask [h, w] uint8, keypoints [M, K, 3] float32 in heatmap pixels).
  """
  return ExampleLoader(source, input_wh=input_wh, heatmap_wh=heatmap_wh,
                       scale_type=scale_type, trans_factor=trans_factor,
                       max_people=max_people, flip_index=flip_index)


class SkipLog:
  """The replacements made while loading one batch (in a worker)."""

  def __init__(self):
    self.entries = []

  def add(self, reason: str, name: str, n: int = 1, detail: str = ''):
    self.entries.extend([(reason, name, detail)] * n)

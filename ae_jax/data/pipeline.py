"""The AE training input pipeline on tf.data (deterministic, resumable).

Stream layout: epoch e is a permutation of the N kept examples, drawn from
(seed, e); epochs are concatenated into one infinite stream of global
positions g = e * N + j (batches may span an epoch boundary, nothing is
dropped). Global batch s holds positions [s * B, (s + 1) * B); host p of
P takes the slice [p * b, (p + 1) * b) of it (b = B / P). The augmentation
of position g is drawn from (seed, g). Resuming at start_step therefore
starts the permutation of epoch (start_step * B) // N at its offset, with
no image read for the skipped part.

A missing, corrupt or wrongly sized image (decoded size != the
annotation's width/height: not the annotated image) is not dropped (that
would shift every later batch and break resume): the example is replaced
by the next usable image in index order, with its own annotations, so
targets stay right. Each such replacement is counted per reason and logged
(absl) once per file.

Host work per example (one tf.numpy_function, `make_loader`): read and
decode, ignore mask, the two warps, the flip; cv2 releases the GIL in all
the heavy calls (~85% of the loader's time), so the parallel map's threads
scale with the cores until the GIL-held rest (~0.9 ms per 512/128 example
on the 2-core CI machine, about 1.1k img/s) saturates one core (measured in
bench/RESULTS_pipeline.md). The targets (heatmaps, joint encodings) are
rendered on device inside the jitted step from the padded keypoints
(device_targets.render_targets), which keeps their rendering off the host
and 1.1 of the 2.0 MB per 512/128 example off the host->device link.

Train batch (host-local numpy dict), b = global_batch // process_count,
H x W the input size and h x w the heatmap size (config.data.input_size /
heatmap_size: an int for square, or (w, h) as mmpose's image_size; the
heatmap size is the input size / 4, checked by transforms.train_sizes):
  'image'     [b, H, W, 3] uint8 RGB 0-255; the ImageNet normalisation runs
              on device inside the jitted train step
              (models/ae_model.normalize_images), which keeps the host copies
              and the host->device transfer 4x smaller than float32
  'mask'      [b, h, w]    uint8, 1 = train on the pixel, 0 = ignore
  'keypoints' [b, M, K, 3] float32 (x, y, v) in heatmap pixels after the
              affine and flip: the first M people, zero padded (v = 0)
"""

import collections
import threading
from typing import Iterator

from absl import logging
import numpy as np
import tensorflow as tf

from ae_jax.data import coco as coco_lib
from ae_jax.data import transforms
from ae_jax import keypoints as keypoints_lib

_MAX_REPLACEMENTS = 64  # consecutive unreadable images before giving up
_SALT_PERMUTATION = 0x5EED
_SALT_AUGMENT = 0xA06


class SkipCounter:
  """Thread-safe counts of skipped examples by reason (logs each file once)."""

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


def make_loader(source: coco_lib.ExampleSource, skips: SkipCounter, *,
                input_wh: tuple[int, int], heatmap_wh: tuple[int, int],
                scale_type: str, trans_factor: float, max_people: int,
                flip_index=keypoints_lib.COCO.flip_index):
  """Builds the host function for tf.numpy_function.

  Decode, affine and flip run here in cv2/numpy: on one core this beat
  the TF-graph alternatives (see transforms.py); the targets are rendered
  on device from the keypoints returned (device_targets.py).

  Args:
    source: the examples.
    skips: counts the unreadable images replaced.
    input_wh: network input (W, H).
    heatmap_wh: target map (w, h).
    scale_type: 'short' or 'long'.
    trans_factor: max center shift (mmpose units), 0 = none.
    max_people: M, the people kept (the first M of the image).
    flip_index: [K] mirrored joint of each joint (KeypointSpec.flip_index).

  Returns:
    fn(index, rot, scale, u_dx, u_dy, flip) -> (image [H, W, 3] uint8,
    mask [h, w] uint8, keypoints [M, K, 3] float32 in heatmap pixels).
  """

  def load(index, rot, scale, u_dx, u_dy, flip):
    i = int(index)
    for _ in range(_MAX_REPLACEMENTS):
      ex = source.examples[i]
      try:
        image = coco_lib.decode_image(source.image(i), ex.file_name)
        if image.shape[:2] == (ex.height, ex.width):
          break
        # Not the annotated image: its keypoints and masks would land
        # elsewhere (or outside), so it is replaced like an unreadable one.
        skips.add(coco_lib.SIZE_MISMATCH, ex.file_name, detail=(
            f'{image.shape[1]}x{image.shape[0]} file, {ex.width}x'
            f'{ex.height} in the annotations'))
      except coco_lib.ImageError as e:
        skips.add(e.reason, ex.file_name)
      i = (i + 1) % len(source)
    else:
      raise RuntimeError(f'{_MAX_REPLACEMENTS} consecutive COCO images could '
                         f'not be read or had the wrong size (last: '
                         f'{ex.file_name}); check the data.')
    height, width = image.shape[:2]
    ignore = coco_lib.decode_ignore_mask(ex.ignore_rle, ex.height, ex.width)
    s = float(scale)
    aug = transforms.AugParams(
        rot=float(rot), scale=s,
        dx=transforms.shift_from_uniform(float(u_dx), width, s, trans_factor),
        dy=transforms.shift_from_uniform(float(u_dy), height, s, trans_factor),
        flip=bool(flip > 0.5))
    out, mask, joints = transforms.transform_example(
        image, ignore, ex.keypoints[:max_people], aug, input_wh, heatmap_wh,
        scale_type, flip_index)
    keypoints = np.zeros((max_people, len(flip_index), 3), np.float32)
    keypoints[:joints.shape[0]] = joints
    return out, mask, keypoints

  return load


class TrainDataset:
  """Iterable of host-local train batches; see module docstring.

  Attributes:
    num_examples: train images per epoch after filtering (lr schedule).
    skipped_in_index: reason -> image ids dropped from the split.
    skips: runtime replacements (missing/corrupt files), by reason.
    dataset: the underlying tf.data.Dataset of batches.
  """

  def __init__(self, dataset, num_examples: int, skipped_in_index, skips):
    self.dataset = dataset
    self.num_examples = num_examples
    self.skipped_in_index = skipped_in_index
    self.skips = skips

  @property
  def skipped(self) -> dict[str, int]:
    """All skip counts so far: index filtering + runtime replacements."""
    counts = {k: len(v) for k, v in self.skipped_in_index.items()}
    for k, v in self.skips.counts.items():
      counts[k] = counts.get(k, 0) + v
    return counts

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.dataset.as_numpy_iterator()


def sample_augmentation(seed, rot_factor: float, scale_factor, flip_prob: float,
                        augment: bool = True):
  """Draws one example's parameters from a stateless seed (TF).

  The center shift depends on the image size, so it is drawn as two
  uniforms in [0, 1) that transforms.shift_from_uniform maps on the host.

  Args:
    seed: [2] int32/int64 stateless seed.
    rot_factor: max |rotation| in degrees.
    scale_factor: (min, max) zoom.
    flip_prob: probability of a horizontal flip.
    augment: if False, the identity (rot 0, scale 1, centered, no flip).

  Returns:
    float32 tensors: rot, scale, u_dx, u_dy, flip (0/1).
  """
  u = tf.random.stateless_uniform([5], seed=seed, dtype=tf.float32)
  if not augment:
    return (tf.constant(0.), tf.constant(1.), tf.constant(0.5),
            tf.constant(0.5), tf.constant(0.))
  lo, hi = float(scale_factor[0]), float(scale_factor[1])
  rot = (u[0] * 2.0 - 1.0) * rot_factor
  scale = u[1] * (hi - lo) + lo
  flip = tf.cast(u[4] < flip_prob, tf.float32)
  return rot, scale, u[2], u[3], flip


def _load_source(coco_root: str, split: str, source: str, tfds_data_dir: str,
                 annotations: str, images: str, num_joints: int):
  """Returns (ExampleSource, skipped-in-index dict)."""
  if source == 'json':
    index = coco_lib.load_coco_index(coco_root, split, annotations, images,
                                     num_joints)
    return (coco_lib.ExampleSource(index.examples, index.image_dir),
            index.skipped)
  if source == 'tfds':
    if num_joints != keypoints_lib.COCO.num_joints or annotations or images:
      raise ValueError("config.data.source 'tfds' holds the standard COCO "
                       "files (17 joints); use source 'json' for others")
    from ae_jax.data import tfds_coco  # pylint: disable=g-import-not-at-top
    return tfds_coco.load_source(coco_root, split, tfds_data_dir)
  raise ValueError(f"Unknown data source {source!r}: 'json' or 'tfds'")


def make_train_dataset(coco_root: str, split: str, *, input_size,
                       heatmap_size, max_people: int,
                       rot_factor: float, scale_factor, scale_type: str,
                       trans_factor: float, flip_prob: float, augment: bool,
                       global_batch_size: int, seed: int, start_step: int = 0,
                       source: str = 'json', tfds_data_dir: str = '',
                       num_parallel_calls: int = -1,
                       flip_index=keypoints_lib.COCO.flip_index,
                       annotations: str = '', images: str = '',
                       process_index: int | None = None,
                       process_count: int | None = None) -> TrainDataset:
  """Builds the infinite, deterministic AE train stream for this host.

  Keyword names follow config.data (configs/default.py); `split` is
  config.data.train_split, the batch size and seed come from config.train /
  config.seed (loop.make_dataset passes them).

  Args:
    coco_root: COCO root folder.
    split: image split, e.g. 'train2017'.
    input_size: int S (square) or (W, H), mmpose's image_size.
    heatmap_size: int h (square) or (w, h); must be input_size / 4.
    max_people: M, people kept per image (the targets' config.data.sigma
      goes to the train step, which renders them).
    rot_factor: max rotation (degrees).
    scale_factor: (min, max) zoom.
    scale_type: 'short' or 'long'.
    trans_factor: max center shift (mmpose units).
    flip_prob: horizontal flip probability.
    augment: False = no random affine/flip (center crop, for overfitting).
    global_batch_size: B over all hosts.
    seed: stream seed.
    start_step: first global step to produce (resume).
    source: 'json' (pycocotools) or 'tfds' (tfds_coco builder).
    tfds_data_dir: TFDS data_dir for source 'tfds'.
    num_parallel_calls: map parallelism, -1 = AUTOTUNE.
    flip_index: [K] mirrored joint of each joint (KeypointSpec.flip_index;
      K = the joints of the annotations, checked when they are loaded).
    annotations, images: the split's annotation json and image folder if
      not the standard ones (coco.split_paths).
    process_index: host index (default jax.process_index()).
    process_count: number of hosts (default jax.process_count()).

  Returns:
    A TrainDataset.

  Raises:
    ValueError: bad sizes (transforms.train_sizes), or a global batch that
      the processes cannot split evenly.
  """
  (in_w, in_h), (hm_w, hm_h) = transforms.train_sizes(input_size,
                                                      heatmap_size)
  tf.config.set_visible_devices([], 'GPU')
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible '
                     f'by the {process_count} processes')
  local_batch = global_batch_size // process_count
  flip_index = tuple(int(j) for j in flip_index)
  num_joints = len(flip_index)
  src, skipped_in_index = _load_source(coco_root, split, source,
                                       tfds_data_dir, annotations, images,
                                       num_joints)
  for reason, ids in skipped_in_index.items():
    logging.info('COCO %s: skipped %d images (%s).', split, len(ids), reason)
  num = len(src)
  logging.info('COCO %s: %d training images.', split, num)
  skips = SkipCounter()
  load = make_loader(src, skips, input_wh=(in_w, in_h),
                     heatmap_wh=(hm_w, hm_h), scale_type=scale_type,
                     trans_factor=trans_factor if augment else 0.0,
                     max_people=max_people, flip_index=flip_index)

  start = int(start_step) * global_batch_size
  first_epoch, first_offset = divmod(start, num)

  def epoch_positions(epoch):
    seed_e = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, _SALT_PERMUTATION], tf.int64), epoch)
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(num, dtype=tf.int64), seed=seed_e)
    offset = tf.where(epoch == first_epoch, tf.cast(first_offset, tf.int64),
                      tf.constant(0, tf.int64))
    j = tf.range(offset, num, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((epoch * num + j, perm[offset:]))

  def on_this_host(g, unused_index):
    slot = g % global_batch_size
    return (slot >= process_index * local_batch) & (
        slot < (process_index + 1) * local_batch)

  def transform(g, index):
    aug_seed = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, _SALT_AUGMENT], tf.int64), g)
    rot, scale, u_dx, u_dy, flip = sample_augmentation(
        aug_seed, rot_factor, scale_factor, flip_prob, augment)
    image, mask, keypoints = tf.numpy_function(
        load, [index, rot, scale, u_dx, u_dy, flip],
        [tf.uint8, tf.uint8, tf.float32], stateful=False)
    return {
        'image': tf.ensure_shape(image, [in_h, in_w, 3]),
        'mask': tf.ensure_shape(mask, [hm_h, hm_w]),
        'keypoints': tf.ensure_shape(keypoints,
                                     [max_people, num_joints, 3]),
    }

  ds = tf.data.Dataset.range(first_epoch, tf.int64.max)
  ds = ds.flat_map(epoch_positions)
  ds = ds.filter(on_this_host)
  ds = ds.map(transform, num_parallel_calls=(
      tf.data.AUTOTUNE if num_parallel_calls < 0 else num_parallel_calls),
              deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  ds = ds.with_options(options)
  return TrainDataset(ds, num, skipped_in_index, skips)

"""The AE training input: deterministic, resumable, per host, in workers.

Stream layout: epoch e is a permutation of the N kept examples, drawn from
(seed, e); epochs are concatenated into one infinite stream of global
positions g = e * N + j (batches may span an epoch boundary, nothing is
dropped). Global batch s holds positions [s * B, (s + 1) * B); host p of
P takes the slice [p * b, (p + 1) * b) of it (b = B / P). The augmentation
of position g is drawn from (seed, g). Batch s of a host is therefore a
pure function of (seed, s) (`HostBatches`): resuming at start_step starts
at batch start_step, with no image read for the skipped part and no
iterator state to save (the checkpoint's step is the data position). The
draws are TF's stateless ops, reproduced bit for bit in numpy
(stateless_random.py), so the stream is the one the earlier tf.data
pipeline gave.

A missing, corrupt or wrongly sized image (decoded size != the
annotation's width/height: not the annotated image) is not dropped (that
would shift every later batch and break resume): the example is replaced
by the next usable image in index order, with its own annotations, so
targets stay right. The worker returns the replacements of a batch with
it; the training process counts them per reason and logs each file once
(example_loader.SkipCounter).

Where the work runs: the whole host batch, per example read and decode,
ignore mask, the two warps, the flip (example_loader.py), and the batch
assembly, runs in one of `workers` processes (workers.py: worker w makes
batches w, w + n, ... straight into shared memory the training process
reuses; they are taken in step order). The training process only maps
each finished batch and puts it on the devices, so its GIL is no longer
the ceiling (bench/RESULTS_pipeline.md: the earlier tf.data threads of
one process held it ~0.9 ms per example, ~1.1k img/s at most; why these
workers and not grain's or tf.data service's: workers.py). workers = 0
runs the same pipeline in the training process (tests, debugging).

Train batch (host-local numpy dict), b = global_batch // process_count,
H x W the input size and h x w the heatmap size (config.data.input_size /
heatmap_size: an int for square, or (w, h) as mmpose's image_size; the
heatmap size is the input size / 4, checked by transforms.train_sizes):
  'image'     [b, H, W, 3] uint8 RGB 0-255; the ImageNet normalisation runs
              on device inside the jitted train step
              (models/ae_model.normalize_images)
  'mask'      [b, h, w]    uint8, 1 = train on the pixel, 0 = ignore
  'keypoints' [b, M, K, 3] float32 (x, y, v) in heatmap pixels after the
              affine and flip: the first M people, zero padded (v = 0);
              heatmaps and joint encodings are rendered from them on device
              (device_targets.render_targets)
"""

import os

from absl import logging
import numpy as np

from ae_jax import keypoints as keypoints_lib
from ae_jax.data import coco as coco_lib
from ae_jax.data import example_loader
from ae_jax.data import stateless_random
from ae_jax.data import transforms
from ae_jax.data import workers as workers_lib

_SALT_PERMUTATION = 0x5EED
_SALT_AUGMENT = 0xA06
_MAX_AUTO_WORKERS = 64  # workers = -1 (README "Input workers": per host)


def auto_workers() -> int:
  """workers = -1: the CPUs this process may use, minus one, 1 to 64."""
  return max(1, min(_MAX_AUTO_WORKERS, len(os.sched_getaffinity(0)) - 1))


def sample_augmentation(seed: int, positions, rot_factor: float,
                        scale_factor, flip_prob: float,
                        augment: bool = True) -> np.ndarray:
  """The augmentation draws of stream positions, from (seed, position).

  The center shift depends on the image size, so it is drawn as two
  uniforms in [0, 1) that transforms.shift_from_uniform maps on the host.
  Five uniforms per position from TF's stateless_uniform of
  stateless_fold_in((seed, salt), g), in float32 (stateless_random.py).

  Args:
    seed: the stream seed.
    positions: [n] global stream positions g.
    rot_factor: max |rotation| in degrees.
    scale_factor: (min, max) zoom.
    flip_prob: probability of a horizontal flip.
    augment: if False, the identity (rot 0, scale 1, centered, no flip).

  Returns:
    [n, 5] float32: rot, scale, u_dx, u_dy, flip (0/1).
  """
  positions = np.asarray(positions, np.int64).reshape(-1)
  if not augment:
    return np.tile(np.array([0., 1., .5, .5, 0.], np.float32),
                   (positions.size, 1))
  u = stateless_random.uniform(
      *stateless_random.fold_in(seed, _SALT_AUGMENT, positions), 5)
  f32 = np.float32
  lo, hi = float(scale_factor[0]), float(scale_factor[1])
  rot = (u[:, 0] * f32(2.0) - f32(1.0)) * f32(rot_factor)
  scale = u[:, 1] * f32(hi - lo) + f32(lo)
  flip = (u[:, 4] < f32(flip_prob)).astype(np.float32)
  return np.stack([rot, scale, u[:, 2], u[:, 3], flip], 1)


def epoch_permutation(seed: int, epoch: int, num: int) -> np.ndarray:
  """[num] int64: the example order of `epoch` (TF's stateless_shuffle)."""
  return stateless_random.shuffle(
      num, *stateless_random.fold_in(seed, _SALT_PERMUTATION, epoch))


class HostBatches:
  """Step s -> (this host's batch s, its replacements); picklable.

  A pure function of (seed, s), computed in a worker process (`fill`
  writes it into the worker's shared-memory slot). Each replacement is
  (reason, file name, detail).
  """

  def __init__(self, load: example_loader.ExampleLoader, *, seed: int,
               global_batch_size: int, process_index: int,
               local_batch: int, augmentation: dict):
    self._load, self._seed = load, seed
    self._global, self._local = global_batch_size, local_batch
    self._first = process_index * local_batch
    self._augmentation = augmentation  # sample_augmentation's factors
    self._permutations = {}  # epoch -> order; this process's last two

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      if len(self._permutations) >= 2:
        del self._permutations[min(self._permutations)]
      self._permutations[epoch] = epoch_permutation(
          self._seed, epoch, len(self._load.source))
    return self._permutations[epoch]

  def spec(self) -> dict[str, tuple[tuple[int, ...], type]]:
    """name -> (shape, dtype) of the batch's arrays."""
    (w, h), (hw, hh) = self._load.input_wh, self._load.heatmap_wh
    return {'image': ((self._local, h, w, 3), np.uint8),
            'mask': ((self._local, hh, hw), np.uint8),
            'keypoints': ((self._local, self._load.max_people,
                           len(self._load.flip_index), 3), np.float32)}

  def fill(self, step: int, batch: dict[str, np.ndarray]) -> tuple:
    """Writes batch `step` into `batch` (spec()'s arrays).

    Returns:
      The replacements made, (reason, file name, detail) each.
    """
    num = len(self._load.source)
    positions = (int(step) * self._global + self._first +
                 np.arange(self._local, dtype=np.int64))
    params = sample_augmentation(self._seed, positions, **self._augmentation)
    skips = example_loader.SkipLog()
    for i, g in enumerate(positions.tolist()):
      epoch, j = divmod(g, num)
      example = self._load(self._permutation(epoch)[j], params[i], skips,
                           int(step))
      for key, value in zip(('image', 'mask', 'keypoints'), example):
        batch[key][i] = value
    return tuple(skips.entries)

  def __call__(self, step: int):
    """(batch `step` in new arrays, its replacements)."""
    batch = {k: np.empty(shape, dtype)
             for k, (shape, dtype) in self.spec().items()}
    return batch, self.fill(step, batch)


class _InProcessBatches:
  """workers = 0: HostBatches' batches made in this process, in order."""

  def __init__(self, batches: HostBatches, start: int):
    self._batches, self._step = batches, start

  def __iter__(self):
    return self

  def __next__(self):
    self._step += 1
    return self._batches(self._step - 1)

  def close(self) -> None:
    pass


class HostBatchIterator:
  """The training process's side: batches in order, replacements counted.

  `close()` stops the worker processes (also when garbage collected).
  """

  def __init__(self, source, skips: example_loader.SkipCounter):
    self._source, self._skips = source, skips

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch, replaced = next(self._source)
    for reason, name, detail in replaced:
      self._skips.add(reason, name, detail=detail)
    return batch

  def close(self) -> None:
    """Stops the worker processes."""
    self._source.close()


class TrainDataset:
  """Iterable of host-local train batches; see module docstring.

  Each `iter()` starts the workers anew at `start_step`.

  Attributes:
    num_examples: train images per epoch after filtering (lr schedule).
    skipped_in_index: reason -> image ids dropped from the split.
    skips: runtime replacements (missing/corrupt/mis-sized files), by
      reason, of the batches handed out so far (all iterators).
    workers: input worker processes (0: in this process).
  """

  def __init__(self, batches: HostBatches, start_step: int,
               num_examples: int, skipped_in_index, workers: int,
               worker_slots: int = 2):
    self._batches, self._start = batches, int(start_step)
    self.num_examples = num_examples
    self.skipped_in_index = skipped_in_index
    self.skips = example_loader.SkipCounter()
    self.workers, self._slots = workers, worker_slots

  @property
  def skipped(self) -> dict[str, int]:
    """All skip counts so far: index filtering + runtime replacements."""
    counts = {k: len(v) for k, v in self.skipped_in_index.items()}
    for k, v in self.skips.counts.items():
      counts[k] = counts.get(k, 0) + v
    return counts

  def __iter__(self) -> HostBatchIterator:
    if not self.workers:
      return HostBatchIterator(_InProcessBatches(self._batches, self._start),
                               self.skips)
    return HostBatchIterator(workers_lib.WorkerBatches(
        self._batches, self._start, self.workers, self._slots), self.skips)


def _load_source(coco_root: str, split: str, source: str, tfds_data_dir: str,
                 annotations: str, images: str, num_joints: int):
  """Returns (ExampleSource, skipped-in-index dict)."""
  if source == 'json':
    index = coco_lib.load_coco_index(coco_root, split, annotations, images,
                                     num_joints)
    return (coco_lib.ExampleSource(
        example_loader.CompactExamples(index.examples), index.image_dir),
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
                       workers: int = 0, worker_slots: int = 2,
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
    workers: input worker processes (each makes whole host batches);
      0 = in this process, -1 = `auto_workers()`. The batches do not
      depend on it.
    worker_slots: batches each worker may make ahead.
    flip_index: [K] mirrored joint of each joint (KeypointSpec.flip_index;
      K = the joints of the annotations, checked when they are loaded).
    annotations, images: the split's annotation json and image folder if
      not the standard ones (coco.split_paths).
    process_index: host index (default jax.process_index()).
    process_count: number of hosts (default jax.process_count()).

  Returns:
    A TrainDataset.

  Raises:
    ValueError: bad sizes (transforms.train_sizes), a worker count below
      -1, or a global batch that the processes cannot split evenly.
  """
  (in_w, in_h), (hm_w, hm_h) = transforms.train_sizes(input_size,
                                                      heatmap_size)
  if workers < -1 or worker_slots < 1:
    raise ValueError(f'config.data.workers = {workers} must be >= -1 (-1: '
                     f'auto) and worker_slots = {worker_slots} >= 1')
  workers = auto_workers() if workers == -1 else workers
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible '
                     f'by the {process_count} processes')
  local_batch = global_batch_size // process_count
  flip_index = tuple(int(j) for j in flip_index)
  src, skipped_in_index = _load_source(coco_root, split, source,
                                       tfds_data_dir, annotations, images,
                                       len(flip_index))
  for reason, ids in skipped_in_index.items():
    logging.info('COCO %s: skipped %d images (%s).', split, len(ids), reason)
  logging.info('COCO %s: %d training images.', split, len(src))
  load = example_loader.make_loader(
      src, input_wh=(in_w, in_h), heatmap_wh=(hm_w, hm_h),
      scale_type=scale_type, trans_factor=trans_factor if augment else 0.0,
      max_people=max_people, flip_index=flip_index)
  batches = HostBatches(
      load, seed=seed, global_batch_size=global_batch_size,
      process_index=process_index, local_batch=local_batch,
      augmentation=dict(rot_factor=rot_factor,
                        scale_factor=tuple(scale_factor),
                        flip_prob=flip_prob, augment=augment))
  return TrainDataset(batches, start_step, len(src), skipped_in_index,
                      workers, worker_slots)

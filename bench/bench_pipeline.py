"""Train input pipeline throughput on N cores (and vs mmpose-style on one).

Run:  python -m bench.bench_pipeline --cores N [--examples 384] [--profile]
      python -m bench.bench_pipeline --reference [--out report.md]

`--cores N` times the training input exactly as train.py builds it
(loop.make_dataset on configs/default.py, 512/128, full augmentation)
on the mini COCO (val2017, repeated), limited to N cores: the process is
pinned to the first N CPUs (os.sched_setaffinity, like `taskset -c
0-(N-1)`), cv2 runs one thread per call, TF's inter/intra-op pools and
tf.data's private pool have N threads and the map runs N examples in
parallel (config.data.num_parallel_calls = N). After two warm-up batches it
times a fixed number of examples and prints, as its last line,
`cores=N ... <X> img/s ...` with
  * img/s: wall-clock images per second (what a train loop would see);
  * cpu-ms/img: CPU time of the whole process (all threads) per example;
  * bytes/img: host->device bytes per example (all arrays of a batch, /B).
On a machine shared with other jobs, wall-clock img/s drops with the load
while cpu-ms/img stays close to the cost of the work; the load average is
printed beside the figures.

`--profile` also splits the loader's CPU time (gil_profile) into the part
inside GIL-free cv2 calls and the GIL-held rest, whose inverse bounds one
process's img/s however many threads it runs.

`--reference` also times (on one core) the shared mmpose-style reference,
tests/references/mmpose_pipeline.py: mmcv decode, `_get_mask`, 3-point
get_affine_transform, cv2.warpAffine, `image[:, ::-1] - zeros` flip,
ToTensor + NormalizeTensor on the host and the HeatmapGenerator /
JointsEncoder loops, with np.random draws in mmpose's order.

Smoke run (seconds): python -m bench.bench_pipeline --cores 1 --examples 8 \
    --batch 4
"""

import argparse
import os
import platform
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import cv2  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

# pylint: disable=g-import-not-at-top
from bench import common

ROOT = 'data/coco_mini'
SPLIT = 'val2017'
S, H, SIGMA, M = 512, 128, 2, 30


def limit_cores(cores: int) -> list[int]:
  """Pins this process to its first `cores` CPUs; returns them."""
  cpus = sorted(os.sched_getaffinity(0))
  if not 1 <= cores <= len(cpus):
    raise ValueError(f'--cores {cores}: this process may use 1..{len(cpus)}')
  os.sched_setaffinity(0, set(cpus[:cores]))
  cv2.setNumThreads(1)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_inter_op_parallelism_threads(cores)
  tf.config.threading.set_intra_op_parallelism_threads(cores)
  return cpus[:cores]


def train_input(cores: int, batch: int, seed: int = 0):
  """The train.py input (loop.make_dataset) with N-way parallelism."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ae_jax.train import loop  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data.coco_root = ROOT
  config.data.train_split = SPLIT
  config.data.num_parallel_calls = cores
  config.train.global_batch_size = batch
  config.seed = seed
  ds = loop.make_dataset(config, 0)
  options = tf.data.Options()
  options.threading.private_threadpool_size = cores
  options.autotune.enabled = False
  return ds.dataset.with_options(options).as_numpy_iterator()


def time_batches(it, num_batches: int, batch: int):
  """(wall img/s, CPU ms per image, bytes per image) over num_batches."""
  next(it)  # warm-up: tracing, caches, the prefetch buffer filling
  next(it)
  t, c = time.perf_counter(), time.process_time()
  nbytes = 0
  for _ in range(num_batches):
    nbytes += sum(v.nbytes for v in next(it).values())
  n = num_batches * batch
  return (n / (time.perf_counter() - t),
          (time.process_time() - c) / n * 1e3, nbytes / n)


def gil_profile(num: int):
  """Host loader CPU ms per example: total and inside GIL-free cv2 calls.

  Calls pipeline.make_loader's function directly (one thread) with the
  augmentation the pipeline draws, and accumulates the thread CPU time
  spent inside cv2.imdecode / warpAffine / flip, which release the GIL.
  The rest holds it: 1 / (rest) bounds one process's examples per second
  however many threads the map runs.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ae_jax.data import coco, pipeline  # pylint: disable=g-import-not-at-top
  index = coco.load_coco_index(ROOT, SPLIT)
  load = pipeline.make_loader(
      coco.ExampleSource(index.examples, index.image_dir),
      pipeline.SkipCounter(), input_wh=(S, S), heatmap_wh=(H, H),
      scale_type='short', trans_factor=40.0, max_people=M)
  spent = [0.0]
  originals = {n: getattr(cv2, n) for n in ('imdecode', 'warpAffine', 'flip')}

  def timed(fn):
    def call(*a, **k):
      t = time.thread_time()
      try:
        return fn(*a, **k)
      finally:
        spent[0] += time.thread_time() - t
    return call

  params = [[float(v) for v in pipeline.sample_augmentation(
      tf.constant([0, g], tf.int64), 30.0, (0.75, 1.5), 0.5)]
            for g in range(num)]
  for name, fn in originals.items():
    setattr(cv2, name, timed(fn))
  try:
    load(0, *params[0])
    spent[0] = 0.0
    t = time.thread_time()
    for g, p in enumerate(params):
      load(g % len(index), *p)
    total = time.thread_time() - t
  finally:
    for name, fn in originals.items():
      setattr(cv2, name, fn)
  return total / num * 1e3, spent[0] / num * 1e3


class Reference:
  """mmpose 0.x train pipeline in numpy + cv2, one example per call."""

  def __init__(self):
    # pylint: disable=g-import-not-at-top
    from pycocotools import coco as coco_api
    from tests.references import mmpose_pipeline
    self.ref = mmpose_pipeline
    self.coco = coco_api.COCO(f'{ROOT}/annotations/person_keypoints_'
                              f'{SPLIT}.json')
    self.ids = sorted(self.coco.getImgIds())
    self.rng = np.random.RandomState(0)

  def example(self, image_id):
    info = self.coco.imgs[image_id]
    img = self.ref.read_rgb(f'{ROOT}/{SPLIT}/{info["file_name"]}')
    anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
    h, w = img.shape[:2]
    # BottomUpRandomAffine's draws, in its order, then BottomUpRandomFlip's.
    aug_scale = self.rng.random_sample() * 0.75 + 0.75
    rot = (self.rng.random_sample() * 2 - 1) * 30
    dx = self.rng.randint(-40 * w * aug_scale / 200.0,
                          40 * w * aug_scale / 200.0)
    dy = self.rng.randint(-40 * h * aug_scale / 200.0,
                          40 * h * aug_scale / 200.0)
    flip = self.rng.random_sample() < 0.5
    ex = self.ref.train_example(
        img, anns, rot=rot, aug_scale=aug_scale, shift=(dx, dy), flip=flip,
        input_wh=(S, S), heatmap_wh=(H, H), sigma=SIGMA, max_people=M)
    return {'image': ex['image'], 'heatmaps': ex['heatmaps'],
            'mask': ex['mask'], 'joints': ex['enc']}

  def batches(self, batch):
    i = 0
    while True:
      items = []
      for _ in range(batch):
        items.append(self.example(self.ids[i % len(self.ids)]))
        i += 1
      yield {k: np.stack([x[k] for x in items]) for k in items[0]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--cores', type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument('--examples', type=int, default=384,
                      help='timed examples (rounded down to whole batches)')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--reference', action='store_true',
                      help='also time the mmpose-style reference (1 core)')
  parser.add_argument('--profile', action='store_true',
                      help='also split the loader CPU time by GIL (1 core)')
  parser.add_argument('--out', default='',
                      help='write a markdown report here (with --reference)')
  args = parser.parse_args()
  cpus = limit_cores(1 if args.reference else args.cores)
  cores = len(cpus)
  num_batches = max(1, args.examples // args.batch)
  ours = time_batches(train_input(cores, args.batch), num_batches,
                      args.batch)
  load = os.getloadavg()[0]
  line = (f'cores={cores} (cpus {cpus[0]}-{cpus[-1]}) examples='
          f'{num_batches * args.batch} batch={args.batch} load={load:.1f}: '
          f'{ours[0]:.0f} img/s wall, {ours[1]:.2f} cpu-ms/img '
          f'({1e3 / ours[1]:.0f} img/s per core-second), '
          f'{ours[2] / 1e6:.3f} MB/img host->device')
  if args.profile:
    total, free = gil_profile(args.examples)
    print(f'loader alone, one thread: {total:.2f} cpu-ms/img, {free:.2f} in '
          f'GIL-free cv2 calls, {total - free:.2f} holding the GIL '
          f'(one process at most ~{1e3 / (total - free):.0f} img/s)')
  if not args.reference:
    print(line)
    return
  ref = time_batches(Reference().batches(args.batch), num_batches,
                     args.batch)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  lines = [
      '## Train input pipeline vs the mmpose-style reference, one core', '',
      f'Machine: {common.machine()}, {platform.python_version()}, TF '
      f'{tf.__version__}, cv2 {cv2.__version__}; load average {load:.1f} '
      '(shared).', '',
      '| pipeline | cpu-ms/img | img/s per core-second | MB/img to device |',
      '|---|---|---|---|',
      f'| ours (loop.make_dataset) | {ours[1]:.2f} | '
      f'{1e3 / ours[1]:.0f} | {ours[2] / 1e6:.3f} |',
      f'| reference numpy+cv2 (mmpose 0.x style) | {ref[1]:.2f} | '
      f'{1e3 / ref[1]:.0f} | {ref[2] / 1e6:.3f} |', '',
      f'Ratio (CPU time): **{ref[1] / ours[1]:.2f}x**.', '']
  if args.out:
    common.write_report(lines, args.out)
  else:
    print('\n'.join(lines))
  print(line)


if __name__ == '__main__':
  main()

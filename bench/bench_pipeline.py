"""Train input throughput with N worker processes (and vs mmpose-style).

Run:  python -m bench.bench_pipeline --workers N [--seconds 12]
      python -m bench.bench_pipeline --workers N --index_size 64115
      python -m bench.bench_pipeline --profile   (the loader's GIL split)
      python -m bench.bench_pipeline --reference [--out report.md]

`--workers N` times the training input exactly as train.py builds it
(loop.make_dataset on configs/default.py, 512/128, full augmentation,
config.data.workers = N, then sharding.prefetch_to_mesh onto this host's
JAX devices) on the mini COCO (val2017, repeated). After the warm-up (the
workers' start and the batches buffered ahead) it consumes batches for a
window of `--seconds` and prints
  * img/s: wall-clock images per second (what a train loop would see);
  * cpu-ms/img: CPU time of every process (training process + workers)
    per example;
  * train-cpu-ms/img: CPU time of the training process alone (all its
    threads), an upper bound of its GIL-held time;
  * GIL-ms/img: time the training process held its GIL, per example,
    sampled: `py-spy record --gil --nonblocking` (the `bench` extra)
    attached to this process; the window is py-spy's (from its first
    sample to its exit), each sample in which one of this process's
    threads holds the GIL counts 1 / rate seconds. Without py-spy the
    upper bound above is printed in its place, marked. 1 / GIL-ms is the
    most one training process can feed, however many workers;
  * RSS and private (USS: pages no other process shares) MB per worker
    process at the end, and the training process's RSS;
  * MB/img host->device (all arrays of a batch, / B).
Before it, the same pipeline with workers = 0 (everything in the training
process) is measured the same way over `--reference_seconds`, the
side-by-side reference: its GIL-ms/img is what the training process held
before the work moved to workers. Its last line is
`workers=N ... <X> img/s ... <Y> GIL-ms/img`. The
machine's load average is printed beside the figures: on a shared machine
wall-clock img/s drops with the load while cpu-ms/img stays close to the
cost of the work.

`--index_size N` trains on a COCO root whose annotation file lists N
images (the mini COCO's, repeated; written to a temporary folder): the
workers' memory with a train2017-sized index (64115 images).

`--profile` splits the loader's CPU time (one thread, in this process)
into the part inside GIL-free cv2 calls and the GIL-held rest.

`--reference` also times (on one core) the shared mmpose-style reference,
tests/references/mmpose_pipeline.py: mmcv decode, `_get_mask`, 3-point
get_affine_transform, cv2.warpAffine, `image[:, ::-1] - zeros` flip,
ToTensor + NormalizeTensor on the host and the HeatmapGenerator /
JointsEncoder loops, with np.random draws in mmpose's order; ours then
runs with one worker on the same core, compared by CPU time per example
(`--examples` of each).

Smoke run: python -m bench.bench_pipeline --workers 1 --seconds 2 \
    --reference_seconds 2 --batch 4
"""

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import cv2  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

# pylint: disable=g-import-not-at-top
from bench import common
from bench import process_probe

ROOT = 'data/coco_mini'
SPLIT = 'val2017'
S, H, SIGMA, M = 512, 128, 2, 30


def limit_cores(cores: int) -> list[int]:
  """Pins this process (and the workers it starts) to `cores` CPUs."""
  cpus = sorted(os.sched_getaffinity(0))
  if not 1 <= cores <= len(cpus):
    raise ValueError(f'{cores} cores: this process may use 1..{len(cpus)}')
  os.sched_setaffinity(0, set(cpus[:cores]))
  cv2.setNumThreads(1)
  return cpus[:cores]


def train_input(workers: int, batch: int, seed: int = 0, root: str = ROOT):
  """The train.py input: loop.make_dataset, then prefetch_to_mesh."""
  from ae_jax import sharding  # pylint: disable=g-import-not-at-top
  from ae_jax.train import loop  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data.coco_root = root
  config.data.train_split = SPLIT
  config.data.workers = workers
  config.train.global_batch_size = batch
  config.seed = seed
  ds = loop.make_dataset(config, 0)
  import jax  # pylint: disable=g-import-not-at-top
  # The devices the batch splits over evenly (all of them in a real run).
  devices = max(d for d in range(1, jax.device_count() + 1) if batch % d == 0)
  return sharding.prefetch_to_mesh(iter(ds), sharding.make_mesh(devices),
                                   size=2)


def time_batches(it, num_batches: int, batch: int, warmup: int = 2):
  """(wall img/s, CPU ms per image of all processes, bytes per image)."""
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):  # workers start, caches, buffers fill
    jax.block_until_ready(next(it))
  kids = process_probe.children(os.getpid())
  t, own = time.perf_counter(), process_probe.own_cpu_s()
  others = {p: process_probe.cpu_s(p) for p in kids}
  nbytes = 0
  for _ in range(num_batches):
    nbytes += sum(v.nbytes for v in jax.block_until_ready(next(it)).values())
  n = num_batches * batch
  cpu = process_probe.own_cpu_s() - own + sum(
      process_probe.cpu_s(p) - c for p, c in others.items())
  return n / (time.perf_counter() - t), cpu / n * 1e3, nbytes / n


def measure(it, batch: int, seconds: float, warmup: int) -> dict:
  """The bench's figures over a `seconds` window (GilSampler's).

  Returns:
    images_per_sec, cpu_ms (all processes), train_cpu_ms (this process),
    gil_ms (None without py-spy), gil_note, bytes (per example), workers_mb
    ((RSS, USS) per worker), train_rss_mb.
  """
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):  # workers start; their first batches drained
    jax.block_until_ready(next(it))
  sampler = process_probe.GilSampler(seconds)
  sampler.start()
  kids = [p for p in process_probe.children(os.getpid()) if p != sampler.pid]
  t, own = time.perf_counter(), process_probe.own_cpu_s()
  others = {p: process_probe.cpu_s(p) for p in kids}
  n = nbytes = 0
  while sampler.open():
    b = jax.block_until_ready(next(it))
    n += batch
    nbytes += sum(v.nbytes for v in b.values())
  wall, own = time.perf_counter() - t, process_probe.own_cpu_s() - own
  cpu = own + sum(process_probe.cpu_s(p) - c for p, c in others.items())
  gil_s, note = sampler.held_seconds()
  workers = [p for p in kids
             if 'resource_tracker' not in process_probe.cmdline(p)]
  return dict(images_per_sec=n / wall, cpu_ms=cpu / n * 1e3,
              train_cpu_ms=own / n * 1e3,
              gil_ms=None if gil_s is None else gil_s / n * 1e3,
              gil_note=note, bytes=nbytes / n, examples=n,
              workers_mb=[process_probe.memory_mb(p) for p in workers],
              train_rss_mb=process_probe.memory_mb(os.getpid())[0])


def sized_root(num_images: int, folder: str) -> str:
  """A COCO root listing `num_images` images (the mini ones, repeated)."""
  with open(f'{ROOT}/annotations/person_keypoints_{SPLIT}.json') as f:
    data = json.load(f)
  images, anns = [], []
  by_image = {}
  for a in data['annotations']:
    by_image.setdefault(a['image_id'], []).append(a)
  base = sorted(data['images'], key=lambda i: i['id'])
  for k in range(num_images):
    src = base[k % len(base)]
    images.append(dict(src, id=k + 1))
    for a in by_image.get(src['id'], []):
      anns.append(dict(a, id=len(anns) + 1, image_id=k + 1))
  os.makedirs(f'{folder}/annotations')
  with open(f'{folder}/annotations/person_keypoints_{SPLIT}.json', 'w') as f:
    json.dump(dict(data, images=images, annotations=anns), f)
  os.symlink(os.path.abspath(f'{ROOT}/{SPLIT}'), f'{folder}/{SPLIT}')
  return folder


def gil_profile(num: int):
  """Host loader CPU ms per example: total and inside GIL-free cv2 calls.

  Calls example_loader.make_loader's loader directly (one thread) with the
  augmentation the pipeline draws, and accumulates the thread CPU time
  spent inside cv2.imdecode / warpAffine / flip, which release the GIL.
  The rest holds it.
  """
  # pylint: disable=g-import-not-at-top
  from ae_jax.data import coco, example_loader, pipeline
  index = coco.load_coco_index(ROOT, SPLIT)
  load = example_loader.make_loader(
      coco.ExampleSource(index.examples, index.image_dir), input_wh=(S, S),
      heatmap_wh=(H, H), scale_type='short', trans_factor=40.0,
      max_people=M)
  skips = example_loader.SkipCounter()
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

  params = pipeline.sample_augmentation(0, np.arange(num), 30.0, (0.75, 1.5),
                                        0.5)
  for name, fn in originals.items():
    setattr(cv2, name, timed(fn))
  try:
    load(0, params[0], skips)
    spent[0] = 0.0
    t = time.thread_time()
    for g, p in enumerate(params):
      load(g % len(index), p, skips)
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


def _reference_report(args, ours, load):
  ref = time_batches(Reference().batches(args.batch),
                     max(1, args.examples // args.batch), args.batch)
  lines = [
      '## Train input pipeline vs the mmpose-style reference, one core', '',
      f'Machine: {common.machine()}, {platform.python_version()}, cv2 '
      f'{cv2.__version__}; load average {load:.1f} (shared).', '',
      '| pipeline | cpu-ms/img (all processes) | img/s per core-second | '
      'MB/img to device |', '|---|---|---|---|',
      f'| ours (loop.make_dataset, 1 worker) | {ours[1]:.2f} | '
      f'{1e3 / ours[1]:.0f} | {ours[2] / 1e6:.3f} |',
      f'| reference numpy+cv2 (mmpose 0.x style) | {ref[1]:.2f} | '
      f'{1e3 / ref[1]:.0f} | {ref[2] / 1e6:.3f} |', '',
      f'Ratio (CPU time): **{ref[1] / ours[1]:.2f}x**.', '']
  if args.out:
    common.write_report(lines, args.out)
  else:
    print('\n'.join(lines))


def _gil(got: dict) -> tuple[float, str]:
  if got['gil_ms'] is None:
    return got['train_cpu_ms'], ' (upper bound: no py-spy)'
  return got['gil_ms'], ''


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workers', type=int, default=1)
  parser.add_argument('--seconds', type=float, default=12.0,
                      help='timed window (py-spy samples over it)')
  parser.add_argument('--reference_seconds', type=float, default=8.0,
                      help='window of the in-process reference (0: none)')
  parser.add_argument('--examples', type=int, default=384,
                      help='--reference: timed examples')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--index_size', type=int, default=0,
                      help='images in the annotation file (0: the mini 4)')
  parser.add_argument('--reference', action='store_true',
                      help='also time the mmpose-style reference (1 core)')
  parser.add_argument('--profile', action='store_true',
                      help='also split the loader CPU time by GIL')
  parser.add_argument('--out', default='',
                      help='write a markdown report here (with --reference)')
  args = parser.parse_args()
  cv2.setNumThreads(1)
  if args.reference:
    limit_cores(1)
    args.workers = 1
  with contextlib.ExitStack() as stack:
    root = ROOT
    if args.index_size:
      root = sized_root(args.index_size,
                        stack.enter_context(tempfile.TemporaryDirectory()) +
                        '/coco')
    base = None
    if args.reference_seconds and args.workers:
      # The same pipeline with workers = 0, all in the training process:
      # the side-by-side reference for the training process's GIL.
      it = train_input(0, args.batch, root=root)
      base = measure(it, args.batch, args.reference_seconds, warmup=2)
      it.close()
    it = train_input(args.workers, args.batch, root=root)
    stack.callback(it.close)
    # Past the start and the batches made ahead (2 in the prefetcher, up
    # to 2 per worker: its free slots).
    got = measure(it, args.batch, args.seconds,
                  warmup=2 + 2 * max(1, args.workers))
    if args.reference:
      ours = time_batches(it, max(1, args.examples // args.batch),
                          args.batch, warmup=0)
  load = os.getloadavg()[0]
  if args.profile:
    total, free = gil_profile(256)
    print(f'loader alone, one thread: {total:.2f} cpu-ms/img, {free:.2f} in '
          f'GIL-free cv2 calls, {total - free:.2f} holding the GIL')
  if args.reference:
    _reference_report(args, ours, load)
  mem = got['workers_mb']
  rss = (f'{np.mean([m[0] for m in mem]):.0f} MB RSS '
         f'({np.mean([m[1] for m in mem]):.0f} private) per worker'
         if mem else 'no worker')
  gil, marked = _gil(got)
  print(f'py-spy: {got["gil_note"]}')
  if base:
    base_gil, base_marked = _gil(base)
    print(f'reference, workers=0 (all in the training process): '
          f'{base["images_per_sec"]:.0f} img/s, {base["cpu_ms"]:.2f} '
          f'cpu-ms/img, {base_gil:.3f} GIL-ms/img{base_marked}; '
          f'workers={args.workers}: {gil:.3f} GIL-ms/img, '
          f'{base_gil / gil:.0f}x less held in the training process, '
          f'{got["images_per_sec"] / base["images_per_sec"]:.2f}x img/s')
  print(f'workers={args.workers} examples={got["examples"]} '
        f'batch={args.batch} index={args.index_size or 4} load={load:.1f}: '
        f'{got["images_per_sec"]:.0f} img/s wall, {got["cpu_ms"]:.2f} '
        f'cpu-ms/img all processes, {got["train_cpu_ms"]:.3f} '
        f'train-cpu-ms/img, {got["bytes"] / 1e6:.3f} MB/img host->device, '
        f'{rss}, training process {got["train_rss_mb"]:.0f} MB RSS; '
        f'{gil:.3f} GIL-ms/img{marked}')


if __name__ == '__main__':
  main()

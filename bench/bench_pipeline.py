"""Train input pipeline throughput on one CPU core: ours vs mmpose-style.

Run:  python -m bench.bench_pipeline [--batches 12] [--out bench/RESULTS_pipeline.md]

Both pipelines produce the full training example at 512/128 (image,
heatmaps, mask, joints) from the mini COCO images, repeated, in batches of
32. One core: the process pins itself to CPU 0 (os.sched_setaffinity, like
`taskset -c 0`), cv2 uses one thread, TF's inter/intra-op pools have one
thread, and tf.data runs on a private thread pool of size 1 with map
parallelism 1 (so "per core" is not flattered by idle hyper-threads).

The reference is tests/references/mmpose_pipeline.py, a straightforward
numpy + cv2 implementation of mmpose 0.x's train pipeline as mmpose runs
it (the one the parity tests compare against): mmcv-style decode (cv2 BGR
-> RGB), `_get_mask` (pycocotools decode + sum), 3-point
get_affine_transform, cv2.warpAffine of image and mask,
`image[:, ::-1] - zeros` flip, ToTensor + NormalizeTensor in float32 numpy,
HeatmapGenerator and JointsEncoder loops; here its parameters are drawn
with np.random in mmpose's order and the examples stacked into a batch.

Ours yields uint8 images: the ImageNet normalisation runs on device inside
the jitted train step (ae_model.normalize_images, one fused elementwise op
there), which also makes the host copies and the host->device transfer 4x
smaller; the reference normalises on the host as mmpose does.

A per-op section measures the choices in transforms.py (cv2 vs TF decode
and warp; the numpy targets used).

Smoke run (seconds): python -m bench.bench_pipeline --batches 1 --batch 4 \
    --out /tmp/pipeline.md
"""

import argparse
import os
import platform
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import cv2  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from pycocotools import coco as coco_api  # pylint: disable=g-import-not-at-top

# pylint: disable=g-import-not-at-top
from bench import common
from tests.references import mmpose_pipeline

ROOT = 'data/coco_mini'
SPLIT = 'val2017'
S, H, SIGMA, M = 512, 128, 2, 30


class Reference:
  """mmpose 0.x train pipeline in numpy + cv2, one example per call."""

  def __init__(self):
    self.coco = coco_api.COCO(f'{ROOT}/annotations/person_keypoints_'
                              f'{SPLIT}.json')
    self.ids = sorted(self.coco.getImgIds())
    self.rng = np.random.RandomState(0)

  def example(self, image_id):
    info = self.coco.imgs[image_id]
    img = mmpose_pipeline.read_rgb(f'{ROOT}/{SPLIT}/{info["file_name"]}')
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
    ex = mmpose_pipeline.train_example(
        img, anns, rot=rot, aug_scale=aug_scale, shift=(dx, dy), flip=flip,
        input_wh=(S, S), heatmap_wh=(H, H), sigma=SIGMA, max_people=M)
    return ex['image'], ex['heatmaps'], ex['mask'], ex['enc']

  def batches(self, batch):
    i = 0
    while True:
      items = []
      for _ in range(batch):
        items.append(self.example(self.ids[i % len(self.ids)]))
        i += 1
      yield [np.stack(z) for z in zip(*items)]


def _time(it, n, batch):
  """Returns (img per wall second, img per CPU second of this process).

  The CPU-time rate counts the work of all threads, so on a shared,
  loaded machine it still measures images per core-second.
  """
  next(it)  # warm-up (graph tracing, caches)
  next(it)
  t, c = time.perf_counter(), time.process_time()
  for _ in range(n):
    next(it)
  return (n * batch / (time.perf_counter() - t),
          n * batch / (time.process_time() - c))


def _per_op_ms():
  """Single-op timings (ms) behind the choices in transforms.py."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ae_jax.data import targets  # pylint: disable=g-import-not-at-top
  hm_wh = (H, H)
  data = open(f'{ROOT}/{SPLIT}/000000000785.jpg', 'rb').read()
  buf = np.frombuffer(data, np.uint8)
  img = cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
  mat = cv2.getRotationMatrix2D((320, 212), 20, 1.1)
  tdata = tf.constant(data)
  fimg = tf.cast(tf.io.decode_jpeg(tdata, channels=3), tf.float32)[None]
  inv = cv2.invertAffineTransform(mat)
  proj = tf.constant([list(inv[0]) + list(inv[1]) + [0, 0]], tf.float32)
  warp = tf.function(lambda im: tf.raw_ops.ImageProjectiveTransformV3(
      images=im, transforms=proj, output_shape=[S, S], fill_value=0.0,
      interpolation='BILINEAR', fill_mode='CONSTANT'))
  joints = np.random.default_rng(0).uniform(0, H, (6, 17, 3)).astype(
      np.float32)
  joints[..., 2] = 1
  ops = {
      'decode cv2.imdecode': lambda: cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB),
      'decode tf.io.decode_jpeg': lambda: tf.io.decode_jpeg(tdata, channels=3),
      'warp 512 cv2.warpAffine': lambda: cv2.warpAffine(img, mat, (S, S)),
      'warp 512 tf ImageProjectiveTransformV3': lambda: warp(fimg),
      'targets numpy (6 people, used)': lambda: (
          targets.generate_heatmaps(joints, hm_wh, 2.0),
          targets.encode_joints(joints, hm_wh, M)),
  }
  out = {}
  for name, fn in ops.items():
    fn()
    t = time.perf_counter()
    for _ in range(30):
      fn()
    out[name] = (time.perf_counter() - t) / 30 * 1e3
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batches', type=int, default=12)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--out', default='bench/RESULTS_pipeline.md')
  args = parser.parse_args()
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  cv2.setNumThreads(1)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  from ae_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  ds = pipeline.make_train_dataset(
      ROOT, SPLIT, input_size=S, heatmap_size=H, sigma=2.0, max_people=M,
      rot_factor=30.0, scale_factor=(0.75, 1.5), scale_type='short',
      trans_factor=40.0, flip_prob=0.5, augment=True,
      global_batch_size=args.batch, seed=0, num_parallel_calls=1,
      process_index=0, process_count=1)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.autotune.enabled = False
  ours_it = ds.dataset.with_options(options).as_numpy_iterator()
  ref_it = Reference().batches(args.batch)
  # Interleave the two measurements to share the machine's noise.
  ours, ref = [], []
  for _ in range(2):
    ours.append(_time(ours_it, args.batches, args.batch))
    ref.append(_time(ref_it, args.batches, args.batch))
  ops = _per_op_ms()
  ours_best, ref_best = max(o[1] for o in ours), max(r[1] for r in ref)
  lines = [
      '## Train input pipeline (bench/bench_pipeline.py)', '',
      f'Machine: {common.machine()}, '
      f'{platform.python_version()}, TF {tf.__version__}, cv2 '
      f'{cv2.__version__}; shared with other jobs (noisy).',
      'One core: process pinned to one CPU (sched_setaffinity = taskset -c '
      '0), cv2 1 thread, TF inter/intra-op 1, tf.data private pool 1, map '
      'parallelism 1.',
      f'Full examples at 512/128, mini COCO repeated, batch {args.batch}, '
      f'{args.batches} batches per timing, 2 interleaved runs each. '
      'img/s/core = images per CPU-second of the pinned process (all '
      'threads, process_time), robust to other jobs on the core; wall-clock '
      'rates in brackets.', '',
      '| pipeline | img/s/core, best (runs) | wall img/s (runs) |',
      '|---|---|---|',
      f'| ours (tf.data; cv2 decode+warp, numpy targets in one '
      f'numpy_function; uint8 out, normalised on device) | '
      f'**{ours_best:.0f}** '
      f'({", ".join(f"{v[1]:.0f}" for v in ours)}) | '
      f'{", ".join(f"{v[0]:.0f}" for v in ours)} |',
      f'| reference numpy+cv2 (mmpose 0.x style) | **{ref_best:.0f}** '
      f'({", ".join(f"{v[1]:.0f}" for v in ref)}) | '
      f'{", ".join(f"{v[0]:.0f}" for v in ref)} |', '',
      f'Ratio ours / reference (CPU time): **{ours_best / ref_best:.2f}x**.',
      '',
      '| op (one call, wall-clock, loaded machine) | ms |', '|---|---|'
  ] + [f'| {k} | {v:.2f} |' for k, v in ops.items()] + ['']
  common.write_report(lines, args.out)


if __name__ == '__main__':
  main()

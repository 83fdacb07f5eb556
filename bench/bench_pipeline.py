"""Train input pipeline throughput on one CPU core: ours vs mmpose-style.

Run:  python -m bench.bench_pipeline [--batches 12] [--out bench/RESULTS_pipeline.md]

Both pipelines produce the full training example at 512/128 (image,
heatmaps, mask, joints) from the mini COCO images, repeated, in batches of
32. One core: the process pins itself to CPU 0 (os.sched_setaffinity, like
`taskset -c 0`), cv2 uses one thread, TF's inter/intra-op pools have one
thread, and tf.data runs on a private thread pool of size 1 with map
parallelism 1 (so "per core" is not flattered by idle hyper-threads).

The reference is a straightforward numpy + cv2 implementation of mmpose
0.x's train pipeline as mmpose runs it: mmcv-style decode (cv2 BGR -> RGB),
`_get_mask` (pycocotools decode + sum), 3-point get_affine_transform,
cv2.warpAffine of image and mask, `image[:, ::-1].copy() - zeros` flip,
ToTensor + NormalizeTensor in float32 numpy, HeatmapGenerator and
JointsEncoder loops, then stacking into a batch.

Ours yields uint8 images: the ImageNet normalisation runs on device inside
the jitted train step (ae_model.normalize_images, one fused elementwise op
there), which also makes the host copies and the host->device transfer 4x
smaller; the reference normalises on the host as mmpose does.

A per-op section measures the choices in transforms.py (cv2 vs TF decode
and warp, TF-graph targets vs the loops).
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
from pycocotools import mask as mask_api  # pylint: disable=g-import-not-at-top

from ae_jax.keypoints import FLIP_INDEX  # pylint: disable=g-import-not-at-top
from bench import common  # pylint: disable=g-import-not-at-top

ROOT = 'data/coco_mini'
SPLIT = 'val2017'
S, H, SIGMA, M = 512, 128, 2, 30
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _mmpose_matrix(center, scale, rot, size):
  src_w = scale[0] * 200.0
  r = np.deg2rad(rot)
  src_dir = np.array([-(src_w * -0.5) * np.sin(r), (src_w * -0.5) * np.cos(r)])
  perp = lambda a, b: b + np.array([-(a - b)[1], (a - b)[0]])
  src = np.zeros((3, 2), np.float32)
  dst = np.zeros((3, 2), np.float32)
  src[0], src[1] = center, center + src_dir
  dst[0] = (size * 0.5, size * 0.5)
  dst[1] = dst[0] + np.array([0.0, size * -0.5])
  src[2], dst[2] = perp(src[0], src[1]), perp(dst[0], dst[1])
  return cv2.getAffineTransform(src, dst)


class Reference:
  """mmpose 0.x train pipeline in numpy + cv2, one example per call."""

  def __init__(self):
    self.coco = coco_api.COCO(f'{ROOT}/annotations/person_keypoints_'
                              f'{SPLIT}.json')
    self.ids = sorted(self.coco.getImgIds())
    xs = np.arange(0, 6 * SIGMA + 3, 1, np.float32)
    c = 3 * SIGMA + 1
    self.g = np.exp(-((xs - c)**2 + (xs[:, None] - c)**2) / (2 * SIGMA**2))
    self.rng = np.random.RandomState(0)

  def example(self, image_id):
    info = self.coco.imgs[image_id]
    h, w = info['height'], info['width']
    with open(f'{ROOT}/{SPLIT}/{info["file_name"]}', 'rb') as f:
      buf = np.frombuffer(f.read(), np.uint8)
    img = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
    m = np.zeros((h, w), np.float32)
    for obj in anns:
      if obj['iscrowd']:
        m += mask_api.decode(mask_api.frPyObjects(obj['segmentation'], h, w))
      elif obj['num_keypoints'] == 0:
        for rle in mask_api.frPyObjects(obj['segmentation'], h, w):
          m += mask_api.decode(rle)
    mask = m < 0.5
    people = [a for a in anns if a['iscrowd'] == 0 or a['num_keypoints'] > 0]
    joints = np.zeros((len(people), 17, 3), np.float32)
    for i, a in enumerate(people):
      joints[i] = np.array(a['keypoints']).reshape(-1, 3)
    # BottomUpRandomAffine.
    center = np.array((w / 2, h / 2))
    aug_scale = self.rng.random_sample() * 0.75 + 0.75
    img_scale = np.array([w, h], np.float32) * aug_scale
    rot = (self.rng.random_sample() * 2 - 1) * 30
    center[0] += self.rng.randint(-40 * img_scale[0] / 200.0,
                                  40 * img_scale[0] / 200.0)
    center[1] += self.rng.randint(-40 * img_scale[1] / 200.0,
                                  40 * img_scale[1] / 200.0)
    side = img_scale.min()
    scale = np.array([side, side]) / 200.0
    mat = _mmpose_matrix(center, scale, rot, H)
    mask = cv2.warpAffine((mask * 255).astype(np.uint8), mat, (H, H)) / 255
    mask = (mask > 0.5).astype(np.float32)
    flat = joints[..., :2].reshape(-1, 2)
    joints[..., :2] = (np.concatenate([flat, flat[:, :1] * 0 + 1], 1) @
                       mat.T).reshape(joints.shape[:2] + (2,))
    img = cv2.warpAffine(img, _mmpose_matrix(center, scale, rot, S), (S, S))
    # BottomUpRandomFlip.
    if self.rng.random_sample() < 0.5:
      img = img[:, ::-1].copy() - np.zeros_like(img)
      mask = mask[:, ::-1].copy()
      joints = joints[:, FLIP_INDEX]
      joints[:, :, 0] = H - joints[:, :, 0] - 1
    # ToTensor + NormalizeTensor (CHW float32).
    x = img.transpose(2, 0, 1).astype(np.float32) / 255.0
    x = (x - MEAN[:, None, None]) / STD[:, None, None]
    # BottomUpGenerateTarget: HeatmapGenerator + JointsEncoder loops.
    hms = np.zeros((17, H, H), np.float32)
    enc = np.zeros((M, 17, 2), np.float32)
    for p, person in enumerate(joints):
      tot = 0
      for k, pt in enumerate(person):
        xi, yi = int(pt[0]), int(pt[1])
        if pt[2] <= 0 or xi < 0 or yi < 0 or xi >= H or yi >= H:
          continue
        enc[p][tot] = (k * H * H + yi * H + xi, 1)
        tot += 1
        ul = int(np.round(xi - 3 * SIGMA - 1)), int(np.round(yi - 3 * SIGMA -
                                                             1))
        br = int(np.round(xi + 3 * SIGMA + 2)), int(np.round(yi + 3 * SIGMA +
                                                             2))
        c, d = max(0, -ul[0]), min(br[0], H) - ul[0]
        a, b = max(0, -ul[1]), min(br[1], H) - ul[1]
        cc, dd = max(0, ul[0]), min(br[0], H)
        aa, bb = max(0, ul[1]), min(br[1], H)
        hms[k, aa:bb, cc:dd] = np.maximum(hms[k, aa:bb, cc:dd],
                                          self.g[a:b, c:d])
    return x, hms, mask, enc.astype(np.int32)

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
  tj = tf.constant(joints)
  hm = tf.function(lambda j: (targets.generate_heatmaps(j, H, 2.0),
                              targets.encode_joints(j, H, M)))
  ops = {
      'decode cv2.imdecode': lambda: cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB),
      'decode tf.io.decode_jpeg': lambda: tf.io.decode_jpeg(tdata, channels=3),
      'warp 512 cv2.warpAffine': lambda: cv2.warpAffine(img, mat, (S, S)),
      'warp 512 tf ImageProjectiveTransformV3': lambda: warp(fimg),
      'targets tf graph (6 people)': lambda: hm(tj),
      'targets numpy twins (6 people, used)': lambda: (
          targets.generate_heatmaps_np(joints, H, 2.0),
          targets.encode_joints_np(joints, H, M)),
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

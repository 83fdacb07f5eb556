r"""End-to-end eval img/s: ae_jax's batched stream vs an mmpose-style loop.

  python -m bench.bench_eval [--config configs/coco512.py] [--max_images 4]
      [--scales 1 --scales 2,1,0.5]

Both sides run in this process on the same decoded mini-COCO images and
cores, one after the other, per scale setting:
- ours: predict.Predictor.stream (batches per shape bucket over
  the local devices, NMS/top-k on device, host grouping in threads
  overlapped with the device, only candidates + refine's joints to host);
- mmpose-style: per image and scale a jitted forward of the image and one
  of its mirror (mmpose's forward_test), full maps to the host, numpy flip
  and torch bilinear resize, the `munkres` parser of
  tests/references/mmpose_grouping.py (loops, refine over all K full maps
  per person), transform to the image.
The first pass over the images (compiles) is timed separately from a
second, warm pass; img/s are of the warm pass. Weights: model.init (random;
few peaks pass the 0.1 threshold, so grouping is light). Writes
bench/RESULTS_eval_e2e.md (included in RESULTS_eval.md by hand).
"""

import argparse
import os
import subprocess
import time

import jax
import numpy as np
import torch

from ae_jax import keypoints
from ae_jax.data import eval_input
from ae_jax.infer import decode
from ae_jax.infer import predict
from ae_jax.models import ae_model
from bench import common
from configs import coco512
from tests.references import mmpose_grouping

COCO_MINI = os.path.join(os.path.dirname(__file__), '..', 'data', 'coco_mini')


def reference_predict(apply, variables, image, test, num_joints=17):
  """mmpose-style per-image eval; returns poses [P, K, 3], scores, bytes."""
  scales = sorted(test['scales'], reverse=True)
  min_scale = min(scales)
  (bw, bh), center, scale = eval_input.get_multi_scale_size(
      image.shape[0], image.shape[1], test['input_size'], 1.0, min_scale)
  moved = 0

  def resize(x):  # [h, w, C] -> (bh, bw), torch bilinear
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]
    t = torch.nn.functional.interpolate(t, size=(bh, bw), mode='bilinear',
                                        align_corners=False)
    return t[0].permute(1, 2, 0).numpy()

  heats, tags = [], None
  for s in scales:
    x = eval_input.resize_align(image, test['input_size'], s, min_scale)
    x = ((x.astype(np.float32) / 255 - keypoints.IMAGENET_MEAN) /
         keypoints.IMAGENET_STD)[None]
    out = np.asarray(apply(variables, x))[0]
    moved += out.nbytes
    heat, tag_list = resize(out[..., :num_joints]), [resize(
        out[..., num_joints:])]
    if test['flip']:
      out_f = np.asarray(apply(variables, x[:, :, ::-1].copy()))[0][:, ::-1]
      moved += out_f.nbytes
      flip = keypoints.FLIP_INDEX[:num_joints]
      heat = (heat + resize(out_f[..., :num_joints][..., flip])) / 2
      tag_list.append(resize(out_f[..., num_joints:][..., flip]))
    heats.append(heat)
    if s == 1 or len(scales) == 1:
      tags = np.stack(tag_list, -1)
  heat = (sum(heats) / len(heats)).transpose(2, 0, 1)
  poses, scores = mmpose_grouping.reference_parse(
      heat, tags.transpose(2, 0, 1, 3), solver='munkres')
  poses = decode.transform_to_image(poses, center, scale, (bw, bh))
  return poses[..., :3], scores, moved


class _TimedApply:
  """A jitted forward that sums the seconds it runs (blocking)."""

  def __init__(self, apply):
    self.apply, self.seconds = apply, 0.0

  def __call__(self, variables, x):
    start = time.perf_counter()
    out = jax.block_until_ready(self.apply(variables, x))
    self.seconds += time.perf_counter() - start
    return out


def _forward_seconds(model, variables, images, test):
  """Warm seconds per image of ours' forward alone: image + mirror batch.

  The same normalise + model.apply as predict_batch, per scale, on
  the same resized inputs; the stream's total minus this is the rest.
  """
  fwd = jax.jit(lambda v, x: model.apply(v, jax.numpy.stack(
      [ae_model.normalize_images(x), ae_model.normalize_images(x)[:, ::-1]]),
                                         train=False))
  scales = sorted(test['scales'], reverse=True)
  inputs = [eval_input.resize_align(im, test['input_size'], s, min(scales))
            for _, im in images for s in scales]
  for x in inputs:  # compile every shape
    jax.block_until_ready(fwd(variables, x))
  start = time.perf_counter()
  for x in inputs:
    jax.block_until_ready(fwd(variables, x))
  return (time.perf_counter() - start) / len(images)


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--max_images', type=int, default=4)
  parser.add_argument('--scales', action='append', default=None,
                      help='comma-separated test scales; repeatable')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), 'RESULTS_eval_e2e.md'))
  args = parser.parse_args()
  settings = [tuple(float(v) for v in s.split(','))
              for s in (args.scales or ['1', '2,1,0.5'])]
  config = coco512.get_config()
  model = ae_model.create_model(
      config.model, ae_model.default_kernels(jax.default_backend()))
  variables = jax.jit(model.init)(jax.random.key(0),
                                  np.zeros((1, 64, 64, 3), np.float32))
  images = [(ex.image_id, ex.image) for ex in eval_input.EvalImages(
      COCO_MINI, 'val2017', max_images=args.max_images)]
  apply = _TimedApply(jax.jit(lambda v, x: model.apply(v, x, train=False)))
  load = os.getloadavg()
  rows = []
  for scales in settings:
    test = dict(config.test)
    test.update(scales=scales)
    predictor = predict.Predictor(model, variables,
                                  predict.PredictOptions(**test))
    ref_test = {'scales': scales, 'input_size': test['input_size'],
                'flip': test['flip']}
    row = {'scales': list(scales)}
    for name, run in (
        ('ours', lambda: list(predictor.stream(images))),
        ('ref', lambda: [reference_predict(apply, variables, im, ref_test)
                         for _, im in images])):
      first, t_first = _timed(run)
      apply.seconds = 0.0
      second, t_warm = _timed(run)
      row[name] = (t_first - t_warm, len(images) / t_warm)
      row[name + '_split'] = (
          t_warm / len(images),
          (_forward_seconds(model, variables, images, test) if name == 'ours'
           else apply.seconds / len(images)))
      if name == 'ours':
        ours = {p.key: (p.poses.keypoints, p.poses.scores) for p in second}
        row['bytes'] = (np.mean([p.bytes_to_host for p in second]),
                        np.mean([p.full_map_bytes for p in second]))
      else:
        ref_bytes = np.mean([r[2] for r in second])
        same = all(
            ours[k][0].shape == r[0].shape and
            np.allclose(ours[k][0], r[0], atol=1e-2)
            for (k, _), r in zip(images, second))
      del first
    row['bytes'] += (ref_bytes,)
    row['same'] = same
    rows.append(row)
    print(row, flush=True)
  uptime = subprocess.run(['uptime'], capture_output=True, text=True,
                          check=False).stdout.strip()
  lines = [
      '## End-to-end eval: ae_jax stream vs mmpose-style loop',
      '',
      f'Machine: {common.machine()}, backend {jax.default_backend()} '
      f'({jax.local_device_count()} device(s)); load before the run '
      f'{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, after: `{uptime}`.',
      f'`python -m bench.bench_eval`: {len(images)} mini-COCO images, '
      f'configs/coco512.py (512 model, flip), random init; compile = first '
      'pass minus warm pass.',
      '',
      '| scales | ours img/s | mmpose-style img/s | speed-up | compile ours / '
      'ref (s) | device->host MB/img ours (full maps) / ref | same poses |',
      '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f'| {r["scales"]} | {r["ours"][1]:.3f} | {r["ref"][1]:.3f} | '
        f'{r["ours"][1] / r["ref"][1]:.2f}x | {r["ours"][0]:.1f} / '
        f'{r["ref"][0]:.1f} | {r["bytes"][0] / 1e6:.3f} '
        f'({r["bytes"][1] / 1e6:.1f}) / {r["bytes"][2] / 1e6:.1f} | '
        f'{"yes" if r["same"] else "no"} |')
  lines += [
      '',
      'Split per image (warm, seconds): forward = model.apply of image + '
      'mirror at every scale (ours: timed alone on the same inputs and '
      'shapes; mmpose-style: its own forward calls inside the loop), rest = '
      'total - forward (resize, flip, aggregation, NMS / top-k, transfers, '
      'grouping, dispatch).',
      '',
      '| scales | ours total / forward / rest | mmpose-style total / forward '
      '/ rest | speed-up of the rest |', '|---|---|---|---|']
  for r in rows:
    (ot, of), (rt, rf) = r['ours_split'], r['ref_split']
    lines.append(
        f'| {r["scales"]} | {ot:.2f} / {of:.2f} / {ot - of:.2f} | '
        f'{rt:.2f} / {rf:.2f} / {rt - rf:.2f} | '
        f'{(rt - rf) / max(ot - of, 1e-9):.1f}x |')
  common.write_report(lines, args.out)


if __name__ == '__main__':
  main()

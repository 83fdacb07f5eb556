r"""Per-image latency: the ONNX predictor (onnxruntime) vs the JAX CPU path.

  python -m bench.bench_deploy [--ckpt DIR] [--config coco512]
      [--rounds 3] [--threads 2] [--int8] [--out bench/RESULTS_deploy.md]

Same run, same decoded mini-COCO images, single scale at the config's
test input_size (coco512: 512; coco_mini: 256, what that model trained
for), flip off and on:
- JAX: predict.Predictor (eval.py's path: the kernels it picks for the CPU
  backend, jitted maps + candidates, host decode), one image at a time;
- ONNX: deploy/predictor.OnnxPredictor on the export.py --format onnx graph
  of the same variables (onnxruntime CPU, --threads intra-op threads),
  split into the graph run and the host side (resize-align, decode, refine);
- with --int8 also the graph quantised by onnxruntime's quantize_static
  (`quantize_int8` below: int8 per-channel convolution weights, uint8
  activations calibrated MinMax on the same 4 images, QDQ; the rest of the
  graph stays float32). Measured only: it did not help (README "int8"),
  so export.py does not offer it.
Each path first runs every image once (compiles, session warm-up), then
--rounds timed passes; the median per image is reported. Also the file
sizes and the pose agreement of each ONNX path with the JAX path (joints
within 1 px and 0.01 score after pairing people; tests/test_deploy.py's
measure). Weights: --ckpt (e.g. a trained mini COCO workdir), else
model.init. Writes bench/RESULTS_deploy.md.
"""

import argparse
import importlib
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from ae_jax import keypoints
from ae_jax.data import coco
from ae_jax.data import eval_input
from ae_jax.deploy import onnx_export
from ae_jax.deploy import predictor as deploy_predictor
from ae_jax.infer import predict
from ae_jax.models import ae_model
from ae_jax.train import checkpoints
from bench import common
from tests.references import pose_agreement

COCO_MINI = os.path.join(os.path.dirname(__file__), '..', 'data', 'coco_mini')
OUT = os.path.join(os.path.dirname(__file__), 'RESULTS_deploy.md')


def quantize_int8(float_path: str, out_path: str, images, input_size: int):
  """onnxruntime static int8 quantisation of the graph's convolutions."""
  from onnxruntime import quantization  # pylint: disable=g-import-not-at-top
  feeds = iter([{'images': eval_input.resize_inputs(
      image, input_size, (1.0,)).images[0][None]} for image in images])

  class Reader(quantization.CalibrationDataReader):

    def get_next(self):
      return next(feeds, None)

  quantization.quantize_static(
      float_path, out_path, Reader(),
      quant_format=quantization.QuantFormat.QDQ,
      op_types_to_quantize=['Conv', 'ConvTranspose'], per_channel=True,
      activation_type=quantization.QuantType.QUInt8,
      weight_type=quantization.QuantType.QInt8,
      calibrate_method=quantization.CalibrationMethod.MinMax)
  return out_path


def _median_ms(fn, images, rounds):
  """fn(image) once per image (warm-up), then rounds: median ms per image."""
  for image in images:
    fn(image)
  times = []
  for _ in range(rounds):
    for image in images:
      start = time.perf_counter()
      fn(image)
      times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def _onnx_split(onnx_predictor, images, rounds):
  """Median ms per image of the graph run and of everything else."""
  graph, host = [], []
  for r in range(rounds + 1):
    for image in images:
      start = time.perf_counter()
      x = eval_input.resize_inputs(image, onnx_predictor.input_size, (1.0,))
      prep = time.perf_counter()
      out = onnx_predictor.run(x.images[0][None])
      ran = time.perf_counter()
      onnx_predictor.decode_image(out, 0, x)
      done = time.perf_counter()
      if r:
        graph.append((ran - prep) * 1e3)
        host.append((prep - start + done - ran) * 1e3)
  return statistics.median(graph), statistics.median(host)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--ckpt', default=None)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--int8', action='store_true')
  parser.add_argument('--config', default='coco512',
                      help='a module of configs/ (model and test groups)')
  parser.add_argument('--out', default=OUT)
  args = parser.parse_args()
  config = importlib.import_module(f'configs.{args.config}').get_config()
  model_config = {**config.model, 'num_joints': 17}
  if args.ckpt:
    variables = checkpoints.restore_variables(args.ckpt)
    weights = f'--ckpt {args.ckpt}'
  else:
    variables = ae_model.create_model(model_config).init(
        jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
    weights = 'model.init (random)'
  variables = jax.tree_util.tree_map(np.asarray, variables)
  images = [coco.decode_image(os.path.join(COCO_MINI, 'val2017', name))
            for name in sorted(os.listdir(os.path.join(COCO_MINI,
                                                       'val2017')))]
  kernels = ae_model.default_kernels(jax.default_backend())
  model = ae_model.create_model(model_config, kernels)
  tmp = tempfile.mkdtemp(prefix='bench_deploy_')
  rows, sizes = [], {}
  for flip in (False, True):
    test = {**config.test, 'scales': (1.0,), 'flip': flip}
    jax_predictor = predict.Predictor(model, variables, predict.PredictOptions(
        **test, flip_index=keypoints.COCO.flip_index))
    paths = {'float32': onnx_export.export_onnx(
        model_config, variables, os.path.join(tmp, f'flip{int(flip)}.onnx'),
        spec=keypoints.COCO, test=test)}
    if args.int8:
      paths['int8'] = quantize_int8(
          paths['float32'], paths['float32'][:-5] + '_int8.onnx',
          images, int(test['input_size']))
    for name, path in paths.items():
      sizes[name] = os.path.getsize(path) / 1e6
    jax_ms = _median_ms(jax_predictor, images, args.rounds)
    want = [jax_predictor(image) for image in images]
    rows.append((flip, 'JAX (predict.Predictor, '
                 f'{kernels} kernels)', jax_ms, None, None, None))
    for name, path in paths.items():
      onnx_predictor = deploy_predictor.OnnxPredictor(
          path, num_threads=args.threads)
      ms = _median_ms(onnx_predictor, images, args.rounds)
      graph_ms, host_ms = _onnx_split(onnx_predictor, images, args.rounds)
      same = [pose_agreement.agreement(onnx_predictor(image), w)
              for image, w in zip(images, want)]
      agree = sum(s[0] for s in same) / max(1, sum(s[1] for s in same))
      rows.append((flip, f'ONNX {name} (onnxruntime)', ms, graph_ms,
                   host_ms, agree))
  load = os.getloadavg()
  lines = [
      '# Deploy: ONNX predictor vs the JAX CPU path', '',
      f'Machine: {common.machine()}; load average {load[0]:.1f} at the end '
      f'of the run. Weights: {weights}. Config {args.config}. Mini COCO, 4 '
      f'images at {config.test.input_size} single scale, median of {args.rounds} timed passes per image after one '
      f'warm-up pass; onnxruntime {args.threads} intra-op threads. '
      f'Command: `python -m bench.bench_deploy --config {args.config}' +
      (f' --ckpt {args.ckpt}' if args.ckpt else '') +
      (' --int8' if args.int8 else '') + '`.', '',
      '| flip | path | ms / image | graph ms | host ms | vs JAX | joints '
      'agreeing with JAX |', '|---|---|---|---|---|---|---|']
  for flip, name, ms, graph_ms, host_ms, agree in rows:
    base = next(r[2] for r in rows if r[0] == flip and r[3] is None)
    lines.append(
        f'| {flip} | {name} | {ms:.0f} | '
        f'{"-" if graph_ms is None else f"{graph_ms:.0f}"} | '
        f'{"-" if host_ms is None else f"{host_ms:.0f}"} | '
        f'{base / ms:.2f}x | '
        f'{"-" if agree is None else f"{100 * agree:.2f}%"} |')
  lines += ['', 'File sizes (MB): ' + ', '.join(
      f'ONNX {k} {v:.1f}' for k, v in sizes.items())]
  common.write_report(lines, args.out)


if __name__ == '__main__':
  main()

r"""Prepared accelerator benchmark: one run on a GPU or TPU host, one table.

  python -m bench.accelerator               # pip installs .[cuda12] / .[tpu]
  python -m bench.accelerator --no-install  # the extra is already installed
  python -m bench.accelerator --smoke       # tiny sizes on CPU (the tests)

Run from the repository root. Unless --no-install (or --smoke) it first
prints and runs `pip install -e '.[cuda12]'` (nvidia-smi found) or
`.[tpu]` (/dev/accel* or /dev/vfio found); --extra chooses. Then, within
--budget_s (default 450 s, counted after the install, compiles included),
it measures on all local devices, in this order:
  train   the train step (train_step.make_train_step, targets rendered on
          device, Adam), for kernels 'flax' / 'cpu' (decomposed convs,
          models/cpu_kernels.py) x bfloat16 / float32 x BatchNorm 'global' /
          'per_device': img/s, MFU, all-reduces of the compiled step,
          compile time, compiled memory (XLA memory_analysis: arguments +
          temporaries) and the device's peak bytes in use so far
          (device.memory_stats(); cumulative);
  eval    predict.Predictor on the mini COCO images (flip test), single
          scale and [2, 1, 0.5]: device maps img/s and end to end with the
          host grouping (random weights unless --ckpt: grouping time
          depends on what the maps detect);
  input   the training input as train.py builds it on all host cores
          (bench.bench_pipeline's train_input / time_batches).
MFU = compiled FLOPs per step (XLA cost_analysis of the compiled, per-device
program) x steps/s / the device's peak (PEAK_TFLOPS below, or
--peak_tflops). Time guard: each part has a deadline (train 60%, eval 85%
of the budget); a train row is skipped when the previous row's time would
not fit, and a watchdog prints the table so far and exits at the budget.

Smoke (`--smoke`): widen 0.25, 64 px, batch 2 on one CPU device, one
train row (kernels 'cpu', bfloat16, per_device: the paths the other tests
do not compile), both eval rows, a 2-example input row; tests run it.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

from bench import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, M = 17, 30

# Dense peak TFLOPS per chip: (device_kind substring, bfloat16, float32 as
# XLA runs it at JAX's default precision). GPU float32 convs / dots use
# TF32 tensor cores by default (with jax_default_matmul_precision=highest
# use the FP32 peak: H100/H200 SXM 67, A100 19.5); TPU float32 runs as
# bfloat16 passes at the default precision. First match wins.
PEAK_TFLOPS = (
    ('H200', 989.0, 494.7),  # H100 SXM silicon, more HBM
    ('H100 PCIe', 756.0, 378.0),
    ('H100', 989.0, 494.7),  # SXM5
    ('A100', 312.0, 156.0),
    ('TPU v4', 275.0, 275.0),
    ('TPU v5 lite', 197.0, 197.0),  # v5e
    ('TPU v5', 459.0, 459.0),  # v5p
    ('TPU v6 lite', 918.0, 918.0),  # v6e
)
# (kernels, dtype, bn_stats), most informative first (the budget may cut).
TRAIN_ROWS = (
    ('flax', 'bfloat16', 'global'), ('flax', 'float32', 'global'),
    ('flax', 'bfloat16', 'per_device'), ('cpu', 'bfloat16', 'global'),
    ('flax', 'float32', 'per_device'), ('cpu', 'float32', 'global'),
    ('cpu', 'bfloat16', 'per_device'), ('cpu', 'float32', 'per_device'))
SMOKE_ROWS = (('cpu', 'bfloat16', 'per_device'),)  # flax fp32 global:
# what every train test compiles.
COLUMNS = ('part', 'setting', 'img/s', 'MFU', 'GFLOP/img',
           'all-reduces (MB)', 'compile s', 'memory GB', 'note')


def peak_tflops(device_kind: str, dtype: str):
  """The PEAK_TFLOPS entry for a device kind, or None (unknown, CPU)."""
  for name, bf16, fp32 in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else fp32
  return None


def detect_extra() -> str:
  """'cuda12', 'tpu' or '' from what the host has."""
  if shutil.which('nvidia-smi'):
    return 'cuda12'
  if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'):
    return 'tpu'
  return ''


def install(extra: str, dry: bool) -> None:
  """Prints, then (unless dry) runs the pip install of the extra."""
  cmd = [sys.executable, '-m', 'pip', 'install', '-e', f'.[{extra}]']
  print('install:', ' '.join(cmd), '(skipped)' if dry else '', flush=True)
  if not dry:
    subprocess.run(cmd, cwd=REPO, check=True)


class Report:
  """The rows so far; `table()` renders them (also from the watchdog)."""

  def __init__(self, header):
    self.header, self.rows, self.lock = header, [], threading.Lock()

  def add(self, **cells):
    with self.lock:
      self.rows.append(cells)
    print('  ' + ', '.join(f'{k}={v}' for k, v in cells.items()), flush=True)

  def table(self, footer=''):
    with self.lock:
      rows = list(self.rows)
    lines = list(self.header) + [
        '| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    for r in rows:
      lines.append('| ' + ' | '.join(str(r.get(c, '')) for c in COLUMNS)
                   + ' |')
    return '\n'.join(lines + ([footer] if footer else [])) + '\n'


def host_batch(b: int, size: int, seed: int = 0):
  """A train-input batch as the pipeline sends it (uint8 image and mask,
  3 people of keypoints in heatmap pixels)."""
  rng = np.random.default_rng(seed)
  h = size // 4
  kp = np.zeros((b, M, K, 3), np.float32)
  kp[:, :3, :, :2] = rng.uniform(0, h, size=(b, 3, K, 2))
  kp[:, :3, :, 2] = rng.uniform(size=(b, 3, K)) > 0.3
  return {'image': rng.integers(0, 256, (b, size, size, 3), np.uint8),
          'mask': np.ones((b, h, h), np.uint8), 'keypoints': kp}


def _gb(nbytes):
  return f'{nbytes / 1e9:.2f}' if nbytes else 'n/a'


def peak_memory():
  """Peak bytes in use on device 0 so far (None where not reported)."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def train_row(kind, model_config, num_devices, size, per_device, steps,
              deadline, peak):
  """Compiles and times one train-step variant; returns the row cells."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ae_jax import sharding  # pylint: disable=g-import-not-at-top
  from ae_jax.train import state as train_state  # pylint: disable=g-import-not-at-top
  from ae_jax.train import step as train_step  # pylint: disable=g-import-not-at-top
  from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top
  kernels, dtype, bn_stats = kind
  mesh = sharding.make_mesh(num_devices)
  b = per_device * mesh.size
  model = ae_model.create_model({**model_config, 'dtype': dtype}, kernels)
  lr_fn = train_state.make_lr_schedule(1.5e-3, 1000, 500, 0.001, (200, 260))
  state, shardings = train_state.create_train_state(
      jax.random.key(0), model, optax.adam(lr_fn), size, mesh)
  step_fn = train_step.make_train_step(mesh, shardings, model=model,
                                       lr_fn=lr_fn, bn_stats=bn_stats)
  batch = sharding.make_global_batch(host_batch(b, size), mesh)
  rng = sharding.put_replicated(jax.random.key(1), mesh)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan')))  # per device
  n_ar, ar_bytes = sharding.all_reduce_stats(compiled.as_text())
  mem = compiled.memory_analysis()
  mem_bytes = (getattr(mem, 'argument_size_in_bytes', 0) +
               getattr(mem, 'temp_size_in_bytes', 0)) if mem else 0
  t0 = time.perf_counter()
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  per_step = (time.perf_counter() - t0) / 2
  n = int(max(2, min(steps, (deadline - time.time()) / max(per_step, 1e-6)
                     * 0.5)))
  t0 = time.perf_counter()
  for _ in range(n):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  secs = (time.perf_counter() - t0) / n
  peak_used = peak_memory()
  mfu = (f'{flops / secs / (peak * 1e12) * 100:.1f}%' if peak else 'n/a')
  return dict(
      part='train', setting=f'kernels={kernels} {dtype} bn={bn_stats}',
      **{'img/s': f'{b / secs:.1f}', 'MFU': mfu,
         'GFLOP/img': f'{flops * mesh.size / b / 1e9:.1f}',
         'all-reduces (MB)': f'{n_ar} ({ar_bytes / 1e6:.1f})',
         'compile s': f'{compile_s:.0f}',
         'memory GB': f'{_gb(mem_bytes)} compiled, peak {_gb(peak_used)}',
         'note': f'batch {b} ({per_device}/device), {size} px, {n} steps, '
                 f'loss {float(metrics["total_loss"]):.4f}'})


def eval_rows(report, model_config, args, deadline):
  """Predictor img/s on the mini COCO, single and multi-scale."""
  import jax  # pylint: disable=g-import-not-at-top
  from ae_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
  from ae_jax.infer import predict  # pylint: disable=g-import-not-at-top
  from ae_jax.data import coco  # pylint: disable=g-import-not-at-top
  from ae_jax.data import eval_input  # pylint: disable=g-import-not-at-top
  from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(REPO, 'data/coco_mini/val2017/*.jpg')))
  images = [coco.decode_image(p) for p in paths[:args.eval_images]]
  model = ae_model.create_model(model_config, 'flax')
  variables = (checkpoints.restore_variables(args.ckpt) if args.ckpt else
               jax.jit(model.init)(jax.random.key(0),
                                   np.zeros((1, 64, 64, 3), np.float32)))
  test = default.get_config().test
  for scales in ((1.0,), args.multi_scales):
    if time.time() > deadline:
      report.add(part='eval', setting=f'scales {list(scales)}, flip',
                 note='skipped: time budget')
      continue
    options = predict.PredictOptions(
        **{**test, 'input_size': args.eval_size, 'scales': scales})
    pred = predict.Predictor(model, variables, options)

    def device(im):  # resize + predict_batch (maps and candidates)
      x = eval_input.resize_inputs(im, options.input_size, options.scales)
      return jax.block_until_ready(pred.run([x], 1))

    t0 = time.perf_counter()
    for im in images:  # compiles (one program per aspect bucket)
      device(im)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for im in images:
      device(im)
    maps_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    people = sum(len(pred(im)) for im in images)
    full_s = time.perf_counter() - t0
    n = len(images)
    report.add(part='eval', setting=f'scales {list(scales)}, flip',
               **{'img/s': f'{n / maps_s:.1f} maps + candidates, '
                           f'{n / full_s:.2f} end to '
                           'end', 'compile s': f'{compile_s:.0f}',
                  'memory GB': f'peak {_gb(peak_memory())}',
                  'note': f'{n} mini COCO images, input {args.eval_size}, '
                          f'{"ckpt" if args.ckpt else "random weights"}, '
                          f'{people} people grouped'})


def input_row(report, args):
  """bench_pipeline's train input on all host cores."""
  from bench import bench_pipeline  # pylint: disable=g-import-not-at-top
  cores = len(os.sched_getaffinity(0))
  if not args.smoke:  # all cores: cv2 1 thread per call, TF's pools
    bench_pipeline.limit_cores(cores)
  batches = max(1, args.input_examples // args.input_batch)
  ips, cpu_ms, nbytes = bench_pipeline.time_batches(
      bench_pipeline.train_input(cores, args.input_batch), batches,
      args.input_batch)
  report.add(part='input', setting=f'{cores} host cores, 512/128, augment',
             **{'img/s': f'{ips:.0f}',
                'note': f'{cpu_ms:.2f} cpu-ms/img, {nbytes / 1e6:.3f} MB/img '
                        f'to device, {batches * args.input_batch} examples'})


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--smoke', action='store_true')
  p.add_argument('--no-install', dest='no_install', action='store_true')
  p.add_argument('--extra', default='auto', help='auto, cuda12 or tpu')
  p.add_argument('--budget_s', type=float, default=0.0,
                 help='seconds after the install (0: 450; smoke: 1200)')
  p.add_argument('--devices', type=int, default=0, help='0: all local')
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--per_device_batch', type=int, default=24)  # mmpose's
  p.add_argument('--steps', type=int, default=20, help='timed train steps')
  p.add_argument('--peak_tflops', type=float, default=0.0,
                 help='override PEAK_TFLOPS (per device)')
  p.add_argument('--ckpt', default='', help='converted variables (eval)')
  p.add_argument('--eval_size', type=int, default=512)
  p.add_argument('--eval_images', type=int, default=4)
  p.add_argument('--input_examples', type=int, default=1024)
  p.add_argument('--input_batch', type=int, default=32)
  p.add_argument('--out', default='', help='also write the table here')
  args = p.parse_args(argv)
  args.multi_scales = (2.0, 1.0, 0.5)
  # Smoke: generous, so a loaded CI machine still runs every row.
  args.budget_s = args.budget_s or (1200.0 if args.smoke else 450.0)
  if args.smoke:
    args.size, args.per_device_batch, args.steps = 64, 2, 2
    args.devices = args.devices or 1
    args.eval_size, args.eval_images, args.multi_scales = 64, 1, (1.0, 0.5)
    args.input_examples, args.input_batch = 2, 2
  return args


def main(argv=None, watchdog=False) -> str:
  """Runs the benchmark; returns the table (also printed)."""
  args = parse(argv)
  extra = '' if args.smoke else (
      detect_extra() if args.extra == 'auto' else args.extra)
  if extra:
    install(extra, dry=args.no_install)
  elif not args.smoke:
    print('no GPU / TPU found: measuring on the CPU backend', flush=True)
  if args.smoke and 'jax' not in sys.modules:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  start = time.time()
  import jax  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  num_devices = args.devices or jax.local_device_count()
  kind = jax.local_devices()[0].device_kind
  model_config = dict(default.get_config().model)
  if args.smoke:
    model_config.update(widen_factor=0.25, num_deconv_filters=(16, 16, 16))
  peaks = {d: args.peak_tflops or peak_tflops(kind, d)
           for d in ('bfloat16', 'float32')}
  report = Report([
      '## Accelerator benchmark (bench/accelerator.py)', '',
      f'Machine: {num_devices} x {kind} '
      f'({jax.default_backend()}), host {common.machine()}; jax '
      f'{jax.__version__}; budget {args.budget_s:.0f} s after the install. '
      f'Peak TFLOPS per device used for MFU: bf16 {peaks["bfloat16"]}, '
      f'fp32 {peaks["float32"]} (bench/accelerator.py PEAK_TFLOPS).', ''])
  if watchdog:
    def stop():
      print(report.table('Stopped by the time budget: rows above only.'),
            flush=True)
      os._exit(0)  # pylint: disable=protected-access
    timer = threading.Timer(args.budget_s, stop)
    timer.daemon = True
    timer.start()
  train_end = start + 0.60 * args.budget_s
  eval_end = start + 0.85 * args.budget_s
  last_row_s = 0.0
  for row in (SMOKE_ROWS if args.smoke else TRAIN_ROWS):
    setting = 'kernels={} {} bn={}'.format(*row)
    if time.time() + last_row_s > train_end:
      report.add(part='train', setting=setting, note='skipped: time budget')
      continue
    t0 = time.time()
    try:
      report.add(**train_row(row, model_config, num_devices, args.size,
                             args.per_device_batch, args.steps, train_end,
                             peaks[row[1]]))
    except Exception as e:  # pylint: disable=broad-except
      report.add(part='train', setting=setting,
                 note=f'failed: {type(e).__name__}: {str(e)[:120]}')
    last_row_s = time.time() - t0
  eval_rows(report, model_config, args, eval_end)
  if time.time() < start + args.budget_s - 20:
    input_row(report, args)
  else:
    report.add(part='input', note='skipped: time budget')
  text = report.table(f'Total {time.time() - start:.0f} s.')
  print(text, end='', flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)
  return text


if __name__ == '__main__':
  os.chdir(REPO)
  main(sys.argv[1:], watchdog=True)

r"""Train-step throughput: JAX (ours) vs PyTorch, same model, same batch.

  python -m bench.bench_train_step [--batch 8] [--size 512] [--repeats 5]

Full AE + MobileNetV2 (widen 1.0, 3 x 256 deconv), fp32, one process on the
CPU. JAX runs side by side with both layer kernels
(`ae_model.create_model(..., kernels=)`): 'cpu' (ae_jax/models/cpu_kernels.py,
what train.py picks on CPU) and 'flax' (plain flax layers, the GPU / TPU
default). One step = forward + masked heatmap MSE + AE push/pull + backward +
Adam. PyTorch uses tests/torch_reference.AETorchModel (the same
architecture, mmpose keys) with a vectorised loss of the same definition,
in NCHW and channels_last, with as many intra-op threads as JAX gets cores.
Also reports XLA's compiled FLOPs per image (train step and forward) and,
per part, the gradient of the backbone alone and of the head alone (train
mode, loss mean(y^2)), to show where the two implementations differ.
Writes bench/RESULTS_train.md.

Legend: B batch, S input size, h = S/4, K=17, M=30.
"""

import argparse
import os
import time

import numpy as np

from bench import common

K, M = 17, 30


def make_batch(batch, size, seed=0):
  """A contract-shaped batch: random image, maps, 3 people per image."""
  rng = np.random.default_rng(seed)
  h = size // 4
  joints = np.zeros((batch, M, K, 2), np.int32)
  xy = rng.integers(0, h, size=(batch, 3, K, 2))
  joints[:, :3, :, 0] = np.arange(K) * h * h + xy[..., 1] * h + xy[..., 0]
  joints[:, :3, :, 1] = rng.uniform(size=(batch, 3, K)) > 0.3
  return {
      'image': rng.normal(size=(batch, size, size, 3)).astype(np.float32),
      'heatmaps': rng.uniform(size=(batch, h, h, K)).astype(np.float32),
      'mask': np.ones((batch, h, h), np.float32),
      'joints': joints}


def timed(fn):
  """Seconds of one call of `fn`."""
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def interleaved(runners, repeats):
  """Per-runner seconds of `repeats` calls, runners taking turns.

  The machine is shared: taking turns spreads load changes over all
  implementations instead of biasing one. Each runner is called once
  first (compile / allocator warm-up), untimed.
  """
  for fn in runners.values():
    fn()
  times = {name: [] for name in runners}
  for _ in range(repeats):
    for name, fn in runners.items():
      times[name].append(timed(fn))
  return times


def bench_jax(batch_np, fwd_batches, kernels):
  """JAX train step + forward-only runners, compiled FLOPs per image.

  The step is train.loop's (with its CPU compiler options); `kernels` is
  'flax' or 'cpu'.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ae_jax import sharding  # pylint: disable=g-import-not-at-top
  from ae_jax.train import state as train_state  # pylint: disable=g-import-not-at-top
  from ae_jax.train import step as train_step  # pylint: disable=g-import-not-at-top
  from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top
  from ae_jax.models import cpu_kernels  # pylint: disable=g-import-not-at-top
  size = batch_np['image'].shape[1]
  model = ae_model.create_model({}, kernels)
  mesh = sharding.make_mesh(1)
  lr_fn = train_state.make_lr_schedule(1.5e-3, 1000, 500, 0.001, (200, 260))
  state, shardings = train_state.create_train_state(
      jax.random.key(0), model, optax.adam(lr_fn), size, mesh)
  step_fn = train_step.make_train_step(mesh, shardings, model=model,
                                       lr_fn=lr_fn)
  batch = sharding.make_global_batch(batch_np, mesh)
  rng = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  b = batch_np['image'].shape[0]
  info = {'compile_s': compile_s, 'flops_train': _flops(compiled) / b}
  # A copy: the train step donates (deletes) the state's buffers.
  variables = jax.tree_util.tree_map(
      lambda a: a.copy(),
      {'params': state.params, 'batch_stats': state.batch_stats})
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  runners = {}
  for fb in fwd_batches:
    x = batch['image'][:fb]
    fwd = apply.lower(variables, x).compile()
    if fb == b:
      info['flops_fwd'] = _flops(fwd) / b
    runners[f'fwd{fb}'] = (
        lambda fwd=fwd, x=x: jax.block_until_ready(fwd(variables, x)))
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], batch, rng)
    jax.block_until_ready(metrics)

  runners['train'] = run
  runners.update(_jax_part_grads(kernels, batch_np))
  info['compiler_options'] = (cpu_kernels.compiler_options()
                              if jax.default_backend() == 'cpu' else None)
  return runners, info


def _jax_part_grads(kernels, batch_np):
  """Runners for d mean(y^2) / d params of the backbone and of the head."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top
  from ae_jax.models import cpu_kernels  # pylint: disable=g-import-not-at-top
  from ae_jax.models.ae_head import AEHead  # pylint: disable=g-import-not-at-top
  from ae_jax.models.mobilenet_v2 import MobileNetV2  # pylint: disable=g-import-not-at-top
  image = jnp.asarray(batch_np['image'])
  b, size = image.shape[0], image.shape[1]
  feats = jnp.asarray(np.random.default_rng(1).normal(
      size=(b, size // 32, size // 32, 1280)).astype(np.float32))
  defs = ae_model.module_defs(kernels)
  options = (cpu_kernels.compiler_options()
             if jax.default_backend() == 'cpu' else None)
  runners = {}
  for name, module, x in (
      ('backbone', MobileNetV2(conv=defs['conv'], norm=defs['norm']), image),
      ('head', AEHead(**defs), feats)):
    variables = module.init(jax.random.key(0), x)

    def loss(params, x, module=module, stats=variables['batch_stats']):
      y, _ = module.apply({'params': params, 'batch_stats': stats}, x,
                          train=True, mutable=['batch_stats'])
      return jnp.mean(y * y)

    grad = jax.jit(jax.grad(loss)).lower(variables['params'], x).compile(
        compiler_options=options)
    runners[name] = (lambda grad=grad, p=variables['params'], x=x:
                     jax.block_until_ready(grad(p, x)))
  return runners


def _flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def torch_losses(out, heatmaps, mask, joints):
  """The spec's losses in torch, vectorised like ae_jax.train.losses."""
  import torch  # pylint: disable=g-import-not-at-top
  hm = (((out[:, :K] - heatmaps) ** 2) * mask[:, None]).mean(dim=(1, 2, 3))
  tags = out[:, K:].reshape(out.shape[0], -1)
  idx = joints[..., 0].reshape(out.shape[0], -1)
  jt = torch.gather(tags, 1, idx).reshape(joints.shape[:-1])
  vis = (joints[..., 1] > 0).float()
  n = vis.sum(-1)
  person = (n > 0).float()
  mean = (jt * vis).sum(-1) / n.clamp(min=1)
  pull_p = (((jt - mean[..., None]) ** 2) * vis).sum(-1) / n.clamp(min=1)
  npeople = person.sum(-1)
  pull = (pull_p * person).sum(-1) / npeople.clamp(min=1)
  eye = torch.eye(M, device=out.device)
  pair = person[:, :, None] * person[:, None, :] * (1 - eye)
  e = torch.exp(-(mean[:, :, None] - mean[:, None, :]) ** 2) * pair
  pairs = npeople * (npeople - 1)
  push = torch.where(pairs > 0, e.sum((1, 2)) / pairs.clamp(min=1) * 0.5,
                     torch.zeros_like(pairs))
  return hm.mean() + 1e-3 * push.mean() + 1e-3 * pull.mean()


def bench_torch(batch_np, threads, channels_last, fwd_batches):
  """PyTorch train step + forward-only (eval, no_grad) runners."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests.references.torch_model import AETorchModel  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = AETorchModel().train()
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  opt = torch.optim.Adam(model.parameters(), lr=1.5e-3)
  image = torch.from_numpy(batch_np['image']).permute(0, 3, 1, 2)
  image = image.contiguous(memory_format=fmt)
  heatmaps = torch.from_numpy(batch_np['heatmaps']).permute(0, 3, 1, 2)
  mask = torch.from_numpy(batch_np['mask'])
  joints = torch.from_numpy(batch_np['joints']).long()

  def run():
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = torch_losses(model(image), heatmaps, mask, joints)
    loss.backward()
    opt.step()

  def forward(fb):
    model.eval()
    with torch.no_grad():
      model(image[:fb].contiguous(memory_format=fmt))

  runners = {f'fwd{fb}': (lambda fb=fb: forward(fb)) for fb in fwd_batches}
  runners['train'] = run
  feats = torch.from_numpy(np.random.default_rng(1).normal(
      size=(image.shape[0], 1280, image.shape[2] // 32,
            image.shape[3] // 32)).astype(np.float32))
  feats = feats.contiguous(memory_format=fmt)
  for name, module, x in (('backbone', model.backbone, image),
                          ('head', model.keypoint_head, feats)):

    def grad(module=module, x=x):
      module.zero_grad(set_to_none=True)
      y = module(x)
      (y * y).mean().backward()

    runners[name] = grad
  return runners


def _stats(times):
  """(median, min, max) of a list of seconds."""
  return float(np.median(times)), float(min(times)), float(max(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=512)
  parser.add_argument('--repeats', type=int, default=5,
                      help='timed train steps per implementation')
  parser.add_argument('--fwd-repeats', type=int, default=3)
  parser.add_argument('--part-repeats', type=int, default=3,
                      help='timed backbone / head gradients (0: skip)')
  parser.add_argument('--output', default=os.path.join(
      os.path.dirname(__file__), 'RESULTS_train.md'))
  args = parser.parse_args()
  threads = os.cpu_count()
  fwd_batches = sorted({1, args.batch})
  batch = make_batch(args.batch, args.size)
  impls = {'JAX (ours), kernels=cpu, jit, NHWC': 'cpu',
           'JAX (ours), kernels=flax, jit, NHWC': 'flax',
           'PyTorch, NCHW': False, 'PyTorch, channels_last': True}
  runners, info = {}, {}
  for name, impl in impls.items():
    if isinstance(impl, str):
      runners[name], info[impl] = bench_jax(batch, fwd_batches, impl)
    else:
      runners[name] = bench_torch(batch, threads, impl, fwd_batches)
  # Train steps, then forward passes; implementations take turns.
  train = interleaved({n: r['train'] for n, r in runners.items()},
                      args.repeats)
  fwd = {fb: interleaved({n: r[f'fwd{fb}'] for n, r in runners.items()},
                         args.fwd_repeats) for fb in fwd_batches}
  parts = {p: interleaved({n: r[p] for n, r in runners.items()},
                          args.part_repeats)
           for p in ('backbone', 'head') if args.part_repeats}
  names = list(impls)
  jax_names = [n for n in names if isinstance(impls[n], str)]
  torch_names = [n for n in names if n not in jax_names]
  ips = lambda n, secs, b: b / float(np.median(secs[n]))
  best = max(torch_names, key=lambda n: ips(n, train, args.batch))
  ratio = lambda secs, b, j, n: ips(j, secs, b) / ips(n, secs, b)
  lines = [
      '## Train step (bench/bench_train_step.py)', '',
      f'Machine: {common.machine()}; batch {args.batch}, '
      f'{args.size}x{args.size}, '
      f'fp32, {threads} threads each; {args.repeats} timed train steps per '
      f'implementation after one warm-up, implementations taking turns. '
      f'One step = forward + losses + backward + Adam. '
      f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; JAX compiler '
      f'options {info["cpu"]["compiler_options"]} '
      f'(ae_jax.models.cpu_kernels, both JAX rows); JAX layers: '
      f'kernels=cpu (GEMM / decomposed convs, fused BatchNorm) and '
      f'kernels=flax (nn.Conv, nn.ConvTranspose, nn.BatchNorm).', '',
      'Command: `python -m bench.bench_train_step` (defaults: --batch 8 '
      '--size 512 --repeats 5 --fwd-repeats 3).', '',
      '| implementation | s/step median (min-max) | images/s |',
      '|---|---|---|']
  for n in names:
    med, lo, hi = _stats(train[n])
    lines.append(f'| {n} | {med:.2f} ({lo:.2f}-{hi:.2f}) | '
                 f'{args.batch / med:.2f} |')
  lines.append('')
  for j in jax_names:
    per_step = [args.batch / t / ips(best, train, args.batch)
                for t in train[j]]
    lines.append(
        f'Ratio {j} / best PyTorch ({best}): '
        f'**{ratio(train, args.batch, j, best):.2f}x** (per-step ratios '
        f'{min(per_step):.2f}-{max(per_step):.2f}); vs '
        + ', '.join(f'{n}: {ratio(train, args.batch, j, n):.2f}x'
                    for n in torch_names) + '.')
  lines += [
      f'kernels=cpu / kernels=flax: '
      f'{ratio(train, args.batch, jax_names[0], jax_names[1]):.2f}x. '
      'Target JAX / PyTorch >= 1.3x.', '',
      f'Forward only (eval mode, no gradient), median of {args.fwd_repeats}:',
      '', '| implementation | ' + ' | '.join(
          f'batch {fb}: ms/batch, images/s' for fb in fwd_batches) + ' |',
      '|---|' + '---|' * len(fwd_batches)]
  for n in names:
    cells = [f'{np.median(fwd[fb][n]) * 1e3:.0f} ms, '
             f'{ips(n, fwd[fb], fb):.2f}' for fb in fwd_batches]
    lines.append(f'| {n} | ' + ' | '.join(cells) + ' |')
  lines.append('')
  for j in jax_names:
    lines.append(f'Forward ratio {j} / best PyTorch: ' + ', '.join(
        f'batch {fb} '
        f'{min(ratio(fwd[fb], fb, j, n) for n in torch_names):.2f}x'
        for fb in fwd_batches) + '.')
  lines += ['', 'XLA compiled FLOPs per image and step compile time:', '',
            '| kernels | train step GFLOP | forward GFLOP | compile s |',
            '|---|---|---|---|']
  for k, i in info.items():
    lines.append(f'| {k} | {i["flops_train"] / 1e9:.1f} | '
                 f'{i["flops_fwd"] / 1e9:.1f} | {i["compile_s"]:.0f} |')
  lines.append('')
  if parts:
    lines += [
        f'Per part, gradient of mean(y^2) in train mode, median of '
        f'{args.part_repeats} (seconds; the head takes a random '
        f'[B, S/32, S/32, 1280] map):', '',
        '| implementation | backbone | head |', '|---|---|---|']
    lines += [f'| {n} | ' + ' | '.join(
        f'{np.median(parts[p][n]):.2f}' for p in parts) + ' |' for n in names]
    lines.append('')
  common.write_report(lines, args.output)


if __name__ == '__main__':
  main()

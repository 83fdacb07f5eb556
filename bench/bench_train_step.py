r"""Train-step throughput: JAX (ours) vs PyTorch, same model, same batch.

  python -m bench.bench_train_step [--batch 8] [--size 512] [--steps 3]

Full AE + MobileNetV2 (widen 1.0, 3 x 256 deconv), fp32, one process on the
CPU. One step = forward + masked heatmap MSE + AE push/pull + backward +
Adam. PyTorch uses tests/torch_reference.AETorchModel (the same
architecture, mmpose keys) with a vectorised loss of the same definition,
in NCHW and channels_last, with as many intra-op threads as JAX gets cores.
Also reports XLA's compiled FLOPs per image (train step and forward).
Writes bench/RESULTS_train.md.

Legend: B batch, S input size, h = S/4, K=17, M=30.
"""

import argparse
import os
import platform
import subprocess
import time

import numpy as np

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


def time_steps(step, steps):
  """Median seconds of `steps` calls after 1 warm-up call (compile)."""
  t0 = time.perf_counter()
  step()
  first = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def bench_jax(batch_np, steps):
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ae_jax import sharding, train_lib  # pylint: disable=g-import-not-at-top
  from ae_jax.models.ae_model import AEModel  # pylint: disable=g-import-not-at-top
  size = batch_np['image'].shape[1]
  model = AEModel()
  mesh = sharding.make_mesh(1)
  lr_fn = train_lib.make_lr_schedule(1.5e-3, 1000, 500, 0.001, (200, 260))
  state, shardings = train_lib.create_train_state(
      jax.random.key(0), model, optax.adam(lr_fn), size, mesh)
  step_fn = train_lib.make_train_step(mesh, shardings, model=model,
                                      lr_fn=lr_fn)
  batch = sharding.make_global_batch(batch_np, mesh)
  rng = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  b = batch_np['image'].shape[0]
  flops_step = _flops(compiled) / b
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
      {'params': state.params, 'batch_stats': state.batch_stats},
      batch['image']).compile()
  flops_fwd = _flops(fwd) / b
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], batch, rng)
    jax.block_until_ready(metrics)

  _, median = time_steps(run, steps)
  return {'compile_s': compile_s, 'step_s': median,
          'flops_train': flops_step, 'flops_fwd': flops_fwd}


def _flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def torch_losses(out, heatmaps, mask, joints):
  """The spec's losses in torch, vectorised like ae_jax.losses."""
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


def bench_torch(batch_np, steps, threads, channels_last):
  import torch  # pylint: disable=g-import-not-at-top
  from tests.torch_reference import AETorchModel  # pylint: disable=g-import-not-at-top
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
    opt.zero_grad(set_to_none=True)
    loss = torch_losses(model(image), heatmaps, mask, joints)
    loss.backward()
    opt.step()

  _, median = time_steps(run, steps)
  return {'step_s': median}


def machine():
  cpu = subprocess.run(['bash', '-c', 'lscpu | grep "Model name"'],
                       capture_output=True, text=True).stdout.strip()
  cpu = ' '.join(cpu.replace('Model name:', '').split())
  return f'{os.cpu_count()} cores, {cpu or platform.processor()}'


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=512)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--output', default=os.path.join(
      os.path.dirname(__file__), 'RESULTS_train.md'))
  args = parser.parse_args()
  threads = os.cpu_count()
  batch = make_batch(args.batch, args.size)
  jx = bench_jax(batch, args.steps)
  tn = bench_torch(batch, args.steps, threads, channels_last=False)
  tc = bench_torch(batch, args.steps, threads, channels_last=True)
  ips = lambda r: args.batch / r['step_s']
  best_torch = max(ips(tn), ips(tc))
  rows = [
      ('JAX (ours), jit, NHWC', jx['step_s'], ips(jx)),
      ('PyTorch, NCHW', tn['step_s'], ips(tn)),
      ('PyTorch, channels_last', tc['step_s'], ips(tc)),
  ]
  lines = [
      '## Train step (bench/bench_train_step.py)', '',
      f'Machine: {machine()}; batch {args.batch}, {args.size}x{args.size}, '
      f'fp32, {threads} threads each, median of {args.steps} steps after '
      f'warm-up. One step = forward + losses + backward + Adam. '
      f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; JAX convs: '
      f'conv_impl auto (decomposed on CPU).', '',
      '| implementation | s/step | images/s |', '|---|---|---|']
  lines += [f'| {n} | {s:.2f} | {i:.2f} |' for n, s, i in rows]
  lines += [
      '',
      f'Ratio JAX / best PyTorch: **{ips(jx) / best_torch:.2f}x** '
      f'(vs NCHW {ips(jx) / ips(tn):.2f}x, vs channels_last '
      f'{ips(jx) / ips(tc):.2f}x). Target >= 1.3x.', '',
      f'XLA compiled FLOPs per image: train step '
      f'{jx["flops_train"] / 1e9:.1f} GFLOP, forward '
      f'{jx["flops_fwd"] / 1e9:.1f} GFLOP '
      f'(cost_analysis of the compiled programs / batch). '
      f'JAX step compile: {jx["compile_s"]:.0f} s.', '']
  text = '\n'.join(lines)
  print(text)
  with open(args.output, 'w') as f:
    f.write(text)


if __name__ == '__main__':
  main()

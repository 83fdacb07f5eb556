"""The train step: a pure `train_step` and its sharded `jax.jit`.

BatchNorm statistics, `bn_stats` (config.train.bn_stats):
  'global' (default): under `jax.jit` with the batch split over 'data',
    flax's BatchNorm computes its mean/variance over the *global* batch
    (XLA inserts the all-reduces: 111 in the compiled 8-device step, one
    per BatchNorm layer forward (mean, variance), one backward, plus the
    gradient's). The step is then independent of the device count (1
    device == 8 devices, tested) and at the paper's global batch of 192
    the estimate is only less noisy than mmpose's.
  'per_device': mmpose's DDP BatchNorm: forward, loss and gradient run
    per device under `jax.shard_map` over 'data' with statistics over the
    device's own examples; the gradients, metrics and the new running
    statistics are averaged with `lax.pmean` (XLA combines them: 2
    all-reduces of about the same bytes instead of 111, most of them
    small and latency-bound; README "Scale"). The result depends on the
    per-device batch, as mmpose's does.
  The default stays 'global': it keeps 1 device == N devices, so a run
  resumed on another device count continues the same computation;
  'per_device' is the choice on many devices where the small all-reduces
  cost step time (measure: bench/accelerator.py).
Running statistics use PyTorch's momentum (0.1), so they converge alike.

Legend: B global batch, S input size, h heatmap size, K=17 joints, M=30
people. Batch: image [B, S, S, 3] uint8 RGB (normalised on device by
ae_model.normalize_images; float32 input is taken as normalised), mask
[B, h, h] uint8/float32, keypoints [B, M, K, 3] float32, from which the step
renders heatmaps [B, h, h, K] float32 and joints [B, M, K, 2] int32
(data/device_targets.py); a batch may carry heatmaps and joints instead.
"""

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import optax

from ae_jax.train import losses
from ae_jax import sharding
from ae_jax.data import device_targets
from ae_jax.models import cpu_kernels
from ae_jax.models.ae_model import AEModel
from ae_jax.models.ae_model import normalize_images
from ae_jax.train.state import TrainState

BN_STATS = ('global', 'per_device')


def loss_and_grads(params: Any, batch_stats: Any, batch: Dict[str, Any],
                   step_rng: jax.Array, *, model: AEModel,
                   num_joints: int = 17, sigma: float = 2.0,
                   heatmap_factor: float = 1.0, push_factor: float = 0.001,
                   pull_factor: float = 0.001):
  """Targets, forward (train mode), losses and their gradient.

  BatchNorm statistics span the examples of `batch` as this function sees
  them: the global batch under jit, a device's shard under shard_map.

  Returns:
    (grads like params, loss parts {heatmap,push,pull,total}_loss, the
    updated batch_stats).
  """
  batch = device_targets.render_targets(batch, sigma=sigma)

  def loss_fn(params):
    outputs, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats},
        normalize_images(batch['image']), train=True,
        mutable=['batch_stats'],
        rngs={'dropout': step_rng})
    parts = losses.compute_losses(
        outputs, batch['heatmaps'], batch['mask'], batch['joints'],
        num_joints=num_joints, heatmap_factor=heatmap_factor,
        push_factor=push_factor, pull_factor=pull_factor)
    return parts['total_loss'], (parts, updates['batch_stats'])

  grads, (parts, new_stats) = jax.grad(loss_fn, has_aux=True)(params)
  return grads, parts, new_stats


def per_device(fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """`loss_and_grads` per device (mmpose's DDP), results averaged.

  Runs `fn(params, batch_stats, batch, rng)` under `jax.shard_map` over
  'data' on each device's shard of the batch (BatchNorm statistics over
  that shard), then `lax.pmean`s gradients, loss parts and the new
  running statistics over 'data' (equal shards: the mean of per-device
  batch means is the global batch mean, as DDP's gradient average).
  """
  axis = sharding.DATA_AXIS

  def local(params, batch_stats, batch, rng):
    # Per-device parameters, so the gradient is this device's own (its
    # transpose would otherwise psum it implicitly); averaged below.
    params = lax.pcast(params, axis, to='varying')
    return lax.pmean(fn(params, batch_stats, batch, rng), axis)

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(P(), P(), P(axis), P()), out_specs=P())


def train_step(state: TrainState, batch: Dict[str, jax.Array],
               rng: jax.Array, *, model: AEModel,
               lr_fn: optax.Schedule, num_joints: int = 17,
               sigma: float = 2.0, heatmap_factor: float = 1.0,
               push_factor: float = 0.001, pull_factor: float = 0.001,
               bn_mesh: Optional[jax.sharding.Mesh] = None
               ) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimisation step (pure; jitted by `make_train_step`).

  Args:
    state: the replicated TrainState.
    batch: global batch arrays (see legend), split over 'data'.
    rng: base key; the step key is fold_in(rng, step) (the model has no
      stochastic layer today, the key is passed as 'dropout' for those
      that may come).
    model: the AEModel (static).
    lr_fn: the schedule (for the lr metric; the optimizer holds its own).
    sigma: heatmap Gaussian sigma of the targets rendered from
      batch['keypoints'] (device_targets.render_targets).
    num_joints, heatmap_factor, push_factor, pull_factor: loss settings.
    bn_mesh: None: BatchNorm statistics over the global batch ('global');
      a mesh: per-device statistics on it (`per_device`, 'per_device').

  Returns:
    (new_state, metrics): metrics are float32 scalars heatmap_loss,
    push_loss, pull_loss, total_loss, lr, grad_norm, param_norm (of the
    updated params).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  grad_fn = functools.partial(
      loss_and_grads, model=model, num_joints=num_joints, sigma=sigma,
      heatmap_factor=heatmap_factor, push_factor=push_factor,
      pull_factor=pull_factor)
  if bn_mesh is not None:
    grad_fn = per_device(grad_fn, bn_mesh)
  grads, parts, batch_stats = grad_fn(state.params, state.batch_stats,
                                      batch, step_rng)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = dict(parts)
  metrics['lr'] = jnp.asarray(lr_fn(state.step), jnp.float32)
  metrics['grad_norm'] = optax.global_norm(grads)
  metrics['param_norm'] = optax.global_norm(new_state.params)
  return new_state, metrics


def make_train_step(mesh: jax.sharding.Mesh, state_shardings: Any, *,
                    bn_stats: str = 'global', **step_kwargs) -> Callable:
  """`train_step` jitted for `mesh`: (state, batch, rng) -> (state, metrics).

  The state keeps `state_shardings` and is donated; the batch is split
  over 'data'; rng and metrics are replicated. On a mesh of CPU devices
  the step compiles with the memory-optimised XLA:CPU scheduler (other
  backends use XLA's defaults).

  Args:
    mesh: the ('data',) mesh the step runs on.
    state_shardings: from `train_state.create_train_state`.
    bn_stats: 'global' or 'per_device' BatchNorm statistics (module
      docstring; config.train.bn_stats).
    **step_kwargs: the keyword-only arguments of `train_step` (model,
      lr_fn, loss settings).

  Raises:
    ValueError: an unknown `bn_stats`.
  """
  if bn_stats not in BN_STATS:
    raise ValueError(f"bn_stats must be 'global' or 'per_device': "
                     f'{bn_stats!r}')
  rep = sharding.replicated(mesh)
  on_cpu = mesh.devices.flat[0].platform == 'cpu'
  bn_mesh = mesh if bn_stats == 'per_device' else None
  return jax.jit(
      functools.partial(train_step, bn_mesh=bn_mesh, **step_kwargs),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), rep),
      out_shardings=(state_shardings, rep), donate_argnums=0,
      compiler_options=cpu_kernels.compiler_options() if on_cpu else None)

"""TrainState, the lr schedule, and building the state on a device mesh.

The state holds everything a resume needs: params, BatchNorm running
statistics, Adam moments and the step count (the lr schedule and the data
position both derive from the step).
"""

import math
from typing import Any, Dict, Sequence, Tuple

from flax.training import train_state as flax_train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ae_jax import checkpoints
from ae_jax import sharding
from ae_jax.data import transforms
from ae_jax.models.ae_model import AEModel


class TrainState(flax_train_state.TrainState):
  """flax TrainState plus BatchNorm running statistics."""
  batch_stats: Any


# ----------------------------------------------------------------- schedule


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Iterations per epoch; mmpose's train loader keeps the last partial
  batch (drop_last=False), hence the ceiling."""
  return max(1, math.ceil(num_examples / global_batch_size))


def scaled_lr(lr: float, global_batch_size: int, base_batch_size: int,
              scale_lr: bool) -> float:
  """Linear lr scaling for a global batch other than mmpose's 192."""
  return lr * global_batch_size / base_batch_size if scale_lr else lr


def make_lr_schedule(base_lr: float, num_steps_per_epoch: int,
                     warmup_steps: int = 500, warmup_ratio: float = 0.001,
                     decay_epochs: Sequence[int] = (200, 260),
                     decay_factor: float = 0.1) -> optax.Schedule:
  """mmcv 'step' policy with linear warmup, as an optax schedule.

  mmcv computes the step lr per epoch (base * factor^#(decay epochs <=
  epoch)) and, during the first `warmup_steps` iterations i, multiplies it
  by 1 - (1 - i / warmup_steps) * (1 - warmup_ratio). The optax count is
  the number of updates done, i.e. mmcv's runner.iter.

  Args:
    base_lr: lr after warmup (already batch-scaled if wanted).
    num_steps_per_epoch: converts decay epochs to steps.
    warmup_steps: lr_config.warmup_iters (0 disables warmup).
    warmup_ratio: lr_config.warmup_ratio.
    decay_epochs: lr_config.step.
    decay_factor: the step policy's gamma.

  Returns:
    step -> lr.
  """
  boundaries = [int(e) * num_steps_per_epoch for e in decay_epochs]
  stages = [optax.constant_schedule(base_lr * decay_factor**i)
            for i in range(len(boundaries) + 1)]
  step_lr = optax.join_schedules(stages, boundaries)
  if warmup_steps <= 0:
    return step_lr

  def warmup_factor(count):
    # ratio + (1 - ratio) * i / W, the same line as mmcv's expression;
    # optax.linear_schedule's (a - b) * (1 - i / W) + b form loses ~1e-5
    # relative precision to float32 cancellation in the first steps.
    frac = jnp.minimum(jnp.asarray(count, jnp.float32), warmup_steps)
    return warmup_ratio + (1.0 - warmup_ratio) * frac / warmup_steps

  return lambda count: step_lr(count) * warmup_factor(count)


# -------------------------------------------------------------- train state


def create_train_state(rng: jax.Array, model: AEModel,
                       tx: optax.GradientTransformation, input_size,
                       mesh: jax.sharding.Mesh,
                       shard_opt_state: bool = False
                       ) -> Tuple[TrainState, Any]:
  """Initialises a TrainState already placed on `mesh`.

  The abstract state comes from `jax.eval_shape`; `jax.jit` of the same
  init function with `out_shardings` then builds it in place (no host copy
  of the full state, no replicated-then-resharded arrays).

  Args:
    rng: init key.
    model: the AE model.
    tx: the optimizer.
    input_size: config.data.input_size, int S (square) or (W, H).
    mesh: device mesh.
    shard_opt_state: shard the Adam moments over 'data'.

  Returns:
    (state, state_shardings).
  """
  width, height = transforms.as_wh(input_size)

  def init(key):
    dummy = jnp.zeros((1, height, width, 3), jnp.float32)
    variables = model.init(key, dummy, train=False)
    return TrainState.create(apply_fn=model.apply,
                             params=variables['params'], tx=tx,
                             batch_stats=variables['batch_stats'])

  abstract = jax.eval_shape(init, rng)
  shardings = sharding.state_shardings(abstract, mesh, shard_opt_state)
  # XLA:CPU spends 10-30 s optimising the ~150 random initialisers of a
  # program that runs once; unoptimised code initialises in milliseconds.
  on_cpu = mesh.devices.flat[0].platform == 'cpu'
  options = {'xla_backend_optimization_level': 0} if on_cpu else None
  init_fn = jax.jit(init, out_shardings=shardings)
  state = init_fn.lower(rng).compile(compiler_options=options)(rng)
  return state, shardings


def load_backbone(state: TrainState, variables: Dict[str, Any],
                  source: str = '') -> TrainState:
  """Replaces the backbone params/BN stats with converted weights.

  Accepts full AEModel variables (uses their 'backbone' subtree only) or a
  backbone-only tree (e.g. a converted ImageNet MobileNetV2). The head
  keeps its initialisation; Adam moments are zeros either way.

  Raises:
    checkpoints.CheckpointError: when shapes or names do not match.
  """
  new_vars = {}
  for col in ('params', 'batch_stats'):
    tree = variables.get(col, {})
    tree = tree.get('backbone', tree)
    current = getattr(state, col)['backbone']
    want = jax.tree_util.tree_structure(current)
    got = jax.tree_util.tree_structure(tree)
    if want != got:
      raise checkpoints.CheckpointError(
          f'init checkpoint {source!r}: {col} backbone tree does not match '
          f'the model (widen_factor?)')

    def put(cur, new, col=col):
      if tuple(cur.shape) != tuple(np.shape(new)):
        raise checkpoints.CheckpointError(
            f'init checkpoint {source!r}: {col} shape {np.shape(new)} '
            f'!= model {cur.shape}')
      return jax.device_put(np.asarray(new, cur.dtype), cur.sharding)

    backbone = jax.tree_util.tree_map(put, current, tree)
    new_vars[col] = {**getattr(state, col), 'backbone': backbone}
  return state.replace(params=new_vars['params'],
                       batch_stats=new_vars['batch_stats'])

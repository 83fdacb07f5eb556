"""TrainState, the lr schedule, and building the state on a device mesh.

The state holds everything a resume needs: params, BatchNorm running
statistics, Adam moments and the step count (the lr schedule and the data
position both derive from the step).
"""

import math
from typing import Any, Callable, Dict, Sequence, Tuple

from absl import logging
import flax
from flax.training import train_state as flax_train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ae_jax import sharding
from ae_jax.data import transforms
from ae_jax.models import shapes
from ae_jax.models.ae_model import AEModel
from ae_jax.train import checkpoints


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
  init, _, shardings = init_layout(rng, model, tx, input_size, mesh,
                                   shard_opt_state)
  return init_on_mesh(init, rng, shardings), shardings


def init_on_mesh(init_fn: Callable[[jax.Array], TrainState], rng: jax.Array,
                 shardings: Any) -> TrainState:
  """`init_fn(rng)` built already placed with `shardings` (one jit)."""
  # XLA:CPU spends 10-30 s optimising the ~150 random initialisers of a
  # program that runs once; unoptimised code initialises in milliseconds.
  leaf = jax.tree_util.tree_leaves(shardings)[0]
  on_cpu = next(iter(leaf.device_set)).platform == 'cpu'
  options = {'xla_backend_optimization_level': 0} if on_cpu else None
  init = jax.jit(init_fn, out_shardings=shardings)
  return init.lower(rng).compile(compiler_options=options)(rng)


def state_from_checkpoint(tree: Dict[str, Any], model: AEModel,
                          tx: optax.GradientTransformation, input_size,
                          mesh: jax.sharding.Mesh,
                          shard_opt_state: bool = False
                          ) -> Tuple[TrainState, Any]:
  """A TrainState from a checkpoint's state dict, placed as
  `create_train_state` places a new one (nothing is initialised).

  Args:
    tree: flax state dict {'step', 'params', 'batch_stats', 'opt_state'}
      of jax arrays (checkpoints.TrainCheckpoints.restore).
    model, tx, input_size, mesh, shard_opt_state: as create_train_state.

  Returns:
    (state, state_shardings).

  Raises:
    checkpoints.CheckpointError: `tree` is another optimizer's state.
  """
  _, abstract, shardings = init_layout(jax.random.key(0), model, tx,
                                       input_size, mesh, shard_opt_state)
  return place_state(tree, abstract, shardings), shardings


def place_state(tree: Dict[str, Any], abstract: Any,
                shardings: Any) -> TrainState:
  """A checkpoint's state dict as the TrainState `abstract` (its
  structure), placed with `shardings` (no re-tracing of the model).

  Raises:
    checkpoints.CheckpointError: `tree` is another optimizer's state.
  """
  try:
    state = flax.serialization.from_state_dict(abstract, tree)
  except (ValueError, KeyError, TypeError) as e:
    raise checkpoints.CheckpointError(
        f'the checkpoint does not match this model/optimizer config: {e}'
    ) from None
  return jax.device_put(state, shardings)


def init_layout(rng: jax.Array, model: AEModel,
                tx: optax.GradientTransformation, input_size,
                mesh: jax.sharding.Mesh, shard_opt_state: bool = False):
  """(init(key) -> a fresh TrainState (params, BN statistics, Adam moments,
  step 0), its abstract state (jax.eval_shape), the state's NamedShardings
  on `mesh`); arguments as create_train_state (the shapes of the variables
  do not depend on input_size)."""
  width, height = transforms.as_wh(input_size)

  def init(key):
    dummy = jnp.zeros((1, height, width, 3), jnp.float32)
    variables = model.init(key, dummy, train=False)
    return TrainState.create(apply_fn=model.apply,
                             params=variables['params'], tx=tx,
                             batch_stats=variables['batch_stats'])

  abstract = jax.eval_shape(init, rng)
  return init, abstract, sharding.state_shardings(abstract, mesh,
                                                  shard_opt_state)


def load_pretrained(state: TrainState, variables: Dict[str, Any],
                    source: str = '') -> Tuple[TrainState, str]:
  """Initialises `state` from pretrained variables (`init_checkpoint`).

  A full checkpoint (a converted mmpose pose model, converted variables or
  an ae_jax workdir) fills backbone, head and BatchNorm statistics; a
  backbone-only one (a converted ImageNet MobileNetV2) fills the backbone
  and the head keeps its initialisation. A head that does not fit keeps
  its initialisation too, with one warning saying why: another joint count
  re-initialises `final_layer` only (the deconv layers still load, as
  mmcv's non-strict load skips tensors of another shape), other deconv
  widths the whole head. Step and Adam moments stay as created (0 and
  zeros for a new state): fine-tuning starts a fresh schedule.

  Args:
    state: a new TrainState (`create_train_state`), placed on its mesh.
    variables: {'params', 'batch_stats'} host arrays
      (checkpoints.restore_variables).
    source: the checkpoint path, for messages.

  Returns:
    (state, description): a one-line summary of what was loaded.

  Raises:
    checkpoints.CheckpointError: the backbone does not fit the model; the
      message names the widen_factor the checkpoint implies.
  """
  have = shapes.shapes_of({c: variables.get(c) or {}
                           for c in ('params', 'batch_stats')})
  want = shapes.shapes_of({'params': state.params,
                           'batch_stats': state.batch_stats})
  fits = lambda *under: not shapes.differing(have, want, under)
  got, mine = shapes.implied_config(have), shapes.implied_config(want)
  if not fits('backbone'):
    raise checkpoints.CheckpointError(
        f'init checkpoint {source}: its backbone does not fit the model '
        f'(checkpoint widen_factor={got.get("widen_factor", "?")}, '
        f'config.model.widen_factor={mine.get("widen_factor")})')
  load = ['backbone']
  if not any(p[1] == 'keypoint_head' for p in have):
    what = 'backbone (backbone-only checkpoint; head initialised)'
  elif fits('keypoint_head'):
    load.append('keypoint_head')
    what = 'backbone and head'
  else:
    deconv = state.params['keypoint_head'].keys() - {'final_layer'}
    if all(fits('keypoint_head', n) for n in deconv):
      load += [('keypoint_head', n) for n in deconv]
      part, key = 'keypoint_head.final_layer', 'num_joints'
    else:
      part, key = 'keypoint_head', 'num_deconv_filters'
    what = f'backbone and head, {part} re-initialised'
    where = ('the keypoint spec (config.data.keypoints)' if key == 'num_joints'
             else f'config.model.{key}')
    logging.warning(
        'init checkpoint %s: %s re-initialised: the checkpoint has %s=%s, '
        '%s has %s.', source, part, key, got.get(key), where, mine.get(key))
  new = {}
  for col, tree in (('params', state.params),
                    ('batch_stats', state.batch_stats)):
    tree = dict(tree)
    for where in load:
      top, *sub = (where,) if isinstance(where, str) else where
      if sub and sub[0] in tree[top]:
        tree[top] = {**tree[top], sub[0]: _put(tree[top][sub[0]],
                                               variables[col][top][sub[0]])}
      elif not sub and top in tree:
        tree[top] = _put(tree[top], variables[col][top])
    new[col] = tree
  state = state.replace(params=new['params'], batch_stats=new['batch_stats'])
  return state, (f'Initialised {what} (params and BatchNorm statistics) '
                 f'from {source}; training starts at step '
                 f'{int(state.step)} with fresh Adam moments.')


def _put(current, new):
  """Host arrays `new` placed like `current` (same dtype and sharding)."""
  return jax.tree_util.tree_map(
      lambda c, n: jax.device_put(np.asarray(n, c.dtype), c.sharding),
      current, new)

"""The train program of a config: model, schedule, state layout, jitted step
(and its compile: `compile_step`, with the memory line on accelerators).

`make_train_program` is the one place where a training config becomes the
step train.py runs: `loop.train_and_evaluate` calls it on the mesh of
the live devices, `ae_jax.aot.compiler` on a mesh of a TPU topology's
devices to compile the same step ahead of time (no second copy of the
model, optimizer, sharding or donation choices).

Legend: B global batch, S input size (H x W), h x w heatmap size, K joints,
M = config.data.max_people. The batch train.py feeds (data/pipeline.py's
contract, made global by sharding.make_global_batch): image [B, H, W, 3]
uint8, mask [B, h, w] uint8, keypoints [B, M, K, 3] float32.
"""

import dataclasses
from typing import Any, Callable, Dict, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from orbax.checkpoint import multihost

from ae_jax import sharding
from ae_jax.aot import hlo_stats
from ae_jax.data import transforms
from ae_jax.models import ae_model
from ae_jax.models.ae_model import AEModel
from ae_jax.train import state as train_state
from ae_jax.train import step as train_step


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """What train.py builds before its first step.

  Attributes:
    model: the AEModel (config.model, the spec's joint count, kernels).
    lr_fn: the (batch-scaled) warmup + step schedule.
    tx: the optimizer (Adam on lr_fn).
    init_fn: key -> a fresh TrainState (train_state.init_layout).
    abstract_state: the TrainState as ShapeDtypeStructs carrying their
      shardings, with the strong int32 step a run starts (or resumes) with.
    state_shardings: the state's NamedShardings on the mesh.
    step_fn: the jitted (state, batch, rng) -> (state, metrics), the state
      donated (train_step.make_train_step).
  """
  model: AEModel
  lr_fn: optax.Schedule
  tx: optax.GradientTransformation
  init_fn: Callable[[jax.Array], train_state.TrainState]
  abstract_state: Any
  state_shardings: Any
  step_fn: Callable


def lr_schedule(optim: ml_collections.ConfigDict, global_batch: int,
                epoch_steps: int) -> optax.Schedule:
  """config.optim -> the (batch-scaled) warmup + step schedule."""
  lr = train_state.scaled_lr(optim.lr, global_batch, optim.base_batch_size,
                             optim.scale_lr)
  return train_state.make_lr_schedule(
      lr, epoch_steps, optim.warmup_steps, optim.warmup_ratio,
      tuple(optim.decay_epochs), optim.decay_factor)


def make_train_program(config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh, *, num_joints: int,
                       epoch_steps: int, kernels: str,
                       init_rng: jax.Array) -> TrainProgram:
  """The model, optimizer, state layout and jitted step of `config`.

  Args:
    config: a configs/*.py training config.
    mesh: the ('data',) mesh the step runs on (live or a TPU topology's).
    num_joints: K, from the keypoint spec (keypoints.resolve_spec).
    epoch_steps: steps per epoch (the schedule's decay boundaries).
    kernels: 'flax' or 'cpu' layer kernels (ae_model.create_model).
    init_rng: the init key (its shape and dtype only are used here).
  """
  t = config.train
  lr_fn = lr_schedule(config.optim, t.global_batch_size, epoch_steps)
  model = ae_model.create_model(
      {**config.model, 'num_joints': num_joints}, kernels)
  tx = optax.adam(lr_fn)  # torch Adam defaults: betas (0.9, 0.999), eps 1e-8
  init_fn, abstract, shardings = train_state.init_layout(
      init_rng, model, tx, config.data.input_size, mesh,
      config.optim.shard_opt_state)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)
  # The loop runs with a strong int32 step (fresh or restored alike).
  abstract = abstract.replace(step=jax.ShapeDtypeStruct(
      (), jnp.int32, sharding=shardings.step))
  step_fn = train_step.make_train_step(
      mesh, shardings, model=model, lr_fn=lr_fn, num_joints=num_joints,
      sigma=config.data.sigma, heatmap_factor=config.loss.heatmap_factor,
      push_factor=config.loss.push_factor,
      pull_factor=config.loss.pull_factor, bn_stats=t.bn_stats)
  return TrainProgram(model, lr_fn, tx, init_fn, abstract, shardings,
                      step_fn)


def batch_shapes(config: ml_collections.ConfigDict, num_joints: int,
                 global_batch: int) -> Dict[str, Tuple[Tuple[int, ...],
                                                       Any]]:
  """name -> (shape, dtype) of the global batch the train input yields.

  The contract of data/pipeline.py (tests/test_train_program.py compares
  it with a real batch), without importing TensorFlow.
  """
  (in_w, in_h), (hm_w, hm_h) = transforms.train_sizes(
      config.data.input_size, config.data.heatmap_size)
  return {
      'image': ((global_batch, in_h, in_w, 3), np.uint8),
      'mask': ((global_batch, hm_h, hm_w), np.uint8),
      'keypoints': ((global_batch, config.data.max_people, num_joints, 3),
                    np.float32),
  }


def abstract_step_args(program: TrainProgram,
                       config: ml_collections.ConfigDict, num_joints: int,
                       mesh: jax.sharding.Mesh, global_batch: int):
  """(state, batch, rng) as ShapeDtypeStructs for `program.step_fn.lower`.

  The batch is split over 'data', the rng replicated (as the loop puts
  them); `global_batch` may differ from config.train.global_batch_size
  (ae_jax.aot.compiler searches the largest that fits).
  """
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
           for name, (shape, dtype) in batch_shapes(
               config, num_joints, global_batch).items()}
  key = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype,
                             sharding=sharding.replicated(mesh))
  return program.abstract_state, batch, rng


_MEETINGS = [0]  # barriers so far in this process (their ids must differ)


def compile_step(step_fn, state, batch, rng):
  """The step, compiled; multi-process: run by none before all compiled.

  gloo (the CPU collectives) gives a new communicator 30 s for every
  process to join it; a process still compiling (or loading) the step
  then was seen to fail the others ('Gloo context initialization failed:
  ... GetKeyValue() timed out'). The processes meet at a barrier of the
  coordination service (not a collective) after compiling. The compiled
  step's memory is logged once (log_step_memory).
  """
  compiled = step_fn.lower(state, batch, rng).compile()
  log_step_memory(compiled, jax.local_devices()[0])
  if jax.process_count() == 1:
    return compiled
  _MEETINGS[0] += 1
  multihost.sync_global_processes(
      f'ae_jax_step_compiled_{_MEETINGS[0]}', timeout=3600,
      processes=set(range(jax.process_count())))
  return compiled


def log_step_memory(compiled, device) -> str:
  """Logs the compiled step's per-device memory against the device's.

  The same counts as train.py --aot_topology (hlo_stats.compiled_memory);
  the capacity is `device.memory_stats()['bytes_limit']` where the backend
  reports it (GPU, TPU). Nothing is logged on the CPU backend (no device
  memory to run out of; the main job's output stays as it was).

  Returns:
    The logged line ('' when nothing was logged).
  """
  memory = hlo_stats.compiled_memory(compiled)
  if device.platform == 'cpu' or not memory:
    return ''
  limit = (device.memory_stats() or {}).get('bytes_limit')
  where = (f'of {limit / hlo_stats.GiB:.2f} GiB on {device.device_kind} '
           f'({100 * memory["total"] / limit:.0f}%)' if limit else
           f'per device; {device.device_kind} does not report its capacity')
  line = f'Compiled train step: {hlo_stats.memory_text(memory)} {where}.'
  logging.info('%s', line)
  return line

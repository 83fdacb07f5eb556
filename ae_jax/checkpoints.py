"""Orbax checkpoints: model variables (converted weights) and train state.

A *variables checkpoint* is a directory written by `save_variables` holding
{'params': ..., 'batch_stats': ...} for `AEModel` (what
convert_torch_weights.py writes and what eval.py/demo.py/train.py's
`init_checkpoint` read). `restore_variables` also accepts a training
workdir and then takes the variables of its latest step.

A *training checkpoint* is one step of an orbax CheckpointManager under
`{workdir}/checkpoints/{step}/` with two items:
  state/  {'step', 'params', 'batch_stats', 'opt_state'} (flax state dict
          of the TrainState; opt_state tuples become {'0': ..., '1': ...})
  meta/   json {'step', 'data_position', 'seed', 'global_batch_size'}: the
          train pipeline is deterministic from (seed, step), so the data
          position equals the step; it is recorded explicitly anyway.
"""

import os
from typing import Any, Dict, Optional, Tuple

import flax

import jax
import numpy as np
import orbax.checkpoint as ocp

Variables = Dict[str, Any]

STATE_ITEM = 'state'
META_ITEM = 'meta'


class CheckpointError(ValueError):
  """A checkpoint path that does not hold what was asked for."""


def save_variables(directory: str, variables: Variables) -> None:
  """Writes {'params', 'batch_stats'} (numpy or jax arrays) to `directory`."""
  directory = os.path.abspath(directory)
  tree = {'params': variables['params'],
          'batch_stats': variables.get('batch_stats', {})}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, tree, force=True)


def restore_variables(directory: str) -> Variables:
  """Reads model variables from a variables checkpoint or a train workdir.

  Returns host numpy arrays {'params': ..., 'batch_stats': ...}.
  Raises CheckpointError naming the path when nothing usable is there.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f'checkpoint directory not found: {directory}')
  latest = _latest_train_step_dir(directory)
  if latest is not None:
    return _restore_from_train_step(latest)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(directory)
  except Exception as e:  # orbax raises several types for a bad directory.
    raise CheckpointError(
        f'{directory} is not an ae_jax checkpoint (neither converted '
        f'variables nor a training workdir): {e}') from None
  if 'params' not in tree:
    raise CheckpointError(f'{directory} holds no "params"')
  return jax.tree_util.tree_map(np.asarray, dict(tree))


def _latest_train_step_dir(directory: str):
  """Path of the newest step of a train workdir's CheckpointManager, if any."""
  ckpt_root = os.path.join(directory, 'checkpoints')
  if not os.path.isdir(ckpt_root):
    return None
  steps = [int(d) for d in os.listdir(ckpt_root) if d.isdigit()]
  return os.path.join(ckpt_root, str(max(steps))) if steps else None


def _restore_from_train_step(step_dir: str) -> Variables:
  """Loads params/batch_stats from one step of a training checkpoint."""
  state_dir = os.path.join(step_dir, 'state')
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(state_dir)
  return jax.tree_util.tree_map(
      np.asarray, {'params': tree['params'],
                   'batch_stats': tree['batch_stats']})


def make_train_manager(workdir: str, max_to_keep: int = 3,
                       async_save: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager for `{workdir}/checkpoints` (items 'state', 'meta').

  Saves are asynchronous by default: `save_train_state` returns once the
  arrays are copied off the device; call `manager.wait_until_finished()`
  before relying on the files (done on exit, NaN stop and SIGTERM).
  """
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
      create=True)
  return ocp.CheckpointManager(directory, options=options,
                               item_names=(STATE_ITEM, META_ITEM))


def save_train_state(manager: ocp.CheckpointManager, step: int, state: Any,
                     meta: Dict[str, Any]) -> None:
  """Saves a flax TrainState (with batch_stats) and json `meta` at `step`."""
  tree = flax.serialization.to_state_dict(state)
  manager.save(step, args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardSave(tree),
      META_ITEM: ocp.args.JsonSave(dict(meta))}))


def restore_train_state(manager: ocp.CheckpointManager, state: Any,
                        step: Optional[int] = None) -> Tuple[Any, Dict]:
  """Restores a training checkpoint into the structure of `state`.

  Args:
    manager: from `make_train_manager`.
    state: a TrainState (concrete or of jax.ShapeDtypeStructs with
      shardings) giving the structure, dtypes and placement.
    step: the step to restore; default the latest.

  Returns:
    (restored TrainState, meta dict).

  Raises:
    CheckpointError: no checkpoint, or one that does not fit `state`
      (e.g. a different model config).
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'no training checkpoint in {manager.directory}')
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, 'sharding', None)),
      flax.serialization.to_state_dict(state))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(target),
        META_ITEM: ocp.args.JsonRestore()}))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
        f'training checkpoint {manager.directory}/{step} does not match '
        f'this model/optimizer config: {e}') from None
  return (flax.serialization.from_state_dict(state, restored[STATE_ITEM]),
          dict(restored[META_ITEM]))

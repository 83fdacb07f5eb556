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

Paths are `etils.epath` paths (`as_path`), so a workdir may be a local
directory or a URL orbax writes to (gs://, s3://); nothing here applies
os.path to it.
"""

from typing import Any, Dict, Optional, Tuple, Union

from etils import epath
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

Variables = Dict[str, Any]
PathLike = Union[str, epath.PathLike]

STATE_ITEM = 'state'
META_ITEM = 'meta'


class CheckpointError(ValueError):
  """A checkpoint path that does not hold what was asked for."""


def as_path(path: PathLike) -> epath.Path:
  """A workdir/checkpoint path: URLs (gs://...) as given, local absolute.

  orbax wants absolute paths; a relative local path is taken from the
  current directory, a URL is left exactly as it is.
  """
  path = epath.Path(path).expanduser()
  return path if path.is_absolute() else path.absolute()


def save_variables(directory: PathLike, variables: Variables) -> None:
  """Writes {'params', 'batch_stats'} (numpy or jax arrays) to `directory`."""
  directory = as_path(directory)
  tree = {'params': variables['params'],
          'batch_stats': variables.get('batch_stats', {})}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, tree, force=True)


def restore_variables(directory: PathLike) -> Variables:
  """Reads model variables from a variables checkpoint or a train workdir.

  Returns host numpy arrays {'params': ..., 'batch_stats': ...}.
  Raises CheckpointError naming the path when nothing usable is there.
  """
  directory = as_path(directory)
  if not directory.is_dir():
    raise CheckpointError(f'checkpoint directory not found: {directory}')
  latest = _latest_train_step_dir(directory)
  if latest is not None:
    return _restore_from_train_step(latest)
  try:
    tree = _restore_on_this_host(directory)
  except Exception as e:  # orbax raises several types for a bad directory.
    raise CheckpointError(
        f'{directory} is not an ae_jax checkpoint (neither converted '
        f'variables nor a training workdir): {e}') from None
  if 'params' not in tree:
    raise CheckpointError(f'{directory} holds no "params"')
  return jax.tree_util.tree_map(np.asarray, dict(tree))


def _restore_on_this_host(directory: epath.Path) -> Dict[str, Any]:
  """A StandardCheckpointer item, read onto this process's first device.

  Whatever topology wrote it: a checkpoint saved by 2 processes x 4 devices
  (or a pod) names devices this process does not have, so the saved
  shardings are replaced by one local device.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(directory).item_metadata
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        getattr(meta, 'tree', meta))
    return ckptr.restore(directory, target)


def _latest_train_step_dir(directory: epath.Path) -> Optional[epath.Path]:
  """Path of the newest step of a train workdir's CheckpointManager, if any."""
  ckpt_root = directory / 'checkpoints'
  if not ckpt_root.is_dir():
    return None
  steps = [int(d.name) for d in ckpt_root.iterdir() if d.name.isdigit()]
  return ckpt_root / str(max(steps)) if steps else None


def _restore_from_train_step(step_dir: epath.Path) -> Variables:
  """Loads params/batch_stats from one step of a training checkpoint."""
  tree = _restore_on_this_host(step_dir / 'state')
  return jax.tree_util.tree_map(
      np.asarray, {'params': tree['params'],
                   'batch_stats': tree['batch_stats']})


def make_train_manager(workdir: PathLike, max_to_keep: int = 3,
                       async_save: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager for `{workdir}/checkpoints` (items 'state', 'meta').

  Saves are asynchronous by default: `save_train_state` returns once the
  arrays are copied off the device; call `manager.wait_until_finished()`
  before relying on the files (done on exit, NaN stop and SIGTERM).
  """
  directory = as_path(workdir) / 'checkpoints'
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

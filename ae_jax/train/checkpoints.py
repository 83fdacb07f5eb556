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

A step folder that cannot be read (empty, half-copied, a truncated data
file) is *incomplete*: `newest_complete_step` (resume) skips it with one
warning naming it and the reason, and moves it aside to `{step}.incomplete`
so that the resumed run can write that step again; `restore_variables`
(eval, demo, export) skips it with the same warning and moves nothing.
Items are read in full by `orbax_items.read_item` before orbax restores
them.

Paths are `etils.epath` paths (`as_path`), so a workdir may be a local
directory or a URL orbax writes to (gs://, s3://); nothing here applies
os.path to it.
"""

import logging as std_logging
from typing import Any, Dict, Optional, Tuple, Union
import uuid

from absl import logging
from etils import epath
import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from ae_jax.models import model_fit
from ae_jax.train import orbax_items

Variables = Dict[str, Any]
PathLike = Union[str, epath.PathLike]

STATE_ITEM = 'state'
META_ITEM = 'meta'


class CheckpointError(ValueError):
  """A checkpoint path that does not hold what was asked for."""


class IncompleteCheckpointError(CheckpointError):
  """A training step that cannot be read (empty, half-written, truncated)."""


def as_path(path: PathLike) -> epath.Path:
  """A workdir/checkpoint path: URLs (gs://...) as given, local absolute.

  orbax wants absolute paths; a relative local path is taken from the
  current directory, a URL is left exactly as it is.
  """
  path = epath.Path(path).expanduser()
  return path if path.is_absolute() else path.absolute()


def save_variables(directory: PathLike, variables: Variables,
                   overwrite: bool = False) -> None:
  """Writes {'params', 'batch_stats'} (numpy or jax arrays) to `directory`.

  Nothing existing is lost: a non-empty `directory` is refused
  (CheckpointError) unless `overwrite` is set and it is a variables
  checkpoint (`is_variables_checkpoint`); a workdir or any other folder is
  always refused. The checkpoint is written into a temporary sibling and
  renamed into place, so a failed save leaves `directory` as it was.

  Raises:
    CheckpointError: `directory` may not be replaced, or its parent is not
      writable (checked before anything is written).
  """
  directory = as_path(directory)
  check_variables_target(directory, overwrite)
  tree = {'params': variables['params'],
          'batch_stats': variables.get('batch_stats', {})}
  tmp = _make_tmp_sibling(directory)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / 'new', tree)
    if directory.exists():  # empty, or a variables checkpoint to replace
      directory.rename(tmp / 'old')
    (tmp / 'new').rename(directory)
  except BaseException:
    if not directory.exists() and (tmp / 'old').exists():
      (tmp / 'old').rename(directory)  # put the previous one back
    raise
  finally:
    tmp.rmtree(missing_ok=True)


def check_variables_target(directory: PathLike, overwrite: bool = False
                           ) -> None:
  """Raises CheckpointError unless `save_variables` may write `directory`.

  Fine: a missing path whose parent can be created, an empty directory, or
  (with `overwrite`) a variables checkpoint. Callers run it before long
  work (convert_torch_weights.py checks before converting).
  """
  directory = as_path(directory)
  if directory.exists():
    if not directory.is_dir():
      raise CheckpointError(f'{directory} exists and is not a directory')
    if any(directory.iterdir()):
      if not overwrite:
        raise CheckpointError(
            f'{directory} exists and is not empty; choose a new directory '
            '(or overwrite=True / --overwrite to replace a variables '
            'checkpoint)')
      if not is_variables_checkpoint(directory):
        raise CheckpointError(
            f'{directory} is not a variables checkpoint (a training '
            'workdir or another folder): refusing to replace it even '
            'with overwrite')
  tmp = _make_tmp_sibling(directory)  # proves the parent is writable
  tmp.rmtree(missing_ok=True)


_ORBAX_ENTRIES = ('_CHECKPOINT_METADATA', '_METADATA', '_sharding',
                  'commit_success.txt', 'd', 'manifest.ocdbt', 'descriptor')


def is_variables_checkpoint(directory: PathLike) -> bool:
  """True for a directory `save_variables` wrote (and nothing else).

  Only orbax's own files, and a tree of exactly {'params', 'batch_stats'}
  (a train step's state item also has 'step' and 'opt_state').
  """
  directory = as_path(directory)
  names = [p.name for p in directory.iterdir()]
  if '_CHECKPOINT_METADATA' not in names or not all(
      n in _ORBAX_ENTRIES or n.startswith('ocdbt.process_') for n in names):
    return False
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(directory).item_metadata
  except Exception:  # pylint: disable=broad-except  # not an orbax item
    return False
  keys = set(getattr(meta, 'tree', meta) or ())
  return 'params' in keys and keys <= {'params', 'batch_stats'}


def _make_tmp_sibling(directory: epath.Path) -> epath.Path:
  """Creates `.{name}.tmp-{id}` beside `directory` (and missing parents).

  Creating it up front is the writability check: orbax, failing to create
  its own tmp folder, leaves non-daemon threads waiting for a signal that
  never comes, and the process hangs at exit.
  """
  tmp = directory.parent / f'.{directory.name}.tmp-{uuid.uuid4().hex[:8]}'
  for parent in directory.parents:
    if parent.exists():
      if not parent.is_dir():
        raise CheckpointError(
            f'cannot write {directory}: {parent} is not a directory')
      break
  try:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
  except OSError as e:
    where = f' ({e.filename})' if e.filename else ''
    raise CheckpointError(
        f'cannot write {directory}: {e.strerror or e}{where}') from None
  return tmp


def restore_variables(directory: PathLike) -> Variables:
  """Reads model variables from a variables checkpoint or a train workdir.

  Returns host numpy arrays {'params': ..., 'batch_stats': ...}. Of a
  workdir, the newest *complete* step is read (each newer, incomplete one
  gets one warning naming it; nothing is moved: readers leave the workdir
  as it is).

  Raises:
    CheckpointError: naming the path, when nothing usable is there (also a
      truncated variables checkpoint, or a workdir without a complete step).
  """
  directory = as_path(directory)
  if not directory.is_dir():
    raise CheckpointError(f'checkpoint directory not found: {directory}')
  ckpt_root = directory / 'checkpoints'
  steps = sorted((int(d.name) for d in ckpt_root.iterdir()
                  if d.name.isdigit()), reverse=True) if ckpt_root.is_dir(
                      ) else []
  if steps:
    return _restore_newest_complete(ckpt_root, steps)
  if not (directory / '_METADATA').exists():
    raise CheckpointError(
        f'{directory} is not an ae_jax checkpoint (neither converted '
        'variables nor a training workdir)')
  try:
    saved = orbax_items.read_item(directory)
  except orbax_items.UnreadableItemError as e:
    raise CheckpointError(f'{e} (a truncated or corrupt copy?)') from None
  if 'params' not in saved:
    raise CheckpointError(f'{directory} holds no "params"')
  return jax.tree_util.tree_map(np.asarray,
                                dict(_restore_on_this_host(directory, saved)))


def check_fits(variables: Variables, model_kwargs: Dict[str, Any],
               source: str) -> None:
  """Raises CheckpointError unless `variables` are AEModel(**model_kwargs)'s.

  The message names the first differing array and the config.model values
  the checkpoint implies (`model_fit.mismatch`).
  """
  problem = model_fit.mismatch(variables, model_kwargs)
  if problem:
    raise CheckpointError(f'{source} does not fit config.model: {problem}')


def _restore_newest_complete(ckpt_root: epath.Path, steps) -> Variables:
  """The variables of the newest of `steps` whose state reads fully."""
  bad = []
  for step in steps:
    step_dir = ckpt_root / str(step)
    try:
      saved = _read_state_item(step_dir)
    except IncompleteCheckpointError as e:
      bad.append((step, e))
      continue
    for bad_step, e in bad:
      logging.warning('Skipping incomplete checkpoint step %d: %s (using '
                      'step %d).', bad_step, e, step)
    tree = _restore_on_this_host(step_dir / STATE_ITEM, saved)
    return jax.tree_util.tree_map(
        np.asarray, {'params': tree['params'],
                     'batch_stats': tree['batch_stats']})
  raise CheckpointError(
      f'no complete training checkpoint in {ckpt_root} ('
      + '; '.join(f'step {s}: {e}' for s, e in bad) + ')')


def _restore_on_this_host(directory: epath.Path,
                          saved: Optional[Dict[str, Any]] = None
                          ) -> Dict[str, Any]:
  """A StandardCheckpointer item, read onto this process's first device.

  Whatever topology wrote it: a checkpoint saved by 2 processes x 4 devices
  (or a pod) names devices this process does not have, so the saved
  shardings are replaced by one local device. `saved`: its metadata tree,
  if already read.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if saved is None:
    saved = orbax_items.item_metadata(directory)
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      saved)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(directory, target)


def make_train_manager(workdir: PathLike, max_to_keep: int = 3,
                       async_save: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager for `{workdir}/checkpoints` (items 'state', 'meta').

  Saves are asynchronous by default: `save_train_state` returns once the
  arrays are copied off the device; call `manager.wait_until_finished()`
  before relying on the files (done on exit, NaN stop and SIGTERM).
  """
  directory = as_path(workdir) / 'checkpoints'
  _save_replicated_arrays_once()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
      create=True)
  return ocp.CheckpointManager(directory, options=options,
                               item_names=(STATE_ITEM, META_ITEM))


def _save_replicated_arrays_once() -> None:
  """orbax writes each replicated array from one replica (no slicing).

  orbax's default on CPU/TPU ("replica-parallel") has every replica write
  a slice of each replicated array, cut on its device: one small XLA
  compile per array shape and device at the first save of each run (264
  compiles, ~16 s of a 2-core CPU for configs/tiny.py; the end of a
  2-process test launch waited 20-40 s on them). The train state is
  replicated and small: replica 0 writes it whole, sharded arrays are
  written shard by shard as before. Sets orbax's global jax.Array handler.
  """
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(current, '_use_replica_parallel', True):
    handler = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False,
        array_metadata_store=getattr(current, '_array_metadata_store', None))
    # orbax warns on every override ('Type handler registry type ...
    # overriding jax.Array'); this one is ours and deliberate.
    absl_logger = std_logging.getLogger('absl')
    ours = lambda record: 'overriding' not in str(record.msg)
    absl_logger.addFilter(ours)
    try:
      ocp.type_handlers.register_type_handler(jax.Array, handler,
                                              override=True)
    finally:
      absl_logger.removeFilter(ours)


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
  target = _abstract(state)
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


def _abstract(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a TrainState's state dict."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, 'sharding', None)),
      flax.serialization.to_state_dict(state))


def _shape(leaf: Any):
  """A metadata/abstract leaf's shape, or 'missing' for None."""
  return 'missing' if leaf is None else tuple(leaf.shape)


def _read_state_item(step_dir: epath.Path) -> Dict[str, Any]:
  """Reads a train step's state item in full; its metadata tree.

  Raises:
    IncompleteCheckpointError: not a finished save, or a file of it cannot
      be read (`orbax_items.read_item`).
  """
  for name in ('_CHECKPOINT_METADATA', STATE_ITEM, META_ITEM):
    if not (step_dir / name).exists():
      raise IncompleteCheckpointError(f'{step_dir}: no {name} (not a '
                                      'finished orbax save)')
  try:
    return orbax_items.read_item(step_dir / STATE_ITEM)
  except orbax_items.UnreadableItemError as e:
    raise IncompleteCheckpointError(str(e)) from None


def check_train_step(manager: ocp.CheckpointManager, step: int,
                     state: Any) -> None:
  """Checks that step `step` reads fully into the structure of `state`.

  Every array is read (`orbax_items.read_item`: no orbax restore, which
  prints tracebacks long after a failed read) and the meta item parsed; the
  caller then restores a step known to be complete.

  Raises:
    IncompleteCheckpointError: the step cannot be read (not finalised,
      empty or half-written folder, a truncated or corrupt data file).
    CheckpointError: the step is readable but holds another model or
      optimizer (names the first differing array).
  """
  step_dir = epath.Path(manager.directory) / str(step)
  saved = _read_state_item(step_dir)
  flat_saved = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
  flat_target = dict(
      jax.tree_util.tree_flatten_with_path(_abstract(state))[0])
  for path in list(flat_target) + [p for p in flat_saved
                                   if p not in flat_target]:
    have, want = flat_saved.get(path), flat_target.get(path)
    if have is None or want is None or _shape(have) != _shape(want):
      raise CheckpointError(
          f'training checkpoint {step_dir} does not match this model/'
          f'optimizer config: {jax.tree_util.keystr(path)} is '
          f'{_shape(have)} there, {_shape(want)} here' +
          model_fit.implied_hint(flat_saved, flat_target))
  try:
    manager.restore(step, args=ocp.args.Composite(**{
        META_ITEM: ocp.args.JsonRestore()}))
  except Exception as e:  # pylint: disable=broad-except
    raise IncompleteCheckpointError(f'{step_dir}: unreadable {META_ITEM} '
                                    f'({orbax_items.reason(e)})') from None


def newest_complete_step(manager: ocp.CheckpointManager,
                         state: Any) -> Optional[int]:
  """The newest step of `manager` that reads fully into `state`.

  Every newer, incomplete step gets one warning naming it and the reason
  and is moved aside to `{step}.incomplete` (by process 0; all processes
  check the same shared files and agree), so the resumed run can save that
  step again. Steps are read in full (the data files too): a truncated
  array is found here, not half-way through the resume. Nothing is moved
  unless a complete step is found. Call `make_train_manager` again after a
  move (the manager caches its step list).

  Returns:
    The step, or None when the manager has no steps.

  Raises:
    CheckpointError: the newest readable step holds another model, or no
      step is complete (nothing is moved then).
  """
  bad = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      check_train_step(manager, step, state)
      break
    except IncompleteCheckpointError as e:
      bad.append((step, e))
  else:
    if not bad:
      return None
    raise CheckpointError(
        f'no complete training checkpoint in {manager.directory} ('
        + '; '.join(f'step {s}: {e}' for s, e in bad) + '); move the '
        'folder away to start afresh')
  sync = lambda name: None  # pylint: disable=unnecessary-lambda-assignment
  if bad and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    sync = multihost_utils.sync_global_devices
  sync('ae_jax_checked_steps')
  for bad_step, e in bad:
    step_dir = epath.Path(manager.directory) / str(bad_step)
    aside = step_dir.parent / f'{bad_step}.incomplete'
    n = 1
    while aside.exists():
      n += 1
      aside = step_dir.parent / f'{bad_step}.incomplete{n}'
    logging.warning('Skipping incomplete checkpoint step %d: %s (moved to '
                    '%s; resuming from step %d).', bad_step, e, aside.name,
                    step)
    if jax.process_index() == 0:
      step_dir.rename(aside)
  sync('ae_jax_moved_steps')
  return step

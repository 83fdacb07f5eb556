"""Orbax checkpoints: train steps, and reading any checkpoint; self-describing.

A variables checkpoint (variables_checkpoint.save_variables, what
convert_torch_weights.py writes) is one orbax PyTree {'params',
'batch_stats'}. A train step is `{workdir}/checkpoints/{step}/` of an orbax
CheckpointManager (`TrainCheckpoints`): item state/ (the TrainState's flax
state dict: step, params, batch_stats, opt_state) and item meta/ (json:
step, data_position, seed, global_batch_size). Both carry a `Record` of the
model config and keypoint spec they were made with (orbax's custom metadata;
older ones have none). Writes are orbax's atomic commits; reads take the
newest usable step (one scan, each step read once). Paths are etils.epath
(local or gs://).
"""

import contextlib
import dataclasses
from typing import Any, Dict, Mapping, Optional, Union

from absl import logging
from etils import epath
import flax
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from ae_jax import keypoints
from ae_jax.models import shapes
from ae_jax.train import orbax_shims
from ae_jax.train.orbax_shims import reason

Variables = Dict[str, Any]
PathLike = Union[str, epath.PathLike]
STATE_ITEM, META_ITEM = 'state', 'meta'
_STEPS = ocp.step.standard_name_format()  # step folders named {step}


class CheckpointError(ValueError):
  """A checkpoint that cannot be written, read or used as asked."""


class _Unusable(Exception):
  """A step that cannot be read (message: its folder and the cause)."""


@dataclasses.dataclass(frozen=True)
class Record:
  """What a checkpoint was made with: `model`, the AEModel keyword
  arguments known (widen_factor, num_deconv_filters, dtype, num_joints),
  and `spec`, the keypoint spec (None where unknown: an ImageNet backbone).
  """
  model: Mapping[str, Any]
  spec: Optional[keypoints.KeypointSpec] = None

  def to_json(self) -> Dict[str, Any]:
    return {'model': {k: list(v) if isinstance(v, tuple) else v
                      for k, v in self.model.items()},
            'keypoints': self.spec and keypoints.spec_to_dict(self.spec)}

  @classmethod
  def from_json(cls, custom: Optional[Mapping[str, Any]]
                ) -> Optional['Record']:
    if not custom or not isinstance(custom.get('model'), Mapping):
      return None  # written before checkpoints described themselves
    spec = custom.get('keypoints')
    return cls({k: tuple(v) if isinstance(v, list) else v
                for k, v in custom['model'].items()},
               spec and keypoints.spec_from_dict(spec))


@dataclasses.dataclass
class Restored:
  """A checkpoint read: `tree` (a train state dict, or the variables), its
  json `meta` ({} for variables), its `record` (None if it has none) and
  `step` (None for a variables checkpoint)."""
  tree: Dict[str, Any]
  meta: Dict[str, Any]
  record: Optional[Record]
  step: Optional[int]


def as_path(path: PathLike) -> epath.Path:
  """A workdir/checkpoint path: URLs (gs://...) as given, local absolute."""
  path = epath.Path(path).expanduser()
  return path if path.is_absolute() else path.absolute()


class TrainCheckpoints:
  """`{workdir}/checkpoints`, an orbax CheckpointManager opened on entering
  this context manager; leaving it waits for the asynchronous saves.

  A failed save (found then or at the next save) is one CheckpointError
  naming the path and the cause, raised once its half-written step is
  removed (orbax's logs of it are dropped while this is open). A step that
  cannot be read (empty, half-copied, a truncated file) is skipped with one
  warning naming it and the cause; a resume moves it aside to
  `{step}.incomplete` so the run can write that step again. `read_only`:
  for readers (eval, demo, export: nothing is created, moved or cleaned).
  """

  def __init__(self, workdir: PathLike, max_to_keep: int = 3,
               async_save: bool = True, read_only: bool = False):
    self.directory = as_path(workdir) / 'checkpoints'
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,
        save_interval_steps=0 if read_only else 1,  # no orbax warnings
        enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only,
        step_name_format=_STEPS)
    self._quiet = contextlib.ExitStack()
    self._open = False
    self.manager: Optional[ocp.CheckpointManager] = None

  def __enter__(self):
    """Opens the orbax CheckpointManager (while failures are quiet)."""
    self._quiet.enter_context(orbax_shims.failures_reported_once())
    handler = orbax_shims.pytree_handler()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.PyTreeSave, ocp.args.PyTreeRestore):
      registry.add(STATE_ITEM, args, handler)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
      registry.add(META_ITEM, args)
    try:
      with orbax_shims.read_only_notice_dropped():
        self.manager = ocp.CheckpointManager(
            self.directory, options=self._options, handler_registry=registry)
    except BaseException:
      self._quiet.close()
      raise
    self._open = True
    return self

  def __exit__(self, exc_type, *unused):
    try:
      if self._open:
        self._open = False
        self.manager.close()  # waits for the asynchronous saves
    except Exception as e:  # pylint: disable=broad-except  # any write error
      if exc_type is None:
        self._failed(e)
    finally:
      self._quiet.close()

  def save(self, step: int, state: Any, meta: Mapping[str, Any],
           record: Optional[Record] = None) -> None:
    """Saves a flax TrainState and json `meta` at `step` (asynchronously)."""
    args = ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeSave(flax.serialization.to_state_dict(
            state)), META_ITEM: ocp.args.JsonSave(dict(meta))})
    try:
      self.manager.save(step, args=args,
                        custom_metadata=record and record.to_json())
    except Exception as e:  # pylint: disable=broad-except  # any write error
      self._failed(e)

  def _failed(self, error: BaseException):
    """Closes, removes the half-written step, raises one CheckpointError."""
    self._open = False
    with contextlib.suppress(Exception):
      self.manager.close()
    if jax.process_index() == 0:
      with contextlib.suppress(Exception):
        for tmp in ocp.step.all_temporary_paths(self.directory):
          tmp.get().rmtree(missing_ok=True)
    raise CheckpointError(f'cannot write a checkpoint to {self.directory}: '
                          f'{reason(error)}') from None

  def restore(self, target_sharding: jax.sharding.Sharding,
              record: Optional[Record] = None) -> Optional[Restored]:
    """The newest usable step (None if there is none), the whole state
    dict read once onto `target_sharding` (a resume: replicated on the
    mesh, so every process reads every array and all reach one verdict).

    Args:
      target_sharding: where the arrays go.
      record: a resume's model config and keypoint spec: a step of another
        model or keypoints is a CheckpointError, not skipped, and newer
        unusable steps are moved aside. None (readers): nothing is moved.

    Raises:
      CheckpointError: see `record`; or steps exist and none is usable
        (nothing is moved then).
    """
    want = record and shapes.model_shapes(record.model)

    def read(step: int) -> Restored:
      where = self.directory / _STEPS.build_name(step)
      try:
        metadata = self.manager.metadata(step)
        saved = (metadata.item_metadata or {}).get(STATE_ITEM)
      except Exception as e:  # pylint: disable=broad-except  # orbax: several
        raise _Unusable(f'{where}: unreadable metadata ({reason(e)})'
                        ) from None
      if saved is None:
        raise _Unusable(f'{where}: no {STATE_ITEM} item (not a finished '
                        'orbax save)')
      saved = getattr(saved, 'tree', saved)
      saved_record = Record.from_json(metadata.custom_metadata)
      if record:
        _check_resume(where, saved, saved_record, want, record)
      try:
        got = self.manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: orbax_shims.restore_args(
                orbax_shims.placed(saved, target_sharding)),
            META_ITEM: ocp.args.JsonRestore()}))
      except Exception as e:  # pylint: disable=broad-except  # any read error
        raise _Unusable(f'{where}: {reason(e)}') from None
      return Restored(got[STATE_ITEM], dict(got[META_ITEM]), saved_record,
                      step)

    bad = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        found = read(step)
      except _Unusable as e:
        bad.append((step, e))
        continue
      if record and bad:
        self._move_aside(bad, step)
      for bad_step, e in () if record else bad:
        logging.warning('Skipping incomplete checkpoint step %d: %s (using '
                        'step %d).', bad_step, e, step)
      return found
    if bad:
      raise CheckpointError(
          f'no complete training checkpoint in {self.directory} ('
          + '; '.join(f'step {s}: {e}' for s, e in bad) + '); move the '
          'folder away to start afresh')
    return None

  def _move_aside(self, bad, step: int) -> None:
    """Renames unusable steps to {step}.incomplete (by process 0; every
    process has read the same files and agrees)."""
    multi = jax.process_count() > 1
    if multi:
      multihost_utils.sync_global_devices('ae_jax_checked_steps')
    for bad_step, e in bad:
      step_dir = self.directory / _STEPS.build_name(bad_step)
      aside, n = step_dir.parent / f'{bad_step}.incomplete', 1
      while aside.exists():
        n += 1
        aside = step_dir.parent / f'{bad_step}.incomplete{n}'
      logging.warning('Skipping incomplete checkpoint step %d: %s (moved to '
                      '%s; resuming from step %d).', bad_step, e, aside.name,
                      step)
      if jax.process_index() == 0:
        step_dir.rename(aside)
    if multi:
      multihost_utils.sync_global_devices('ae_jax_moved_steps')
    self.manager.reload()


def read_checkpoint(directory: PathLike) -> Restored:
  """The variables (host numpy {'params', 'batch_stats'}) and record of a
  variables checkpoint or of a workdir's newest usable step (each newer
  step gets one warning; nothing is moved).

  Raises:
    CheckpointError: naming the path, when nothing usable is there (also a
      truncated variables checkpoint, or a workdir without a usable step).
  """
  directory = as_path(directory)
  if not directory.is_dir():
    raise CheckpointError(f'checkpoint directory not found: {directory}')
  if (directory / 'checkpoints').is_dir():
    with TrainCheckpoints(directory, read_only=True) as ckpts:
      found = ckpts.restore(
          jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    if found is None:
      raise CheckpointError(f'no training checkpoint in {ckpts.directory}')
    found.tree = {k: found.tree[k] for k in ('params', 'batch_stats')}
  else:
    saved, metadata = saved_tree(directory)
    if not saved or 'params' not in saved:
      raise CheckpointError(
          f'{directory} is not an ae_jax checkpoint (neither converted '
          'variables nor a training workdir)')
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = orbax_shims.placed(dict(saved), device)
    with ocp.Checkpointer(orbax_shims.pytree_handler()) as ckptr, (
        orbax_shims.failures_reported_once()):
      try:
        tree = ckptr.restore(directory,
                             args=orbax_shims.restore_args(target))
      except Exception as e:  # pylint: disable=broad-except  # any read error
        raise CheckpointError(f'{directory}: {reason(e)} (a truncated or '
                              'corrupt copy?)') from None
    found = Restored(dict(tree), {}, Record.from_json(
        metadata.custom_metadata), None)
  found.tree = jax.tree_util.tree_map(np.asarray, found.tree)
  return found


def _check_resume(where, saved, saved_record: Optional[Record], want,
                  record: Record) -> None:
  """A step of another model, or trained on other keypoints, than this
  run's is an error (not an unusable step to skip)."""
  problem = shapes.mismatch(shapes.shapes_of(
      {k: v for k, v in saved.items() if k in ('params', 'batch_stats')}),
                            want)
  if problem:
    raise CheckpointError(f'training checkpoint {where} does not match '
                          f'this model/optimizer config: {problem}')
  diff = saved_record and saved_record.spec and record.spec and (
      keypoints.spec_difference(saved_record.spec, record.spec,
                                ('names', 'flip_index')))
  if diff:
    raise CheckpointError(
        f'training checkpoint {where} was trained on other keypoints than '
        f'config.data.keypoints gives: {diff}; resume with the same '
        'keypoints or train into a new --workdir')


def restore_variables(directory: PathLike) -> Variables:
  """`read_checkpoint(directory).tree`: {'params', 'batch_stats'}."""
  return read_checkpoint(directory).tree


def saved_tree(directory: epath.Path):
  """(the saved tree or None, orbax's StepMetadata) of a PyTree folder."""
  try:
    with ocp.Checkpointer(orbax_shims.pytree_handler()) as ckptr:
      metadata = ckptr.metadata(directory)
  except Exception:  # pylint: disable=broad-except  # not an orbax folder
    return None, None
  saved = metadata.item_metadata
  return getattr(saved, 'tree', saved), metadata

"""Writing a variables checkpoint: {'params', 'batch_stats'} and a Record.

What convert_torch_weights.py writes and what eval.py, demo.py, export.py
and train.py's config.train.init_checkpoint read (checkpoints
.read_checkpoint). Nothing existing is lost: a non-empty folder is replaced
only on request and only if it is a variables checkpoint (never a workdir
or another folder), atomically (a temporary sibling renamed into place).
"""

from typing import Optional
import uuid

from etils import epath
import orbax.checkpoint as ocp

from ae_jax.train import checkpoints
from ae_jax.train import orbax_shims
from ae_jax.train.orbax_shims import reason

# What orbax writes into a PyTree checkpoint folder: a variables checkpoint
# holds nothing else (`is_variables_checkpoint`, before replacing one).
_ORBAX_FILES = {'_CHECKPOINT_METADATA', '_METADATA', '_sharding', 'd',
                'commit_success.txt', 'manifest.ocdbt', 'array_metadatas'}


def save_variables(directory: checkpoints.PathLike,
                   variables: checkpoints.Variables, overwrite: bool = False,
                   record: Optional[checkpoints.Record] = None) -> None:
  """Writes {'params', 'batch_stats'} (numpy or jax arrays) and `record`.

  Nothing existing is lost: a non-empty `directory` is refused unless
  `overwrite` is set and it is a variables checkpoint (never a workdir or
  another folder). Written into a temporary sibling and renamed into place:
  a failed save leaves `directory` as it was.

  Raises:
    CheckpointError: `directory` may not be replaced, or writing failed
      (the path and the cause).
  """
  directory = checkpoints.as_path(directory)
  check_variables_target(directory, overwrite)
  tree = {'params': variables['params'],
          'batch_stats': variables.get('batch_stats', {})}
  tmp = _make_tmp_sibling(directory)
  try:
    try:
      with orbax_shims.failures_reported_once(), ocp.Checkpointer(
          orbax_shims.pytree_handler()) as ckptr:
        ckptr.save(tmp / 'new', args=ocp.args.PyTreeSave(tree),
                   custom_metadata=record and record.to_json())
    except Exception as e:  # pylint: disable=broad-except  # any write error
      raise checkpoints.CheckpointError(f'cannot write {directory}: {reason(e)}'
                            ) from None
    if directory.exists():  # empty, or a variables checkpoint to replace
      directory.rename(tmp / 'old')
    (tmp / 'new').rename(directory)
  except BaseException:
    if not directory.exists() and (tmp / 'old').exists():
      (tmp / 'old').rename(directory)  # put the previous one back
    raise
  finally:
    tmp.rmtree(missing_ok=True)


def check_variables_target(directory: checkpoints.PathLike,
                           overwrite: bool = False) -> None:
  """Raises CheckpointError unless `save_variables` may write `directory`:
  a missing path whose parent can be created, an empty directory, or (with
  `overwrite`) a variables checkpoint. Run it before long work."""
  directory = checkpoints.as_path(directory)
  if directory.exists():
    if not directory.is_dir():
      raise checkpoints.CheckpointError(
          f'{directory} exists and is not a directory')
    if any(directory.iterdir()):
      if not overwrite:
        raise checkpoints.CheckpointError(
            f'{directory} exists and is not empty; choose a new directory '
            '(or overwrite=True / --overwrite to replace a variables '
            'checkpoint)')
      if not is_variables_checkpoint(directory):
        raise checkpoints.CheckpointError(
            f'{directory} is not a variables checkpoint (a training '
            'workdir or another folder): refusing to replace it even '
            'with overwrite')
  _make_tmp_sibling(directory).rmtree(missing_ok=True)  # parent writable


def is_variables_checkpoint(directory: checkpoints.PathLike) -> bool:
  """True for a folder of orbax's files only, holding a tree of exactly
  {'params', 'batch_stats'} (a train step's state also has 'step' and
  'opt_state'; a workdir has 'checkpoints/')."""
  directory = checkpoints.as_path(directory)
  names = {p.name for p in directory.iterdir()}
  if '_CHECKPOINT_METADATA' not in names or any(
      n not in _ORBAX_FILES and not n.startswith('ocdbt.process_')
      for n in names):
    return False
  return set(checkpoints.saved_tree(directory)[0] or ()) in (
      {'params'}, {'params', 'batch_stats'})


def _make_tmp_sibling(directory: epath.Path) -> epath.Path:
  """Creates `.{name}.tmp-{id}` beside `directory` (and missing parents).

  Creating it up front is the writability check: orbax, failing to create
  its own temporary folder, leaves non-daemon threads waiting for a signal
  that never comes, and the process hangs at exit.
  """
  tmp = directory.parent / f'.{directory.name}.tmp-{uuid.uuid4().hex[:8]}'
  for parent in directory.parents:
    if parent.exists():
      if not parent.is_dir():
        raise checkpoints.CheckpointError(
            f'cannot write {directory}: {parent} is not a directory')
      break
  try:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
  except OSError as e:
    raise checkpoints.CheckpointError(
        f'cannot write {directory}: {e.strerror or e}' +
        (f' ({e.filename})' if e.filename else '')) from None
  return tmp

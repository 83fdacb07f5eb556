"""One trainer per workdir: `{workdir}/train.lock` holds its pid and host.

Taking the lock is also where the workdir is checked before any work: a
file, a folder holding a variables checkpoint (converted weights belong in
config.train.init_checkpoint) or one that cannot be written is one
WorkdirError naming the path and the cause.

A second train.py on the same workdir stops with one line naming the
holder instead of both writing the same checkpoints. The lock file is json
{'pid', 'host', 'time'}; it is removed when training ends (also on errors
and preemption). A lock left by a process that died (kill -9, a crash) on
this host is taken over with a warning; one from another host is refused
(its pid cannot be checked from here): delete the file if that job is gone.

Multi-process runs: process 0 alone holds the lock (the processes of one
job share the workdir; one file per job is what tells two jobs apart) and
broadcasts the outcome, so every process of a refused job stops with the
same line.

Local workdirs are locked atomically (O_CREAT | O_EXCL). URL workdirs
(gs://, s3://) get the same file through etils.epath, written after a
check that it is absent: that is advisory, not atomic (two jobs starting
in the same second may both pass) and a stale lock there can only be taken
over from the host that wrote it.
"""

import json
import os
import socket
import time
from typing import Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

LOCK_NAME = 'train.lock'


class WorkdirError(RuntimeError):
  """A --workdir this run cannot use (message: the path and why)."""


class WorkdirLockedError(WorkdirError):
  """Another live trainer holds the workdir."""


def _alive(pid: int) -> bool:
  """Whether process `pid` exists on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _holder(path: epath.Path) -> Optional[dict]:
  """The lock's json, {} when unreadable/empty, None when absent."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(text)
    return holder if isinstance(holder, dict) else {}
  except ValueError:
    return {}


def _write_new(path: epath.Path, text: str) -> bool:
  """Creates `path` with `text` unless it exists (atomic where local)."""
  if path.exists():
    return False
  if not _is_url(path):
    try:
      fd = os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True
  path.write_text(text)
  return True


def _is_url(path: epath.Path) -> bool:
  return '://' in str(path)


class WorkdirLock:
  """Context manager holding `{workdir}/train.lock` (see module docstring)."""

  def __init__(self, workdir: epath.Path):
    self.path = epath.Path(workdir) / LOCK_NAME
    self._mine: Optional[str] = None

  def _acquire(self) -> None:
    """Checks the workdir and takes the lock (WorkdirError if it cannot)."""
    workdir = self.path.parent
    if workdir.exists() and not workdir.is_dir():
      raise WorkdirError(f'--workdir {workdir} is a file, not a folder')
    if (workdir / '_CHECKPOINT_METADATA').exists():  # orbax's, at the top
      raise WorkdirError(
          f'--workdir {workdir} holds a variables checkpoint (converted '
          'weights): train into a new --workdir and pass this one as '
          '--config.train.init_checkpoint')
    host = socket.gethostname()
    mine = json.dumps({'pid': os.getpid(), 'host': host,
                       'time': time.strftime('%Y-%m-%dT%H:%M:%S%z')})
    for _ in range(3):  # a stale lock removed by us, or a race lost
      try:
        workdir.mkdir(parents=True, exist_ok=True)
        if _write_new(self.path, mine):
          self._mine = mine
          return
      except OSError as e:
        raise WorkdirError(f'cannot write --workdir {workdir}: '
                           f'{e.strerror or e}') from None
      holder = _holder(self.path)
      if holder is None:
        continue  # released meanwhile
      pid, where = holder.get('pid'), holder.get('host')
      if (where == host and isinstance(pid, int) and pid != os.getpid()
          and not _alive(pid)):
        logging.warning('Taking over the stale lock %s of process %d on %s '
                        '(no longer running).', self.path, pid, host)
        self.path.unlink(missing_ok=True)
        continue
      raise WorkdirLockedError(
          f'workdir {workdir} is in use by another trainer (pid {pid} on '
          f'host {where}, since {holder.get("time")}); wait for it, use '
          f'another --workdir, or delete {self.path} if that job is gone')
    raise WorkdirLockedError(
        f'could not take the lock {self.path} (it keeps changing)')

  def __enter__(self):
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire()
      except WorkdirError as e:
        error = e
    if jax.process_count() > 1:
      refused = int(multihost_utils.broadcast_one_to_all(
          np.int32(error is not None)))
      if refused and error is None:
        error = WorkdirError(f'workdir {self.path.parent} cannot be taken '
                             f'(see process 0: {self.path})')
    if error:
      raise error
    return self

  def __exit__(self, *exc):
    if self._mine is None:
      return
    try:
      if self.path.read_text() == self._mine:
        self.path.unlink()
    except (FileNotFoundError, OSError) as e:
      logging.warning('Could not remove the lock %s: %s', self.path, e)
    self._mine = None

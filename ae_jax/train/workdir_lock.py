"""One trainer per workdir: `{workdir}/train.lock` holds its pid and host.

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

LOCK_NAME = 'train.lock'


class WorkdirLockedError(RuntimeError):
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

  def _acquire(self) -> Optional[str]:
    """Takes the lock; returns the refusal message if it cannot."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    mine = json.dumps({'pid': os.getpid(), 'host': host,
                       'time': time.strftime('%Y-%m-%dT%H:%M:%S%z')})
    for _ in range(3):  # a stale lock removed by us, or a race lost
      if _write_new(self.path, mine):
        self._mine = mine
        return None
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
      return (f'workdir {self.path.parent} is in use by another trainer '
              f'(pid {pid} on host {where}, since {holder.get("time")}); '
              f'wait for it, use another --workdir, or delete {self.path} '
              'if that job is gone')
    return f'could not take the lock {self.path} (it keeps changing)'

  def __enter__(self):
    message = self._acquire() if jax.process_index() == 0 else None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      import numpy as np  # pylint: disable=g-import-not-at-top
      refused = int(multihost_utils.broadcast_one_to_all(
          np.int32(message is not None)))
      if refused and message is None:
        message = (f'workdir {self.path.parent} is in use by another '
                   f'trainer (see process 0: {self.path})')
    if message:
      raise WorkdirLockedError(message)
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

"""The train input's worker processes: set-up, what each is doing, deaths.

grain's `mp_prefetch` (ae_jax.data.pipeline) spawns the workers; this
module is what runs in them first (`init_worker`) and what the training
process uses to name a worker that died (`WorkerStatus`, `death_error`).

In each worker, `init_worker`:
  * ignores SIGINT and SIGTERM: Ctrl-C and a scheduler's SIGTERM to the
    whole process group reach the trainer, which finishes its step, saves
    and closes the input (that stops the workers); a worker killed by a
    signal would instead look like a crashed one;
  * ends the worker when the trainer is gone (a thread waits on the
    trainer's process sentinel): after a `kill -9` of the trainer no worker
    is left behind, however it was blocked;
  * runs cv2 on one thread: one worker is one core's work (the worker count
    sets the parallelism, not OpenCV's pool in every worker);
  * attaches the status table, where the worker writes its pid, the batch
    and the image file it is on before each example, so that a worker that
    dies in native code (a decoder's segfault, the OOM killer's SIGKILL)
    is named with the file it was reading.

Status table: one fixed-size slot per worker in a POSIX shared-memory
block the training process owns (unlinked on close; after a kill -9 of the
trainer, Python's resource tracker unlinks it).
"""

import multiprocessing
from multiprocessing import shared_memory
import os
import re
import signal
import struct
import threading

import cv2

_SLOT = 320  # bytes per worker: pid, step, name length, name
_HEADER = struct.Struct('<qqH')
_NAME_BYTES = _SLOT - _HEADER.size

_STATUS: 'WorkerStatus | None' = None  # this worker's table (workers only)
_INDEX = 0  # this worker's index in the table


class InputWorkerError(RuntimeError):
  """An input worker process died; the message names the cause and file."""


class WorkerStatus:
  """Per-worker (pid, batch, file) slots in shared memory.

  Attributes:
    name: the shared-memory block's name (what workers attach to).
  """

  def __init__(self, block: shared_memory.SharedMemory, owner: bool):
    self._block, self._owner = block, owner
    self.name = block.name

  @classmethod
  def create(cls, num_workers: int) -> 'WorkerStatus':
    """A zeroed table for `num_workers` workers (training process)."""
    block = shared_memory.SharedMemory(create=True,
                                       size=max(1, num_workers) * _SLOT)
    return cls(block, owner=True)  # a new block reads as zeros

  @classmethod
  def attach(cls, name: str) -> 'WorkerStatus':
    """The table created by the training process (worker)."""
    return cls(shared_memory.SharedMemory(name=name), owner=False)

  def write(self, index: int, step: int, file_name: str) -> None:
    """Slot `index` := (this pid, step, file_name)."""
    name = file_name.encode('utf-8', 'replace')[:_NAME_BYTES]
    start = index * _SLOT
    self._block.buf[start:start + _HEADER.size] = _HEADER.pack(
        os.getpid(), step, len(name))
    self._block.buf[start + _HEADER.size:start + _HEADER.size +
                    len(name)] = name

  def read(self) -> list[tuple[int, int, str]]:
    """(pid, step, file name) of every slot (pid 0: not started)."""
    slots = []
    for start in range(0, self._block.size - _SLOT + 1, _SLOT):
      pid, step, size = _HEADER.unpack_from(self._block.buf, start)
      name = bytes(self._block.buf[start + _HEADER.size:
                                   start + _HEADER.size + size])
      slots.append((pid, step, name.decode('utf-8', 'replace')))
    return slots

  def close(self) -> None:
    """Detaches; the owner also removes the block."""
    self._block.close()
    if self._owner:
      self._block.unlink()


def _exit_with_parent(parent) -> None:
  parent.join()  # returns when the trainer's process is gone
  os._exit(1)  # pylint: disable=protected-access


def init_worker(status_name: str, index: int, count: int) -> None:
  """grain's worker_init_fn (see the module docstring)."""
  del count
  global _STATUS, _INDEX
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  parent = multiprocessing.parent_process()
  if parent is not None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True,
                     name='exit-with-trainer').start()
  cv2.setNumThreads(1)
  _STATUS, _INDEX = WorkerStatus.attach(status_name), index


def in_worker() -> bool:
  """Whether this process is an input worker (init_worker ran)."""
  return _STATUS is not None


def note(step: int, file_name: str) -> None:
  """Records what this worker is loading (a no-op outside the workers)."""
  if _STATUS is not None:
    _STATUS.write(_INDEX, step, file_name)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _signal_text(code: int) -> str:
  if code >= 0:
    return f'exit code {code}'
  try:
    name = signal.Signals(-code).name
  except ValueError:
    name = f'signal {-code}'
  hint = {'SIGKILL': ': out of memory? (the OOM killer sends it)',
          'SIGSEGV': ': a crash in native code, e.g. the image decoder',
          'SIGBUS': ': a crash in native code, e.g. the image decoder',
          'SIGABRT': ': a crash in native code'}.get(name, '')
  return f'killed by {name}{hint}'


def death_error(error: Exception,
                status: WorkerStatus | None) -> InputWorkerError | None:
  """grain's report of a dead worker -> one line naming cause and file.

  Args:
    error: what the grain iterator raised.
    status: the workers' status table.

  Returns:
    The InputWorkerError, or None if `error` is not a worker's death (an
    exception raised inside a worker is re-raised by grain as itself).
  """
  found = re.search(r'terminated unexpectedly with exit code (-?\d+)',
                    str(error))
  if not isinstance(error, RuntimeError) or not found:
    return None
  cause = _signal_text(int(found[1]))
  where = ' (its own output, if any, is above)'
  if status is not None:
    dead = [s for s in status.read() if s[0] and not _alive(s[0])]
    if dead:
      pid, step, name = dead[0]
      where = f' (pid {pid}) while loading {name} for batch {step}'
  return InputWorkerError(
      f'input worker process{where} died, {cause}; training stopped (the '
      'last checkpoint is kept; rerun to resume)')

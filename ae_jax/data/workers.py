"""The train input's worker processes: batches made in reused shared memory.

`WorkerBatches` starts n spawned processes; worker w makes host batches
start + w, start + w + n, ... (a `HostBatches` callable, data/pipeline.py)
and the training process takes them in step order, so the stream does not
depend on n. Each batch is written straight into a shared-memory slot
that the training process owns and hands to the worker; the training
process maps the finished slot as numpy arrays (no copy) and gets the slot
back for that worker when the arrays are garbage collected (after their
copy to the devices). Slots are reused, so after the first batches no
memory is mapped, faulted in or freed per batch. A worker always holds
`slots` free ones (a slot is handed back as soon as it sends a batch,
a new one made if none is free), so it never waits for the trainer's
arrays to be dropped: holding batches costs memory, never a deadlock.

Why not grain's `mp_prefetch` (measured, bench/RESULTS_pipeline.md): it
gives every batch a new shared-memory block, which the worker faults in
and the trainer maps and frees: +0.6 ms of CPU per 512 px example in the
worker and ~0.3 in the trainer (the cv2 work is ~3.2 ms), and its workers
import jax (+175 MB each). tf.data service cannot run the pipeline's
Python (numpy_function) in another process.

In each worker, `init_worker`:
  * ignores SIGINT and SIGTERM: Ctrl-C and a scheduler's SIGTERM to the
    whole process group reach the trainer, which finishes its step, saves
    and closes the input (that kills the workers); a worker killed by a
    signal would instead look like a crashed one;
  * ends the worker when the trainer is gone (a thread waits on the
    trainer's process sentinel): after a `kill -9` of the trainer no worker
    is left behind, however it was blocked;
  * runs cv2 on one thread: one worker is one core's work;
  * attaches the status table, where the worker writes its pid, the batch
    and the image file it is on before each example, so that a worker that
    dies in native code (a decoder's segfault, the OOM killer's SIGKILL)
    is named with the file it was reading.

A dead worker is seen at once (its process sentinel) and raised as one
`InputWorkerError` line; an exception inside a worker is sent to the
training process and raised there as itself. All shared memory (slots,
status table) is the training process's, removed on close; after a
kill -9 of the trainer, Python's resource tracker removes it.
"""

import collections
import mmap
import multiprocessing
from multiprocessing import shared_memory
import os
import pickle
import signal
import struct
import threading
import weakref

import cloudpickle
import cv2
import numpy as np

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # the trainer's, not a worker's
_SLOT = 320  # status bytes per worker: pid, step, name length, name
_HEADER = struct.Struct('<qqH')
_NAME_BYTES = _SLOT - _HEADER.size
_ALIGN = 64  # array offsets in a batch slot (XLA:CPU aliases 64-aligned)
_POLL_S = 0.2  # how often a waiting trainer checks that the worker lives

_STATUS: 'WorkerStatus | None' = None  # this worker's table (workers only)
_INDEX = 0  # this worker's index in the table


class InputWorkerError(RuntimeError):
  """An input worker process died; the message names the cause and file."""


class WorkerStatus:
  """Per-worker (pid, batch, file) records in shared memory."""

  def __init__(self, block: shared_memory.SharedMemory, owner: bool):
    self._block, self._owner = block, owner
    self.name = block.name

  @classmethod
  def create(cls, num_workers: int) -> 'WorkerStatus':
    """A zeroed table for `num_workers` workers (training process)."""
    return cls(shared_memory.SharedMemory(
        create=True, size=max(1, num_workers) * _SLOT), owner=True)

  @classmethod
  def attach(cls, name: str) -> 'WorkerStatus':
    """The table created by the training process (worker)."""
    return cls(shared_memory.SharedMemory(name=name), owner=False)

  def write(self, index: int, step: int, file_name: str) -> None:
    """Record `index` := (this pid, step, file_name)."""
    name = file_name.encode('utf-8', 'replace')[:_NAME_BYTES]
    start = index * _SLOT
    self._block.buf[start:start + _HEADER.size] = _HEADER.pack(
        os.getpid(), step, len(name))
    self._block.buf[start + _HEADER.size:
                    start + _HEADER.size + len(name)] = name

  def read(self, index: int) -> tuple[int, int, str]:
    """(pid, step, file name) of record `index` (pid 0: not started)."""
    pid, step, size = _HEADER.unpack_from(self._block.buf, index * _SLOT)
    start = index * _SLOT + _HEADER.size
    return pid, step, bytes(self._block.buf[start:start + size]).decode(
        'utf-8', 'replace')

  def close(self) -> None:
    """Detaches; the owner also removes the block."""
    self._block.close()
    if self._owner:
      self._block.unlink()


def _exit_with_parent(parent) -> None:
  parent.join()  # returns when the trainer's process is gone
  os._exit(1)  # pylint: disable=protected-access


def init_worker(status_name: str, index: int) -> None:
  """The worker process's set-up (see the module docstring)."""
  global _STATUS, _INDEX
  for signum in _STOP_SIGNALS:
    signal.signal(signum, signal.SIG_IGN)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked at start
  parent = multiprocessing.parent_process()
  if parent is not None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True,
                     name='exit-with-trainer').start()
  cv2.setNumThreads(1)
  _STATUS, _INDEX = WorkerStatus.attach(status_name), index


def note(step: int, file_name: str) -> None:
  """Records what this worker is loading (a no-op outside the workers)."""
  if _STATUS is not None:
    _STATUS.write(_INDEX, step, file_name)


def _layout(spec: dict) -> tuple[list, int]:
  """[(name, shape, dtype, offset)] of a batch in one slot, its bytes."""
  fields, size = [], 0
  for name, (shape, dtype) in spec.items():
    size = -(-size // _ALIGN) * _ALIGN
    fields.append((name, tuple(shape), np.dtype(dtype), size))
    size += int(np.prod(shape)) * np.dtype(dtype).itemsize
  return fields, max(size, 1)


def _views(buffer, fields) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(the slot as one array, the batch's arrays: views that keep it alive)."""
  base = np.frombuffer(buffer, np.uint8)
  return base, {
      name: base[offset:offset + int(np.prod(shape)) * dtype.itemsize]
      .view(dtype).reshape(shape) for name, shape, dtype, offset in fields}


def _work(index: int, count: int, start: int, status_name: str,
          conn) -> None:
  """A worker's loop: take slots, fill them with its batches, send."""
  init_worker(status_name, index)
  try:
    # The pickled HostBatches comes first (by the pipe, so that no
    # reference to the bytes outlives the loading).
    batches = cloudpickle.loads(conn.recv_bytes())
  except (EOFError, ConnectionResetError):
    return
  fields, _ = _layout(batches.spec())
  attached, free = {}, collections.deque()
  step = start + index
  try:
    while True:
      while not free or conn.poll():  # every slot sent so far
        free.append(conn.recv())
      name = free.popleft()
      if name not in attached:
        attached[name] = shared_memory.SharedMemory(name=name)
      try:
        skips = batches.fill(step, _views(attached[name].buf, fields)[1])
      except Exception as e:  # pylint: disable=broad-except
        try:
          pickle.dumps(e)
        except Exception:  # pylint: disable=broad-except
          e = RuntimeError(f'{type(e).__name__}: {e}')
        conn.send(('error', e))
        return
      conn.send(('batch', step, name, skips))
      step += count
  except (EOFError, BrokenPipeError, ConnectionResetError):
    return  # the training process closed the input


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


def _release(free: list, lock, name: str) -> None:
  with lock:
    free.append(name)


def _new_slot(size: int) -> tuple[shared_memory.SharedMemory, mmap.mmap]:
  """A shared-memory block (registered with Python's resource tracker) and
  a mapping of it of our own: numpy arrays over the mapping keep it alive,
  so it is unmapped when the last batch array over it goes, and the block
  object never has to be closed while arrays exist (Linux: /dev/shm)."""
  block = shared_memory.SharedMemory(create=True, size=size)
  fd = os.open(os.path.join('/dev/shm', block.name.lstrip('/')), os.O_RDWR)
  try:
    mapping = mmap.mmap(fd, size)
  finally:
    os.close(fd)
  block.close()  # its own mapping; the block stays until unlink
  return block, mapping


def _shutdown(procs, conns, slots, status) -> None:
  """Kills the workers (they ignore SIGTERM), removes the shared memory."""
  for proc in procs:
    if proc.is_alive():
      proc.kill()
  for proc in procs:
    proc.join(timeout=30)
  for conn in conns:
    conn.close()
  for block, _ in slots.values():
    block.unlink()  # mappings go with the last array over them
  slots.clear()
  status.close()


class WorkerBatches:
  """Host batches from `num_workers` processes, in step order.

  Yields (batch, replacements) as `HostBatches(step)` would, step =
  start, start + 1, ...; the batch's arrays live in a slot that goes back
  to its worker when they are garbage collected. `close()` (also when
  garbage collected) kills the workers and removes the shared memory.
  """

  def __init__(self, batches, start: int, num_workers: int,
               slots: int = 2):
    """Starts the workers.

    Args:
      batches: a picklable HostBatches (`spec()`, `fill(step, arrays)`).
      start: the first step.
      num_workers: worker processes, >= 1.
      slots: free slots each worker holds (batches it may make ahead).
    """
    context = multiprocessing.get_context('spawn')
    self._fields, self._size = _layout(batches.spec())
    self._status = WorkerStatus.create(num_workers)
    self._lock = threading.Lock()
    self._free = [[] for _ in range(num_workers)]  # released, per worker
    self._slots: dict[str, tuple] = {}  # name -> (block, our mapping)
    self._procs, self._conns = [], []
    self._start = self._next = int(start)
    payload = cloudpickle.dumps(batches)  # once: the index is large
    self._finalizer = weakref.finalize(self, _shutdown, self._procs,
                                       self._conns, self._slots,
                                       self._status)
    # The workers start with SIGINT / SIGTERM blocked (the mask survives
    # the spawn's exec) until init_worker ignores them: a Ctrl-C to the
    # process group while a worker imports would otherwise kill it. Here
    # they stay pending and arrive when the mask is restored.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
      for i in range(num_workers):
        here, there = context.Pipe()
        proc = context.Process(
            target=_work, name=f'ae-input-{i}', daemon=True,
            args=(i, num_workers, self._start, self._status.name, there))
        proc.start()
        there.close()
        self._procs.append(proc)
        self._conns.append(here)
    finally:
      signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for i, conn in enumerate(self._conns):  # all start (import) at once
      conn.send_bytes(payload)
      for _ in range(slots):
        self._give(i)

  def _give(self, i: int) -> None:
    """Sends worker i a slot: one it gave back, else a new one."""
    with self._lock:
      name = self._free[i].pop() if self._free[i] else None
    if name is None:
      block, mapping = _new_slot(self._size)
      self._slots[name := block.name] = block, mapping
    self._conns[i].send(name)

  def _dead(self, i: int) -> InputWorkerError:
    proc = self._procs[i]
    proc.join(timeout=10)
    pid, step, name = self._status.read(i)
    where = (f' (pid {proc.pid}) while loading {name} for batch {step}'
             if pid == proc.pid and name else
             f' {i} (pid {proc.pid}; its own output, if any, is above)')
    self.close()
    return InputWorkerError(
        f'input worker process{where} died, '
        f'{_signal_text(proc.exitcode)}; training stopped (the last '
        'checkpoint is kept; rerun to resume)')

  def __iter__(self):
    return self

  def __next__(self):
    if not self._finalizer.alive:
      raise StopIteration
    i = (self._next - self._start) % len(self._procs)
    conn, proc = self._conns[i], self._procs[i]
    # Waits for the batch; a dead worker is seen within _POLL_S.
    while not conn.poll(_POLL_S) and proc.is_alive():
      pass
    try:
      message = conn.recv() if conn.poll() else None
    except (EOFError, ConnectionResetError):
      message = None
    if message is None:
      raise self._dead(i)
    if message[0] == 'error':
      self.close()
      raise message[1]
    _, step, name, skips = message
    assert step == self._next, (step, self._next)
    self._give(i)  # before these arrays are back: the worker never waits
    slot, arrays = _views(self._slots[name][1], self._fields)
    # The slot goes back to worker i once no array of this batch is left
    # (e.g. after its copy to the devices).
    weakref.finalize(slot, _release, self._free[i], self._lock, name)
    self._next += 1
    return arrays, skips

  def close(self) -> None:
    """Kills the workers and removes the shared memory."""
    self._finalizer()

"""Device mesh, shardings, host batch -> global array, distributed init.

One mesh axis, 'data', over every device of every process (no pmap). The
train state is replicated (PartitionSpec()), batches are split on their
leading axis (P('data')). Optionally Adam's moments are sharded over 'data'
on their largest divisible dimension (ZeRO-1 style) to save memory on big
slices; XLA inserts the gathers. `prefetch_to_mesh` puts batches on the
devices ahead of the step; `all_reduce_stats` counts a compiled program's
all-reduces.

Legend: B global batch (b = B / process_count per host), leading axis of
every batch array.
"""

import collections
import os
import re
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

from absl import logging
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def maybe_initialize_distributed(
    force: Optional[bool] = None, coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None, process_id: Optional[int] = None,
    local_device_ids: Optional[Sequence[int]] = None,
    heartbeat_timeout_s: Optional[int] = None) -> bool:
  """Calls `jax.distributed.initialize` for multi-process runs.

  Multi-process when `force` is True; when `force` is None, when any of the
  other arguments is given or the environment names a coordinator
  (JAX_COORDINATOR_ADDRESS, or AE_JAX_DISTRIBUTED=1 on TPU pods / SLURM,
  where JAX detects the cluster). Arguments left None are auto-detected by
  JAX. CPU collectives go over gloo (how 2 processes x N fake CPU devices
  emulate a cluster on one machine; the setting only affects the CPU
  backend). Must run before any other JAX call.

  Args:
    force: True/False forces multi-process on/off (train.py --distributed).
    coordinator_address: 'host:port' of process 0.
    num_processes: number of processes.
    process_id: this process's index in [0, num_processes).
    local_device_ids: the local devices this process uses (e.g. [rank] for
      one process per GPU).
    heartbeat_timeout_s: a process silent this long counts as dead and
      every other process stops (None: jax's default, 100 s).

  Returns:
    Whether jax.distributed was initialised.
  """
  explicit = (coordinator_address, num_processes, process_id,
              local_device_ids)
  if force is None:
    force = (any(a is not None for a in explicit) or
             bool(os.environ.get('JAX_COORDINATOR_ADDRESS')) or
             os.environ.get('AE_JAX_DISTRIBUTED', '0') == '1')
  if force:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes, process_id=process_id,
        local_device_ids=(None if local_device_ids is None
                          else list(local_device_ids)),
        **({} if heartbeat_timeout_s is None else
           {'heartbeat_timeout_seconds': int(heartbeat_timeout_s)}))
  return bool(force)


def is_full_size(input_size: Any, global_batch_size: int = 0) -> bool:
  """Whether a config is paper-sized (input >= 512 px or batch >= 64)."""
  size = (input_size,) if np.isscalar(input_size) else tuple(input_size)
  return max(int(s) for s in size) >= 512 or global_batch_size >= 64


def log_backend(input_size: Any, global_batch_size: int = 0) -> str:
  """Logs processes/devices/backend; one warning for full size on CPU.

  Args:
    input_size: the config's input size, int S or (W, H).
    global_batch_size: the global train batch (0 for eval).

  Returns:
    The backend name (jax.default_backend()).
  """
  backend = jax.default_backend()
  logging.info('JAX backend %s: process %d / %d, %d local / %d global '
               'devices (%s).', backend, jax.process_index(),
               jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  if backend == 'cpu' and is_full_size(input_size, global_batch_size):
    batch = f', global batch {global_batch_size}' if global_batch_size else ''
    logging.warning(
        'Full-size config (input %s%s) on the CPU backend: this will be '
        "very slow; on a GPU/TPU machine install .[cuda12] or .[tpu] (README "
        "'Install on GPU / TPU').", input_size, batch)
  return backend


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-axis ('data',) mesh over all (or the first `num_devices`) devices."""
  devices = jax.devices()[:num_devices]
  # Auto axes: jit's partitioner places the collectives (BN statistics,
  # gradient all-reduce); jax.make_mesh would default to Explicit axes.
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of a fully replicated array."""
  return NamedSharding(mesh, P())


def put_replicated(value: Any, mesh: Mesh) -> jax.Array:
  """A host value, equal on every process -> a replicated global array.

  `jax.device_put(value, replicated(mesh))` fails in multi-process runs
  (the sharding names other processes' devices); this builds the global
  array from each process's copy. PRNG key arrays keep their impl.
  """
  if jax.dtypes.issubdtype(getattr(value, 'dtype', None),
                           jax.dtypes.prng_key):
    data = put_replicated(jax.random.key_data(value), mesh)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
  return jax.make_array_from_process_local_data(replicated(mesh),
                                                np.asarray(value))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch array split over 'data' on its leading axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def _moment_sharding(mesh: Mesh, shape) -> NamedSharding:
  """Splits the largest dimension divisible by the mesh size, else none."""
  n = mesh.shape[DATA_AXIS]
  dims = [d for d in np.argsort(shape)[::-1] if shape[d] % n == 0]
  if n == 1 or not dims or shape[dims[0]] < n:
    return replicated(mesh)
  spec = [None] * len(shape)
  spec[dims[0]] = DATA_AXIS
  return NamedSharding(mesh, P(*spec))


def state_shardings(abstract_state: Any, mesh: Mesh,
                    shard_opt_state: bool = False) -> Any:
  """Shardings for a TrainState pytree of ShapeDtypeStructs.

  Args:
    abstract_state: `jax.eval_shape` of the state constructor.
    mesh: the 'data' mesh.
    shard_opt_state: split optimizer-state arrays over 'data'
      (config.optim.shard_opt_state); params and BN stats stay replicated.

  Returns:
    The same pytree with NamedSharding leaves.
  """
  rep = replicated(mesh)
  shardings = jax.tree_util.tree_map(lambda _: rep, abstract_state)
  if shard_opt_state:
    opt = jax.tree_util.tree_map(
        lambda x: _moment_sharding(mesh, x.shape) if x.ndim else rep,
        abstract_state.opt_state)
    shardings = shardings.replace(opt_state=opt)
  return shardings


def make_global_batch(host_batch: Dict[str, np.ndarray],
                      mesh: Mesh) -> Dict[str, jax.Array]:
  """Host-local numpy batch (b = B / process_count) -> global jax arrays.

  Raises:
    ValueError: when the host batch does not split evenly over the local
      devices (the global batch must be a multiple of the device count).
  """
  sharding = batch_sharding(mesh)
  local = len(mesh.local_devices)
  # The CPU backend aliases a 64-byte aligned host array instead of
  # copying it, so a batch in the input workers' shared memory
  # (data/pipeline.py) would stay mapped, and its block unreleased, as long
  # as the device array lives (blocks still held at exit are reported as
  # leaked): the one copy that backend makes is ours, into memory it then
  # aliases. GPU/TPU copy to the device and release the host array.
  private = mesh.local_devices[0].platform == 'cpu'
  for name, value in host_batch.items():
    if value.shape[0] % local:
      raise ValueError(
          f'host batch "{name}" has {value.shape[0]} examples, not a '
          f'multiple of the {local} local devices; choose a global batch '
          f'size divisible by {mesh.size}')
  # One call for the whole batch: one batched transfer (one process).
  return jax.make_array_from_process_local_data(sharding, {
      name: _aligned_copy(value) if private else value
      for name, value in host_batch.items()})


def _aligned_copy(value: np.ndarray, align: int = 64) -> np.ndarray:
  """A copy of `value` at a 64-byte aligned address (XLA:CPU aliases it)."""
  buffer = np.empty(value.nbytes + align, np.uint8)
  start = -buffer.ctypes.data % align
  out = buffer[start:start + value.nbytes].view(value.dtype).reshape(
      value.shape)
  np.copyto(out, value)
  return out



class Prefetcher:
  """Host batches -> global batches on `mesh`, `size` in flight.

  Put-ahead (as flax's `prefetch_to_device`): each `next` reads host
  batches until `size` global batches have been handed to
  `make_global_batch`, then returns the oldest. Host->device copies are
  asynchronous on GPU / TPU, so batch i+1's copy runs while step i does,
  and the step never waits on it. Same order as the iterator, read in the
  caller's thread (deterministic: batch i is read during step i - size +
  1); exact resume is unaffected. `close()` (also on `with` exit) drops
  the prefetched batches and closes `iterator` if it can be closed.
  """

  def __init__(self, iterator: Iterator[Dict[str, np.ndarray]], mesh: Mesh,
               size: int = 2):
    if size < 1:
      raise ValueError(f'prefetch size must be >= 1, got {size}')
    self._source, self._mesh, self._size = iterator, mesh, size
    self._ready = collections.deque()
    self._exhausted = False

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, jax.Array]:
    while not self._exhausted and len(self._ready) < self._size:
      try:
        host_batch = next(self._source)
      except StopIteration:
        self._exhausted = True
        break
      self._ready.append(make_global_batch(dict(host_batch), self._mesh))
    if not self._ready:
      raise StopIteration
    return self._ready.popleft()

  def close(self):
    """Drops the prefetched batches; closes the source iterator."""
    self._ready.clear()
    self._exhausted = True
    if hasattr(self._source, 'close'):
      self._source.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def prefetch_to_mesh(iterator: Iterator[Dict[str, np.ndarray]], mesh: Mesh,
                     size: int = 2) -> Prefetcher:
  """`iterator`'s host batches as global batches, `size` in flight."""
  return Prefetcher(iterator, mesh, size)


_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
                'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8,
                'f64': 8}


def all_reduce_stats(hlo_text: str) -> Tuple[int, int]:
  """(number of all-reduce ops, bytes they reduce) in compiled HLO text.

  Counts `all-reduce` and async `all-reduce-start` instructions (a
  combined all-reduce of a tuple counts once, its bytes are the sum of
  the tuple's arrays), e.g. of `jitted.lower(...).compile().as_text()`.
  """
  count = nbytes = 0
  for line in hlo_text.splitlines():
    m = re.search(r'=\s*(.*?)\s+all-reduce(?:-start)?\(', line)
    if not m:
      continue
    count += 1
    for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', m.group(1)):
      size = int(np.prod([int(d) for d in dims.split(',') if d]))
      nbytes += _DTYPE_BYTES.get(dtype, 4) * size
  return count, nbytes

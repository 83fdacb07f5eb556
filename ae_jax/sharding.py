"""Device mesh, shardings, host batch -> global array, distributed init.

One mesh axis, 'data', over every device of every process (no pmap). The
train state is replicated (PartitionSpec()), batches are split on their
leading axis (P('data')). Optionally Adam's moments are sharded over 'data'
on their largest divisible dimension (ZeRO-1 style) to save memory on big
slices; XLA inserts the gathers.

Legend: B global batch (b = B / process_count per host), leading axis of
every batch array.
"""

import os
from typing import Any, Dict, Optional

from absl import logging
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def maybe_initialize_distributed(force: Optional[bool] = None) -> bool:
  """Calls `jax.distributed.initialize()` for multi-process runs.

  Multi-process when `force` is True, or (force None) when the environment
  names a coordinator (JAX_COORDINATOR_ADDRESS, or AE_JAX_DISTRIBUTED=1 for
  TPU pods / SLURM where JAX auto-detects the cluster). Must run before any
  other JAX call.

  Returns:
    Whether jax.distributed was initialised.
  """
  if force is None:
    force = bool(os.environ.get('JAX_COORDINATOR_ADDRESS') or
                 os.environ.get('AE_JAX_DISTRIBUTED', '0') == '1')
  if force:
    jax.distributed.initialize()
  return bool(force)


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
  out = {}
  for name, value in host_batch.items():
    if value.shape[0] % local:
      raise ValueError(
          f'host batch "{name}" has {value.shape[0]} examples, not a '
          f'multiple of the {local} local devices; choose a global batch '
          f'size divisible by {mesh.size}')
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out

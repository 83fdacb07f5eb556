"""The multi-process launch flags of train.py and eval.py.

Importing this module defines them (absl flags):
  --distributed, --coordinator_address, --num_processes, --process_id,
  --local_device_ids, --heartbeat_timeout_s.
`initialize()` passes them to jax.distributed.initialize
(ae_jax.sharding.maybe_initialize_distributed); an entry point calls it
before any other JAX call. No JAX import here, so --help stays fast.
"""

import errno
import os
import socket

from absl import app
from absl import flags

DISTRIBUTED = flags.DEFINE_bool(
    'distributed', None, 'Call jax.distributed.initialize() (default: when '
    'a flag below, JAX_COORDINATOR_ADDRESS or AE_JAX_DISTRIBUTED=1 is set).')
COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, "Process 0's host:port (multi-process).")
NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes (multi-process).')
PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, "This process's index in [0, num_processes).")
HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout_s', None, 'Multi-process: a process silent this long '
    'counts as dead and the others stop (default: jax, 100 s).')
LOCAL_DEVICE_IDS = flags.DEFINE_list(
    'local_device_ids', None, 'Local device ids this process uses, e.g. '
    '$LOCAL_RANK for one process per GPU (default: all).')


def check_port_free(address: str) -> None:
  """Raises SystemExit (one line) if process 0 cannot serve on its port.

  jax.distributed's coordination service binds [::]:PORT on process 0; on a
  busy port jax 0.10.2 crashed (segmentation fault) instead of saying so.
  """
  port = address.rsplit(':', 1)[-1]
  if not port.isdigit():
    raise SystemExit(f'error: --coordinator_address {address}: want '
                     'HOST:PORT')
  for family, host in ((socket.AF_INET6, '::'), (socket.AF_INET, '')):
    try:
      with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
      return
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise SystemExit(
            f'error: --coordinator_address {address}: port {port} is busy '
            'on this machine (another job, or an earlier run still ending?)'
            '; pick another port for every process') from None
      if family == socket.AF_INET:  # no IPv6 above, and this failed too
        raise SystemExit(f'error: --coordinator_address {address}: cannot '
                         f'serve on port {port}: {e.strerror}') from None


def initialize() -> bool:
  """jax.distributed.initialize from the flags, when multi-process.

  Returns:
    Whether jax.distributed was initialised.

  Raises:
    app.UsageError: --local_device_ids that are not integers.
    SystemExit: jax.distributed.initialize failed (one `error:` line).
  """
  ids = LOCAL_DEVICE_IDS.value
  if ids is not None and not all(i.isdigit() for i in ids):
    raise app.UsageError(f'--local_device_ids: not integers: {ids}')
  coordinator = (COORDINATOR.value or
                 os.environ.get('JAX_COORDINATOR_ADDRESS'))
  if coordinator and PROCESS_ID.value == 0:
    check_port_free(coordinator)
  from ae_jax import sharding  # pylint: disable=g-import-not-at-top
  try:
    return sharding.maybe_initialize_distributed(
        DISTRIBUTED.value, COORDINATOR.value, NUM_PROCESSES.value,
        PROCESS_ID.value, None if ids is None else [int(i) for i in ids],
        heartbeat_timeout_s=HEARTBEAT.value)
  except (ValueError, TypeError, RuntimeError) as e:
    raise SystemExit(
        f'error: jax.distributed.initialize: {e} (pass --coordinator_address'
        ', --num_processes and --process_id, or run where JAX detects the '
        'cluster: TPU pod, SLURM)') from None

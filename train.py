r"""Trains Associative Embedding + MobileNetV2 (resumes from --workdir).

  python train.py --config configs/coco512.py --workdir /tmp/ae_coco512 \
      --config.data.coco_root=/data/coco
  python train.py --config configs/coco_mini.py --workdir /tmp/ae_mini

Multi-process (TPU pod slice, multi-node GPU): pass --distributed, or set
JAX_COORDINATOR_ADDRESS (plus JAX_NUM_PROCESSES / JAX_PROCESS_ID) or
AE_JAX_DISTRIBUTED=1 where JAX detects the cluster itself; every process
runs the same command. Checkpoints, TensorBoard scalars and summary.json
go to --workdir; a rerun with the same --workdir resumes from the latest
checkpoint; SIGTERM saves one before exiting.
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Checkpoints, TensorBoard and summary go here.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', None, 'Call jax.distributed.initialize() (default: '
    'from JAX_COORDINATOR_ADDRESS / AE_JAX_DISTRIBUTED).')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record) -> bool:
  """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint)."""
  return (record.levelno >= std_logging.WARNING or
          '/orbax/' not in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  # Imported here so --help and flag errors stay fast.
  import jax  # pylint: disable=g-import-not-at-top
  from ae_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed(_DISTRIBUTED.value)
  try:  # tf.data must not grab accelerator memory.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  logging.info('JAX process %d / %d, %d local / %d global devices (%s).',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  from ae_jax import train_lib  # pylint: disable=g-import-not-at-top
  try:
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train_lib.NonFiniteLossError as e:
    logging.error('%s', e)
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main)

"""Exports a trained or converted ae_jax checkpoint to a TF SavedModel.

  python export.py --config configs/coco512.py --ckpt /tmp/ae_coco512 \
      --out /tmp/ae_savedmodel [--fixed_shape=1,512,512]
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from ae_jax import checkpoints
from ae_jax import export as export_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/coco512.py', 'Model config file.', lock_config=True)
_CKPT = flags.DEFINE_string('ckpt', None, 'Variables checkpoint or workdir.',
                            required=True)
_OUT = flags.DEFINE_string('out', None, 'SavedModel directory to write.',
                           required=True)
_FIXED = flags.DEFINE_list('fixed_shape', None,
                           'Optional B,H,W for a static-shape export.')


def main(argv):
  del argv
  try:
    variables = checkpoints.restore_variables(_CKPT.value)
  except checkpoints.CheckpointError as e:
    raise app.UsageError(str(e)) from None
  fixed = tuple(int(v) for v in _FIXED.value) if _FIXED.value else None
  export_lib.export_saved_model(_CONFIG.value.model, variables, _OUT.value,
                                fixed)
  logging.info('Wrote SavedModel to %s', _OUT.value)
  print(f'SavedModel written to {_OUT.value}')


if __name__ == '__main__':
  app.run(main)

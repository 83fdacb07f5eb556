"""Exports a trained or converted ae_jax checkpoint to a TF SavedModel.

  python export.py --config configs/coco512.py --ckpt /tmp/ae_coco512 \
      --out /tmp/ae_savedmodel [--fixed_shape=1,512,512] [--nodecode]

The signature (ae_jax/export.py, README "Export"): images -> heatmaps, tags
and, unless --nodecode, the NMS'd top-k candidates per joint. Errors (a bad
--ckpt, an --out that is a file, a non-SavedModel folder or not writable)
are one `error:` line.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from ae_jax import cli
from ae_jax.deploy import saved_model as export_lib
from ae_jax.train import checkpoints
from ae_jax.train import inference_checkpoint

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/coco512.py', 'Model config file.', lock_config=True)
_CKPT = flags.DEFINE_string('ckpt', None, 'Variables checkpoint or workdir.',
                            required=True)
_OUT = flags.DEFINE_string('out', None, 'SavedModel directory to write.',
                           required=True)
_FIXED = flags.DEFINE_list('fixed_shape', None,
                           'Optional B,H,W for a static-shape export.')
_DECODE = flags.DEFINE_bool(
    'decode', True, 'Also return the NMS\'d top-k candidates per joint '
    '(config.test.grouping max_people / nms_kernel); README "Export".')


def main(argv):
  del argv
  try:  # before the slow part: refuse a bad --out at once
    export_lib.check_out_dir(_OUT.value)
    # The model config from the checkpoint (older ones: --config's).
    loaded = inference_checkpoint.load_for_inference(
        _CKPT.value, _CONFIG.value,
        config_flags.get_override_values(flags.FLAGS['config']))
  except (checkpoints.CheckpointError, export_lib.ExportError, ValueError,
          FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  config = _CONFIG.value
  grouping = config.test.grouping
  try:
    fixed = tuple(int(v) for v in _FIXED.value) if _FIXED.value else None
    if fixed is not None and len(fixed) != 3:
      raise ValueError(f'--fixed_shape wants B,H,W, got {_FIXED.value}')
    export_lib.export_saved_model(
        loaded.model_config, loaded.variables, _OUT.value,
        fixed, max_people=grouping.max_people if _DECODE.value else 0,
        nms_kernel=grouping.nms_kernel)
  except ValueError as e:  # ExportError, a bad --fixed_shape
    raise SystemExit(f'error: {e}') from None
  except OSError as e:  # the disk filled up or vanished while writing
    raise SystemExit(f'error: cannot write --out {_OUT.value}: {e}') from None
  logging.info('Wrote SavedModel to %s', _OUT.value)
  print(f'SavedModel written to {_OUT.value}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)

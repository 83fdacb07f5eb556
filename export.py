"""Exports a trained or converted ae_jax checkpoint: ONNX or TF SavedModel.

  python export.py --config configs/coco512.py --ckpt /tmp/ae_coco512 \
      --out /tmp/ae.onnx [--fixed_shape=1,512,512] [--quantize=int8]
  python export.py --config configs/coco512.py --ckpt /tmp/ae_coco512 \
      --out /tmp/ae_savedmodel [--fixed_shape=1,512,512] [--nodecode]

--format is onnx for an --out ending in .onnx, else saved_model (README
"Export and deploy"). ONNX (deploy/onnx_export.py): uint8 images -> the
candidates and maps deploy/predictor.py decodes without JAX, the keypoint
spec and config.test in its metadata. SavedModel (deploy/saved_model.py):
images -> heatmaps, tags and, unless --nodecode, the candidates. Errors (a
bad --ckpt, a bad --out, test settings the graph cannot hold) are one
`error:` line.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging
from ml_collections import config_flags

from ae_jax import cli
from ae_jax import outputs
from ae_jax.deploy import saved_model as export_lib
from ae_jax.train import checkpoints
from ae_jax.train import inference_checkpoint

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/coco512.py', 'Model config file.', lock_config=True)
_CKPT = flags.DEFINE_string('ckpt', None, 'Variables checkpoint or workdir.',
                            required=True)
_OUT = flags.DEFINE_string(
    'out', None, 'ONNX file (.onnx) or SavedModel directory to write.',
    required=True)
_FORMAT = flags.DEFINE_enum(
    'format', None, ['onnx', 'saved_model'],
    'Default: onnx for an --out ending in .onnx, else saved_model.')
_FIXED = flags.DEFINE_list('fixed_shape', None,
                           'Optional B,H,W for a static-shape export.')
_DECODE = flags.DEFINE_bool(
    'decode', True, 'Also return the NMS\'d top-k candidates per joint '
    '(config.test.grouping max_people / nms_kernel); SavedModel only '
    '(the ONNX graph always does).')


def _onnx_export():
  """deploy/onnx_export, which needs the optional onnx package."""
  try:  # pylint: disable=g-import-not-at-top
    from ae_jax.deploy import onnx_export  # optional: the deploy extra
  except ImportError as e:
    raise SystemExit(f"error: --format onnx needs the deploy extra (pip "
                     f"install -e '.[deploy]'): {e}") from None
  return onnx_export


def main(argv):
  del argv
  config = cli.checked_config(_CONFIG.value)
  fmt = _FORMAT.value or ('onnx' if _OUT.value.endswith('.onnx') else
                          'saved_model')
  onnx_export = _onnx_export() if fmt == 'onnx' else None
  try:  # before the slow part: refuse a bad --out at once
    outputs.check_not_input('--out', _OUT.value, {
        'the checkpoint': outputs.checkpoint_data(_CKPT.value)})
    if fmt == 'onnx':
      onnx_export.check_out_file(_OUT.value)
      onnx_export.check_test_settings(config.test)
    else:
      export_lib.check_out_dir(_OUT.value)
    # The model config and keypoints from the checkpoint (older ones:
    # --config's).
    loaded = inference_checkpoint.load_for_inference(
        _CKPT.value, config,
        config_flags.get_override_values(flags.FLAGS['config']))
    logging.info('Read %s.', cli.checkpoint_line(_CKPT.value, loaded.step))
  except (checkpoints.CheckpointError, ValueError, FileNotFoundError,
          outputs.OutputError) as e:  # ExportErrors are ValueErrors
    raise SystemExit(f'error: {e}') from None
  grouping = config.test.grouping
  try:
    fixed = tuple(int(v) for v in _FIXED.value) if _FIXED.value else None
    if fixed is not None and len(fixed) != 3:
      raise ValueError(f'--fixed_shape wants B,H,W, got {_FIXED.value}')
    if fmt == 'onnx':
      path = onnx_export.export_onnx(
          loaded.model_config, loaded.variables, _OUT.value,
          spec=loaded.spec, test=config.test, fixed_shape=fixed)
      print(f'ONNX model written to {path}')
      return
    export_lib.export_saved_model(
        loaded.model_config, loaded.variables, _OUT.value,
        fixed, max_people=grouping.max_people if _DECODE.value else 0,
        nms_kernel=grouping.nms_kernel)
  except ValueError as e:  # ExportError, a bad --fixed_shape
    raise SystemExit(f'error: {e}') from None
  except OSError as e:  # the disk filled up or vanished while writing
    raise SystemExit(f'error: cannot write --out {_OUT.value}: {e}') from None
  print(f'SavedModel written to {_OUT.value}')


if __name__ == '__main__':
  cli.run(main)

r"""Evaluates a checkpoint on COCO keypoints: AP table + results json.

  python eval.py --config configs/coco512.py --ckpt /tmp/ae_coco512 \
      --coco_root /data/coco --output results.json
  # the paper's multi-scale test (scales 2, 1, 0.5, with flip); grouping
  # keys sit in config.test.grouping:
  python eval.py --config configs/coco512.py --ckpt DIR --coco_root ROOT \
      --config.test.scales='(2, 1, 0.5)' \
      --config.test.grouping.detection_threshold=0.1

Compile only, for a TPU slice (libtpu; no checkpoint needed): eval's
device program (forward at every test scale with flip, resize, NMS/top-k)
for an image of --aot_image_size, its per-chip memory and roofline per
image (ae_jax/aot_check.py; exit 0 fits, 2 does not):

  python eval.py --config configs/coco512.py --aot_topology=v5e:2x2 \
      --config.test.scales='(2, 1, 0.5)'

--ckpt is a converted-variables directory (convert_torch_weights.py) or a
training workdir (its latest checkpoint). Images that cannot be read are
logged by name and skipped (their people count as missed). --output is
checked (its folder created) before the evaluation and written atomically.

Images are batched per shape bucket over the local devices (--batch_size,
a multiple of their count); host grouping overlaps the device work.
Multi-process (--coordinator_address/--num_processes/--process_id, or
JAX_COORDINATOR_ADDRESS / AE_JAX_DISTRIBUTED=1; the flags of
ae_jax/launch_flags.py, as train.py):
each process evaluates every n-th image on its own devices, results are
gathered, process 0 prints the table and writes the json.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ae_jax import aot_flags  # defines the --aot_* flags
from ae_jax import cli
from ae_jax import launch_flags  # defines the multi-process flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/coco512.py', 'Config file (configs/*.py); the model '
    'and test groups are used.', lock_config=True)
_CKPT = flags.DEFINE_string('ckpt', None, 'Variables dir or train workdir.')
_COCO_ROOT = flags.DEFINE_string(
    'coco_root', None, 'COCO root (annotations/, <split>/); default '
    'config.data.coco_root.')
_SPLIT = flags.DEFINE_string('split', 'val2017', 'COCO split to evaluate.')
_OUTPUT = flags.DEFINE_string('output', None, 'Write the results json here.')
_MAX_IMAGES = flags.DEFINE_integer(
    'max_images', None, 'Evaluate only the first N images (smoke tests).')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', None, 'Images per device batch (default: one per local '
    'device).')
_AOT_IMAGE_SIZE = flags.DEFINE_string(
    'aot_image_size', '640x480', 'With --aot_topology: the original image '
    'size WxH the eval program is compiled for (COCO\'s most common).')


def _aot_check(config) -> int:
  """--aot_topology: compile eval's device program for a TPU slice."""
  aot_flags.prepare_environment()
  # pylint: disable=g-import-not-at-top
  from ae_jax import aot_check, aot_targets, keypoints
  try:
    w, h = (int(v) for v in _AOT_IMAGE_SIZE.value.lower().split('x'))
  except ValueError:
    print(f'error: --aot_image_size={_AOT_IMAGE_SIZE.value!r}: expected '
          'WxH, e.g. 640x480', file=sys.stderr)
    return 1
  try:
    spec = keypoints.resolve_spec(config.data, 'val', _SPLIT.value)
    return aot_check.check_eval(
        config, aot_flags.TOPOLOGY.value, spec, image_hw=(h, w),
        batch_size=_BATCH_SIZE.value, search=aot_flags.SEARCH.value,
        top_fusions=aot_flags.TOP_FUSIONS.value,
        hlo_out=aot_flags.HLO_OUT.value)
  except (aot_targets.AotError, keypoints.KeypointSpecError,
          FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if aot_flags.TOPOLOGY.value:  # compile only: no checkpoint, no devices
    sys.exit(_aot_check(_CONFIG.value))
  if not _CKPT.value:
    raise app.UsageError('--ckpt is required (or --aot_topology)')
  try:  # tf (imported by some deps) must not grab accelerator memory.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  # pylint: disable=g-import-not-at-top
  from ae_jax import checkpoints, coco_eval, inference, keypoints, sharding
  from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top
  launch_flags.initialize()
  import jax  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if _OUTPUT.value and jax.process_index() == 0:
    try:  # before anything slow: a bad --output must not cost an eval
      coco_eval.check_output_path(_OUTPUT.value)
    except coco_eval.EvalError as e:
      raise SystemExit(f'error: {e}') from None
  sharding.log_backend(config.test.input_size)
  split = _SPLIT.value
  data = dict(config.data, coco_root=_COCO_ROOT.value or config.data.coco_root)
  try:  # FileNotFoundError / ValueError: the keypoint spec's file or keys.
    spec = keypoints.resolve_spec(data, 'val', split)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  model = ae_model.create_model(
      {**config.model, 'num_joints': spec.num_joints},
      ae_model.default_kernels(jax.default_backend()))
  try:  # CheckpointError: bad --ckpt; ValueError: bad config.test values.
    variables = checkpoints.restore_variables(_CKPT.value)
    keypoints.check_head(variables, spec.num_joints, _CKPT.value)
    checkpoints.check_fits(variables, {**config.model, 'num_joints':
                                       spec.num_joints}, _CKPT.value)
    predictor = inference.Predictor(model, variables, **config.test,
                                    flip_index=spec.flip_index,
                                    batch_size=_BATCH_SIZE.value)
  except (checkpoints.CheckpointError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  try:  # EvalError: an empty split; FileNotFoundError / ValueError: a
    # missing coco_root or annotation file, malformed annotations.
    metrics, info = coco_eval.evaluate(
        predictor, data['coco_root'], split,
        output_path=_OUTPUT.value, max_images=_MAX_IMAGES.value,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        sigmas=spec.sigmas, annotations=config.data.val_annotations,
        images=config.data.val_images)
  except (coco_eval.EvalError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  if jax.process_index() != 0:
    return
  print(coco_eval.format_report(
      metrics, info, split,
      f'scales {list(predictor.scales)}, flip {predictor.flip}'))


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main, flags_parser=cli.parse_flags)

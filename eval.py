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
image (ae_jax/aot/report.py; exit 0 fits, 2 does not):

  python eval.py --config configs/coco512.py --aot_topology=v5e:2x2 \
      --config.test.scales='(2, 1, 0.5)'

--ckpt is a converted-variables directory (convert_torch_weights.py) or a
training workdir (its newest usable step). The model config and keypoint
spec come from the checkpoint (older checkpoints: from --config); the
split's annotation file must list the checkpoint's joints, in order. Images
that cannot be read are logged by name and skipped (their people count as
missed). --output is checked (its folder created) before the evaluation and
written atomically.

Images are batched per shape bucket over the local devices (--batch_size,
a multiple of their count); host grouping overlaps the device work.
Multi-process (--coordinator_address/--num_processes/--process_id, or
JAX_COORDINATOR_ADDRESS / AE_JAX_DISTRIBUTED=1; the flags of
ae_jax/launch_flags.py, as train.py):
each process evaluates every n-th image on its own devices, results are
gathered, process 0 prints the table and writes the json.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ae_jax.aot import flags as aot_flags  # defines the --aot_* flags
from ae_jax import cli
from ae_jax import launch_flags  # defines the multi-process flags
from ae_jax import outputs
from ae_jax.data import coco

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
  from ae_jax import keypoints
  from ae_jax.aot import report
  from ae_jax.aot import targets
  try:
    w, h = (int(v) for v in _AOT_IMAGE_SIZE.value.lower().split('x'))
  except ValueError:
    print(f'error: --aot_image_size={_AOT_IMAGE_SIZE.value!r}: expected '
          'WxH, e.g. 640x480', file=sys.stderr)
    return 1
  try:
    spec = coco.resolve_spec(config.data, 'val', _SPLIT.value)
    return cli.interruptible(  # Ctrl-C ends a compile at once
        report.check_eval, config, aot_flags.TOPOLOGY.value, spec,
        image_hw=(h, w),
        batch_size=_BATCH_SIZE.value, search=aot_flags.SEARCH.value,
        top_fusions=aot_flags.TOP_FUSIONS.value,
        hlo_out=aot_flags.HLO_OUT.value)
  except (targets.AotError, keypoints.KeypointSpecError,
          coco.AnnotationError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = cli.checked_config(_CONFIG.value)
  if aot_flags.TOPOLOGY.value:  # compile only: no checkpoint, no devices
    return _aot_check(config)
  if not _CKPT.value:
    raise app.UsageError('--ckpt is required (or --aot_topology)')
  # pylint: disable=g-import-not-at-top
  from ae_jax import sharding
  from ae_jax.train import checkpoints
  from ae_jax.train import inference_checkpoint
  from ae_jax.infer import coco_eval
  from ae_jax.infer import predict
  from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top
  launch_flags.initialize()
  import jax  # pylint: disable=g-import-not-at-top
  split = _SPLIT.value
  coco_root = _COCO_ROOT.value or config.data.coco_root
  try:  # before anything slow: missing data or a bad --output
    ann_file, image_dir = coco.check_split_files(
        coco_root, split, config.data.val_annotations, config.data.val_images)
    if _OUTPUT.value and jax.process_index() == 0:
      outputs.check_not_input('--output', _OUTPUT.value, {
          'the annotation file': ann_file, 'the image folder': image_dir,
          'the checkpoint': outputs.checkpoint_data(_CKPT.value)})
      coco_eval.check_output_path(_OUTPUT.value)
  except (coco_eval.EvalError, outputs.OutputError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  sharding.log_backend(config.test.input_size)
  try:  # CheckpointError: bad --ckpt; ValueError: bad config.test values,
    # joints that differ from the checkpoint's; FileNotFoundError: a file.
    loaded = inference_checkpoint.load_for_inference(
        _CKPT.value, config,
        config_flags.get_override_values(flags.FLAGS['config']),
        coco_root=coco_root, split=split)
    logging.info('Read %s.', cli.checkpoint_line(_CKPT.value, loaded.step))
    spec = loaded.spec
    model = ae_model.create_model(
        loaded.model_config, ae_model.default_kernels(jax.default_backend()))
    options = predict.PredictOptions(**config.test,
                                     flip_index=spec.flip_index)
    predictor = predict.Predictor(model, loaded.variables, options,
                                  batch_size=_BATCH_SIZE.value)
  except (checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  try:  # EvalError: an empty split; FileNotFoundError / ValueError: a
    # missing coco_root or annotation file, malformed annotations.
    metrics, info = coco_eval.evaluate(
        predictor.stream, coco_root, split,
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
      f'{cli.checkpoint_line(_CKPT.value, loaded.step)}, scales '
      f'{list(options.scales)}, flip {options.flip}'))


if __name__ == '__main__':
  cli.run(main)

r"""Converts an mmpose / mmcls MobileNetV2 PyTorch checkpoint to Flax.

  python convert_torch_weights.py INPUT.pth OUTPUT_DIR [--config=...]

INPUT.pth is either the mmpose AE model (`state_dict` with `backbone.*` and
`keypoint_head.*`, e.g. mobilenetv2_coco_512x512-4d96e309_20200816.pth) or an
ImageNet MobileNetV2 classifier (mmcls layout, e.g.
mobilenet_v2_batch256_imagenet_20200708-3b2dc3af.pth; backbone only, for
`--config.train.init_checkpoint`). OUTPUT_DIR receives an orbax variables
checkpoint that eval.py / train.py read (ae_jax.train.checkpoints). The model
shape comes from `--config`'s `model` group (the paper model by default);
`--infer_arch` takes widen_factor and head widths from the checkpoint. The
checkpoint records the model config and the keypoint spec of --config
(config.data.keypoints, when the head predicts its joints), so eval.py,
demo.py and export.py need no --config.model overrides.

OUTPUT_DIR must be new or empty: an existing checkpoint is replaced only
with `--overwrite` and only if it is a variables checkpoint (never a
training workdir or another folder). It is checked before converting and
written atomically (a temporary sibling, renamed into place).

Any mismatch (missing, unused or differently shaped tensors; a checkpoint
of another width names the config.model keys it implies), a missing,
truncated, non-checkpoint or code-carrying pickle file, or an OUTPUT_DIR
that may not be written gives one `error:` line and exit status 1.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ae_jax import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'configs', 'default.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Config whose `model` group is converted for.',
    lock_config=True)
_INFER_ARCH = flags.DEFINE_bool(
    'infer_arch', False,
    'Infer widen_factor / num_deconv_filters / num_joints from the weights '
    'instead of taking them from --config.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False,
    'Replace an existing OUTPUT_DIR if it is a variables checkpoint (a '
    'training workdir or any other folder is still refused).')


def _fail(message: str) -> None:
  """Prints `error: message` and exits 1."""
  print(f'error: {message}', file=sys.stderr)
  sys.stderr.flush()
  sys.exit(1)


def main(argv):
  if len(argv) != 3:
    raise app.UsageError(
        'usage: convert_torch_weights.py INPUT.pth OUTPUT_DIR [--config=...]')
  input_path, output_dir = argv[1], argv[2]
  cli.checked_config(_CONFIG.value)
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every write at INFO
  # Imported here so --help and flag errors stay fast; torch is lazy inside.
  # pylint: disable=g-import-not-at-top
  from ae_jax import convert
  from ae_jax.data import coco
  from ae_jax.train import checkpoints
  from ae_jax.train import variables_checkpoint
  # pylint: enable=g-import-not-at-top
  try:  # before the conversion: refuse early, destroy nothing
    variables_checkpoint.check_variables_target(output_dir, _OVERWRITE.value)
  except checkpoints.CheckpointError as e:
    _fail(str(e))
  config = _CONFIG.value
  try:  # the joints (K, names) of the config's keypoint spec
    spec = coco.resolve_spec(config.data)
  except (FileNotFoundError, ValueError) as e:
    spec = None  # --infer_arch: K from the weights, names unknown
    if not _INFER_ARCH.value:
      _fail(str(e))
  kwargs = {} if _INFER_ARCH.value else dict(
      widen_factor=config.model.widen_factor,
      num_deconv_filters=tuple(config.model.num_deconv_filters),
      num_joints=spec.num_joints)
  try:
    result = convert.convert_checkpoint(input_path, **kwargs)
  except convert.ConversionError as e:
    where = '' if input_path in str(e) else f'{input_path}: '
    hint = ' (or pass --infer_arch)' if 'config.model.' in str(e) else ''
    _fail(f'{where}{e}{hint}')
  # What the checkpoint records (eval/demo/export read it): the model, and
  # the keypoint spec where the weights predict its joints.
  k = result.model_kwargs.get('num_joints')
  record = checkpoints.Record(
      {**result.model_kwargs, 'dtype': config.model.dtype},
      spec if spec is not None and spec.num_joints == k else None)
  try:
    variables_checkpoint.save_variables(output_dir, result.variables,
                               overwrite=_OVERWRITE.value, record=record)
  except (checkpoints.CheckpointError, OSError) as e:
    message = e if isinstance(e, checkpoints.CheckpointError) else (
        f'cannot write {output_dir}: {e}')
    print(f'error: {message}', file=sys.stderr)
    sys.stderr.flush()
    # A failed orbax save can leave non-daemon threads waiting for a
    # signal that never comes (the interpreter would hang at exit).
    os._exit(1)  # pylint: disable=protected-access
  model_args = ', '.join(f'{k}={v}' for k, v in
                         sorted(result.model_kwargs.items()))
  print(f'converted {result.kind} checkpoint {input_path}\n'
        f'  model: AEModel({model_args})'
        f'{" backbone only" if result.kind == convert.IMAGENET else ""}\n'
        f'  tensors: {result.num_tensors} used, {len(result.dropped)} '
        f'dropped (num_batches_tracked, classifier head)\n'
        f'  parameters: {result.num_params:,}\n'
        f'  written to {os.path.abspath(output_dir)}')


if __name__ == '__main__':
  cli.run(main)

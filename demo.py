r"""Draws detected skeletons on images, folders of images or videos.

  python demo.py --ckpt /tmp/ae_mini --config configs/coco_mini.py \
      data/coco_mini/val2017/ --out /tmp/demo
  python demo.py --ckpt DIR --config configs/coco512.py walk.mp4 --out DIR
  python demo.py --model /tmp/ae.onnx --out DIR photos/ walk.mp4

--model runs an export.py --format onnx file with onnxruntime
(deploy/predictor.py): no jax, flax, tensorflow or torch is imported, and
--config is not read (the keypoints and test settings come from the file).

Images become <out>/<stem>.png plus <out>/poses.json (every image's people:
score and [x, y, value] per joint); a video (by extension: .mp4, .avi, ...)
becomes <out>/<stem>.mp4 (mp4v) plus <out>/<stem>.json (poses per frame).
The model config and the keypoints (names, flip pairs, skeleton) come from
the checkpoint (older checkpoints: from --config, whose keypoints may need
the annotation file). Output names never collide with each other, an input
or (unless --overwrite) an existing file: on a clash the extension joins
the stem (img_gif.png), then a counter (img_gif_2.png; poses_2.json).
Progress is logged; the last line gives the img/s (including the first
compile).
Inputs that are missing or unreadable are named in one final `error:` line
(exit 1) after the readable ones are drawn.
"""

import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ae_jax import cli
from ae_jax import outputs

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/coco512.py', 'Config file (model and test groups).',
    lock_config=True)
_CKPT = flags.DEFINE_string('ckpt', None, 'Variables dir or train workdir.')
_MODEL = flags.DEFINE_string(
    'model', None, 'An ONNX export (export.py --format onnx) instead of '
    '--ckpt: runs with onnxruntime, without JAX.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_MIN_SCORE = flags.DEFINE_float(
    'min_score', 0.2, 'Draw people whose score (mean joint heatmap value) '
    'is above this; grouping also returns many low-score fragments.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace existing files in --out (never an input); '
    'default: keep them and pick new names.')
flags.mark_flags_as_required(['out'])
flags.mark_flags_as_mutual_exclusive(['ckpt', 'model'], required=True)

POSES_JSON = 'poses.json'


def _onnx_predictor(path):
  """(stream, KeypointSpec) of an ONNX export; imports no JAX."""
  try:  # pylint: disable=g-import-not-at-top
    from ae_jax.deploy import predictor  # optional: the deploy extra
    onnx_predictor = predictor.OnnxPredictor(path)
  except ImportError as e:
    raise SystemExit(f"error: --model needs the deploy extra (pip install "
                     f"-e '.[deploy]'): {e}") from None
  except ValueError as e:  # predictor.ModelFileError
    raise SystemExit(f'error: {e}') from None
  return onnx_predictor.stream, onnx_predictor.spec


def _jax_predictor(config, ckpt):
  """(stream, KeypointSpec) of a checkpoint run with JAX."""
  # pylint: disable=g-import-not-at-top
  import jax
  from ae_jax.train import inference_checkpoint
  from ae_jax.infer import predict
  from ae_jax.models import ae_model
  from ae_jax.train import checkpoints
  try:  # CheckpointError: bad --ckpt; ValueError: bad config values;
    # FileNotFoundError: an annotation file an older checkpoint needs.
    loaded = inference_checkpoint.load_for_inference(
        ckpt, config,
        config_flags.get_override_values(flags.FLAGS['config']))
    spec = loaded.spec
    model = ae_model.create_model(
        loaded.model_config, ae_model.default_kernels(jax.default_backend()))
    logging.info('Read %s.', cli.checkpoint_line(ckpt, loaded.step))
    predictor = predict.Predictor(model, loaded.variables,
                                  predict.PredictOptions(
                                      **config.test,
                                      flip_index=spec.flip_index))
  except (checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  return predictor.stream, spec


def main(argv):
  inputs = argv[1:]
  if not inputs:
    raise app.UsageError('give image files, folders or video files')
  # --model reads no config; a bad config value stops before any work.
  config = None if _MODEL.value else cli.checked_config(_CONFIG.value)
  from ae_jax.infer import draw  # pylint: disable=g-import-not-at-top
  out_dir = _OUT.value
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise SystemExit(f'error: --out {out_dir} is a file, not a folder')
  try:
    outputs.check_not_input('--out', out_dir, {
        'the checkpoint': outputs.checkpoint_data(_CKPT.value or
                                                  _MODEL.value)})
  except outputs.OutputError as e:
    raise SystemExit(f'error: {e}') from None
  images, videos, failed = draw.expand_inputs(inputs)
  for path, reason in failed:
    logging.error('%s: %s', path, reason)
  failed = [path for path, _ in failed]
  if _MODEL.value:
    stream, spec = _onnx_predictor(_MODEL.value)
  else:
    stream, spec = _jax_predictor(config, _CKPT.value)
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise SystemExit(f'error: cannot create --out {out_dir}: '
                     f'{e.strerror}') from None
  overwrite = _OVERWRITE.value
  poses_json = os.path.join(out_dir, POSES_JSON)
  inputs_real = {os.path.realpath(p) for p in images + videos}
  if images and (not overwrite or os.path.realpath(poses_json) in
                 inputs_real):
    poses_json = outputs.free_path(poses_json, inputs_real)
  reserved = [os.path.basename(poses_json)]
  bases = draw.output_bases(images, out_dir, ('.png',), reserved, overwrite)
  bases.update(draw.output_bases(
      videos, out_dir, ('.mp4', '.json'),
      reserved + [b + '.png' for b in bases.values()], overwrite))
  renamed = sum(os.path.basename(b) != os.path.splitext(
      os.path.basename(p))[0] for p, b in bases.items())
  renamed += bool(images) and os.path.basename(poses_json) != POSES_JSON
  if renamed:
    logging.info('%d output(s) take another name, to keep existing files and'
                 ' inputs%s.', renamed, '' if overwrite else ' (--overwrite '
                 'replaces files that are not inputs)')
  start = time.perf_counter()
  count = 0
  if images:
    entries, bad = draw.annotate_images(stream, images, out_dir,
                                        _MIN_SCORE.value, bases,
                                        skeleton=spec.skeleton)
    failed += bad
    count += len(entries)
    draw.write_json(entries, poses_json)
  for path in videos:
    frames = draw.annotate_video(stream, path, bases[path],
                                 _MIN_SCORE.value, skeleton=spec.skeleton)
    if frames is None:
      failed.append(path)
    else:
      count += frames
  elapsed = time.perf_counter() - start
  print(f'{count} images/frames in {elapsed:.1f} s, '
        f'{count / max(elapsed, 1e-9):.2f} img/s -> {out_dir}')
  if failed:
    raise SystemExit(f'error: {len(failed)} input(s) could not be read: ' +
                     ', '.join(failed))


if __name__ == '__main__':
  cli.run(main)

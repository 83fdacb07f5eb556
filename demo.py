r"""Draws detected skeletons on images, folders of images or videos.

  python demo.py --ckpt /tmp/ae_mini --config configs/coco_mini.py \
      data/coco_mini/val2017/ --out /tmp/demo
  python demo.py --ckpt DIR --config configs/coco512.py walk.mp4 --out DIR

Images become <out>/<stem>.png plus <out>/poses.json (every image's people:
score and [x, y, value] per joint); a video (by extension: .mp4, .avi, ...)
becomes <out>/<stem>.mp4 (mp4v) plus <out>/<stem>.json (poses per frame).
The model config and the keypoints (names, flip pairs, skeleton) come from
the checkpoint (older checkpoints: from --config, whose keypoints may need
the annotation file). Output names never collide with each other or
overwrite an input: on a clash the extension joins the stem (img_gif.png),
then a counter. Progress is logged; the last line gives the img/s (including
the first compile).
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

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/coco512.py', 'Config file (model and test groups).',
    lock_config=True)
_CKPT = flags.DEFINE_string('ckpt', None, 'Variables dir or train workdir.')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_MIN_SCORE = flags.DEFINE_float(
    'min_score', 0.2, 'Draw people whose score (mean joint heatmap value) '
    'is above this; grouping also returns many low-score fragments.')
flags.mark_flags_as_required(['ckpt', 'out'])

POSES_JSON = 'poses.json'


def main(argv):
  inputs = argv[1:]
  if not inputs:
    raise app.UsageError('give image files, folders or video files')
  # pylint: disable=g-import-not-at-top
  from ae_jax.train import checkpoints
  from ae_jax.train import inference_checkpoint
  from ae_jax.infer import draw
  from ae_jax.infer import predict
  from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top
  out_dir = _OUT.value
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise SystemExit(f'error: --out {out_dir} is a file, not a folder')
  images, videos, failed = draw.expand_inputs(inputs)
  for path, reason in failed:
    logging.error('%s: %s', path, reason)
  failed = [path for path, _ in failed]
  import jax  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:  # CheckpointError: bad --ckpt; ValueError: bad config values;
    # FileNotFoundError: an annotation file an older checkpoint needs.
    loaded = inference_checkpoint.load_for_inference(
        _CKPT.value, config,
        config_flags.get_override_values(flags.FLAGS['config']))
    spec = loaded.spec
    model = ae_model.create_model(
        loaded.model_config, ae_model.default_kernels(jax.default_backend()))
    predictor = predict.Predictor(model, loaded.variables, **config.test,
                                  flip_index=spec.flip_index)
    os.makedirs(out_dir, exist_ok=True)
  except (checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  except OSError as e:
    raise SystemExit(f'error: cannot create --out {out_dir}: '
                     f'{e.strerror}') from None
  bases = draw.output_bases(images, out_dir, ('.png',),
                            reserved=[POSES_JSON])
  bases.update(draw.output_bases(
      videos, out_dir, ('.mp4', '.json'),
      reserved=[POSES_JSON] + [b + '.png' for b in bases.values()]))
  start = time.perf_counter()
  count = 0
  if images:
    entries, bad = draw.annotate_images(predictor, images, out_dir,
                                        _MIN_SCORE.value, bases,
                                        skeleton=spec.skeleton)
    failed += bad
    count += len(entries)
    draw.write_json(entries, os.path.join(out_dir, POSES_JSON))
  for path in videos:
    frames = draw.annotate_video(predictor, path, bases[path],
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
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main, flags_parser=cli.parse_flags)

r"""Draws detected skeletons on images and writes PNGs.

  python demo.py --ckpt /tmp/ae_mini --config configs/coco_mini.py \
      data/coco_mini/val2017/000000000785.jpg --out /tmp/demo
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/coco512.py', 'Config file (model and test groups).',
    lock_config=True)
_CKPT = flags.DEFINE_string('ckpt', None, 'Variables dir or train workdir.')
_OUT = flags.DEFINE_string('out', None, 'Output directory for the PNGs.')
_MIN_SCORE = flags.DEFINE_float(
    'min_score', 0.2, 'Draw people whose score (mean joint heatmap value) '
    'is above this; grouping also returns many low-score fragments.')
flags.mark_flags_as_required(['ckpt', 'out'])


def main(argv):
  images = argv[1:]
  if not images:
    raise app.UsageError('give one or more image files')
  import cv2  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from ae_jax import checkpoints, draw, inference
  from ae_jax.data import coco  # pylint: disable=g-import-not-at-top
  from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    variables = checkpoints.restore_variables(_CKPT.value)
  except checkpoints.CheckpointError as e:
    raise SystemExit(f'error: {e}') from None
  predictor = inference.Predictor(ae_model.AEModel(**config.model), variables,
                                  **inference.predictor_kwargs(config.test))
  os.makedirs(_OUT.value, exist_ok=True)
  failed = 0
  for path in images:
    try:
      image = coco.decode_image(path)
    except coco.ImageError as e:
      logging.error('%s', e)
      failed += 1
      continue
    poses, scores = predictor(image)
    canvas = draw.draw_poses(image, poses, scores,
                             person_threshold=_MIN_SCORE.value)
    name = os.path.splitext(os.path.basename(path))[0] + '.png'
    out = os.path.join(_OUT.value, name)
    cv2.imwrite(out, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    print(f'{path}: {int((scores > _MIN_SCORE.value).sum())} people -> {out}')
  if failed:
    raise SystemExit(f'error: {failed} image(s) could not be read')


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main)

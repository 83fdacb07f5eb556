r"""Draws detected skeletons on images and writes PNGs (<out>/<stem>.png).

  python demo.py --ckpt /tmp/ae_mini --config configs/coco_mini.py \
      data/coco_mini/val2017/000000000785.jpg --out /tmp/demo
"""

import os

from absl import app
from absl import flags
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
  # pylint: disable=g-import-not-at-top
  from ae_jax import checkpoints, draw, inference, keypoints
  from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:  # CheckpointError: bad --ckpt; ValueError: bad config values;
    # FileNotFoundError: the annotation file the keypoints are read from.
    spec = keypoints.resolve_spec(config.data, 'val')
    model = ae_model.AEModel(**{**config.model,
                                'num_joints': spec.num_joints})
    variables = checkpoints.restore_variables(_CKPT.value)
    keypoints.check_head(variables, spec.num_joints, _CKPT.value)
    predictor = inference.Predictor(model, variables, **config.test,
                                    flip_index=spec.flip_index)
  except (checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  failed = draw.annotate_images(predictor, images, _OUT.value,
                                person_threshold=_MIN_SCORE.value,
                                skeleton=spec.skeleton)
  if failed:
    raise SystemExit(f'error: {len(failed)} image(s) could not be read: ' +
                     ', '.join(failed))


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  app.run(main)

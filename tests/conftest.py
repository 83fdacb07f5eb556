"""Shared test set-up: 8 simulated CPU devices, quiet TF, mini COCO path."""

import os
import pathlib

# Must be set before jax is imported anywhere.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # pylint: disable=g-import-not-at-top

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COCO_MINI = REPO_ROOT / 'data' / 'coco_mini'


@pytest.fixture(scope='session')
def coco_mini_root() -> pathlib.Path:
  """The mini COCO (4 val2017 images, 14 person annotations) in the repo."""
  assert (COCO_MINI / 'annotations' / 'person_keypoints_val2017.json').exists()
  return COCO_MINI

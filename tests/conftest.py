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


def random_variables(model, seed: int = 0):
  """Random AEModel variables by shape (cheaper than compiling model.init).

  Weights ~ N(0, 0.2), BatchNorm statistics at identity (mean 0, var 1).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if 'var' in name:
      return np.ones(s.shape, np.float32)
    if 'mean' in name:
      return np.zeros(s.shape, np.float32)
    return (rng.normal(size=s.shape) * 0.2).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)

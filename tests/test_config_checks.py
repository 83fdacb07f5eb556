"""config_checks: every config key range-checked, one line naming it.

In-process (no JAX); the command-line wiring is in tests/test_careless.py.
"""

import importlib
import pathlib

import ml_collections
import pytest

from ae_jax import config_checks
from ae_jax.data import eval_input
from configs import default
from tests.conftest import small_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _leaf_keys(config: ml_collections.ConfigDict, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaf_keys(value, f'{prefix}{key}.')
    else:
      yield prefix + key


def test_every_default_key_has_one_rule():
  """The table and configs/default.py stay in step: a new key needs a row
  (or a cross-key check), a removed one loses its row."""
  keys = {k for k in _leaf_keys(default.get_config())
          if not k.startswith('data.keypoints.')}  # coco.resolve_spec
  rows = [r.key for r in config_checks.RULES]
  assert len(rows) == len(set(rows))
  assert set(rows) | set(config_checks.CROSS_CHECKED) == keys
  assert not set(rows) & set(config_checks.CROSS_CHECKED)


@pytest.mark.parametrize('name', sorted(
    p.stem for p in (REPO_ROOT / 'configs').glob('*.py')
    if p.stem != '__init__'))
def test_shipped_configs_pass(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  config_checks.check_train_config(config)
  config_checks.check_inference_config(config)


# One row per careless value: key, value, the line's expected text.
BAD = [
    # sigma 0 used to train into a NaN after set-up and the first compile.
    ('data.sigma', 0.0, r'config.data.sigma = 0.0: must be a number > 0$'),
    ('data.sigma', 9.0, r'config.data.sigma = 9.0: must be a number in '
     r'\(0, 8\] \(half the 16 px heatmap side'),
    # An even NMS window failed inside jit (TypeError).
    ('test.grouping.nms_kernel', 4, r'nms_kernel = 4: must be an odd '
     r'integer >= 1'),
    # max_people 0 scored an all-zero table with exit 0.
    ('test.grouping.max_people', 0, r'config.test.grouping.max_people = 0:'
     r' must be an integer >= 1$'),
    ('test.grouping.detection_threshold', -1.0, r'must be a number in '
     r'\[0, 1\]'),
    ('test.grouping.tag_threshold', 0.0, r'must be a number > 0'),
    ('test.flip', 'yes', r"config.test.flip = 'yes': must be True or False"),
    ('test.input_size', 0, r'config.test.input_size = 0: must be an '
     r'integer >= 1'),
    ('data.max_people', 0, r'config.data.max_people = 0'),
    ('data.scale_type', 'foo', r"must be one of 'short', 'long'"),
    ('data.scale_factor', (1.5, 0.75), r'\(min, max\) numbers with 0 < min'
     r' <= max'),
    ('data.flip_prob', 2.0, r'must be a number in \[0, 1\]'),
    ('data.rot_factor', -5.0, r'must be a number in \[0, 180\]'),
    ('data.source', 'csv', r"must be one of 'json', 'tfds'"),
    ('data.workers', -2, r'config.data.workers = -2: must be -1 \(auto'),
    ('data.val_split', '', r'must be a non-empty string'),
    ('model.dtype', 'float16', r"must be one of 'float32', 'bfloat16'"),
    ('model.widen_factor', 0.0, r'must be a number > 0'),
    ('model.num_deconv_filters', (16, 16), r'3 integers >= 1'),
    ('optim.lr', -1.0, r'config.optim.lr = -1.0: must be a number > 0'),
    ('optim.lr', float('nan'), r'config.optim.lr = nan'),
    ('optim.decay_epochs', (260, 200), r'ascending order'),
    ('optim.decay_factor', 0.0, r'must be a number in \(0, 1\]'),
    ('optim.warmup_steps', -1, r'must be an integer >= 0'),
    ('loss.push_factor', -0.001, r'must be a number >= 0'),
    ('train.bn_stats', 'x', r"must be one of 'global', 'per_device'"),
    ('train.eval_at_end', 1, r'must be True or False'),
    ('seed', 2**63, r'config.seed = 9223372036854775808: must be an integer'),
]


@pytest.mark.parametrize('key,value,match', BAD)
def test_bad_value_names_the_key_and_range(key, value, match):
  # Not type-safe: a config file may set any type.
  config = ml_collections.ConfigDict(small_config().to_dict(),
                                     type_safe=False)
  *groups, name = key.split('.')
  node = config
  for g in groups:
    node = node[g]
  node[name] = value
  with pytest.raises(config_checks.ConfigError, match=match) as info:
    config_checks.check_train_config(config)
  assert str(info.value).startswith(f'config.{key} = ')
  assert '\n' not in str(info.value)
  if key.split('.')[0] in ('model', 'test'):  # eval, demo, export too
    with pytest.raises(config_checks.ConfigError, match=match):
      config_checks.check_inference_config(config)


@pytest.mark.parametrize('scales,match', [
    # 64 / 0.01 = 6400 px for scale 1 (the project2image size): the
    # probe's 39 GB allocation at 512 px.
    ((0.01,), r'scale 1 implies a 6400 px input side at '
     r'config.test.input_size = 128 \(the smallest scale is rounded up to '
     r'64 px, the others follow it\); every side must be <= 4096 px'),
    ((64.0, 1.0), r'scale 64 implies a 8192 px input side'),
    ((2.0, 0.5), r'several scales must include 1'),
    ((), r'must be one or more numbers > 0'),
    ((1.0, -1.0), r'must be one or more numbers > 0'),
])
def test_bad_test_scales(scales, match):
  config = small_config()
  config.test.scales = scales
  with pytest.raises(config_checks.ConfigError,
                     match=r'^config.test.scales = .*' + match):
    config_checks.check_inference_config(config)


@pytest.mark.parametrize('input_size,scales', [
    (512, (1.0,)), (512, (2.0, 1.0, 0.5)), (128, (0.3,)), (512, (0.1, 1.0)),
    (200, (1.5, 1.0, 0.7))])
def test_implied_sides_are_the_predictors(input_size, scales):
  """Against eval_input.get_multi_scale_size, the size the Predictor warps
  to (a square image: the short side is the side)."""
  low = min(scales)
  for s, side in config_checks.implied_test_sides(input_size, scales):
    (w, h), _, _ = eval_input.get_multi_scale_size(300, 300, input_size, s, low)
    assert side == w == h, (s, side, w, h)


def test_scales_at_the_bound_pass():
  config = small_config()
  config.test.input_size = 512
  config.test.scales = (8.0, 1.0, 0.125)  # 64 px .. 4096 px
  config_checks.check_inference_config(config)


def test_init_checkpoint_pth_says_convert_first(tmp_path):
  pth = tmp_path / 'model.pth'
  pth.write_bytes(b'PK')
  with pytest.raises(config_checks.ConfigError,
                     match=r"init_checkpoint = '.*model.pth' is a file \(a "
                     r'PyTorch checkpoint\?\): convert it first, `python '
                     r'convert_torch_weights.py .*model.pth OUT_DIR`'):
    config_checks.check_init_checkpoint(str(pth))
  with pytest.raises(config_checks.ConfigError, match='no such folder'):
    config_checks.check_init_checkpoint(str(tmp_path / 'missing'))
  config_checks.check_init_checkpoint(str(tmp_path))
  config_checks.check_init_checkpoint('')

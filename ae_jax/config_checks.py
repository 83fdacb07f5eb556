"""Up-front checks of a config: one clear line naming the key and its range.

Every key of configs/default.py has one row in `RULES` (its valid range, as
the error line states it), or is checked across keys below (sizes, scales,
the step count, the batch split); `tests/test_config_checks.py` keeps the
table and configs/default.py in step. Entry points call
`check_train_config` (train.py, every key) or `check_inference_config`
(eval.py, demo.py, export.py: the model and test groups) right after the
flags are parsed, before JAX starts, so a bad value stops the run in
seconds instead of after set-up, after the first step (a zero sigma trained
into a NaN, an even NMS kernel failed inside jit) or never (a zero
max_people scored an all-zero table; a tiny test scale asked for 39 GB).
The keypoint keys (config.data.keypoints) are checked where the spec is
resolved (coco.resolve_spec), since some come from the annotation file.
"""

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

from etils import epath
import ml_collections

# AEModel: 5 stride-2 stages (MobileNetV2), then 3 x2 deconvolutions; the
# targets are made at input / HEATMAP_STRIDE (ae_jax.data.transforms).
BACKBONE_STRIDE, HEATMAP_STRIDE = 32, 4
# The test-time resize aligns sides to TEST_ALIGN px (data/eval_input.py
# BASE_LENGTH); no test input side may exceed MAX_TEST_SIDE px (maps of a
# 4096 x 4096 input with flip: ~3.4 GB of float32 for 17 joints).
TEST_ALIGN, MAX_TEST_SIDE = 64, 4096


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """One key's valid values.

  Attributes:
    key: dotted path under the config, e.g. 'data.sigma'.
    valid: the valid range in words ('a number > 0'), for the error line.
    ok: value -> whether it is valid.
  """
  key: str
  valid: str
  ok: Callable[[Any], bool]


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v))


def integer(key: str, lo: int, hi: Optional[int] = None) -> Rule:
  """An int in [lo, hi] (hi None: unbounded)."""
  words = f'an integer >= {lo}' if hi is None else (
      f'an integer in [{lo}, {hi}]')
  return Rule(key, words, lambda v: _is_int(v) and v >= lo and (
      hi is None or v <= hi))


def number(key: str, lo: float, hi: Optional[float] = None, *,
           lo_open: bool = False) -> Rule:
  """A finite number in [lo, hi] ((lo, hi] when lo_open; hi None: none)."""
  low = f'> {lo}' if lo_open else f'>= {lo}'
  words = f'a number {low}' if hi is None else (
      f'a number in {"(" if lo_open else "["}{lo}, {hi}]')
  return Rule(key, words, lambda v: _is_number(v) and (
      v > lo if lo_open else v >= lo) and (hi is None or v <= hi))


def choice(key: str, *options: str) -> Rule:
  return Rule(key, 'one of ' + ', '.join(map(repr, options)),
              lambda v: v in options)


def boolean(key: str) -> Rule:
  return Rule(key, 'True or False', lambda v: isinstance(v, bool))


def text(key: str, empty: bool = True) -> Rule:
  return Rule(key, 'a string' if empty else 'a non-empty string',
              lambda v: isinstance(v, str) and (empty or bool(v)))


def _ints(v, n: Optional[int], lo: int) -> bool:
  return (isinstance(v, (tuple, list)) and (n is None or len(v) == n) and
          all(_is_int(x) and x >= lo for x in v))


RULES: Sequence[Rule] = (
    Rule('seed', 'an integer in [-2**63, 2**63)',
         lambda v: _is_int(v) and -2**63 <= v < 2**63),
    number('model.widen_factor', 0, lo_open=True),
    Rule('model.num_deconv_filters',
         '3 integers >= 1 (three x2 deconvolutions: maps at input / 4)',
         lambda v: _ints(v, 3, 1)),
    choice('model.dtype', 'float32', 'bfloat16'),
    text('data.coco_root', empty=False),
    choice('data.source', 'json', 'tfds'),
    text('data.tfds_data_dir'),
    text('data.train_split', empty=False),
    text('data.val_split', empty=False),
    text('data.train_annotations'),
    text('data.train_images'),
    text('data.val_annotations'),
    text('data.val_images'),
    # data.keypoints.*: coco.resolve_spec; input_size, heatmap_size and
    # sigma's upper bound: _check_sizes.
    number('data.sigma', 0, lo_open=True),
    integer('data.max_people', 1),
    number('data.rot_factor', 0, 180),
    Rule('data.scale_factor', '(min, max) numbers with 0 < min <= max',
         lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(
             _is_number(x) for x in v) and 0 < v[0] <= v[1]),
    choice('data.scale_type', 'short', 'long'),
    number('data.trans_factor', 0),
    number('data.flip_prob', 0, 1),
    boolean('data.augment'),
    Rule('data.workers', '-1 (auto: the usable CPUs - 1), 0 (in the '
         'training process) or an integer >= 1',
         lambda v: _is_int(v) and v >= -1),
    number('loss.heatmap_factor', 0),
    number('loss.push_factor', 0),
    number('loss.pull_factor', 0),
    number('optim.lr', 0, lo_open=True),
    integer('optim.base_batch_size', 1),
    boolean('optim.scale_lr'),
    integer('optim.warmup_steps', 0),
    number('optim.warmup_ratio', 0, 1),
    Rule('optim.decay_epochs', 'integers >= 1 in ascending order',
         lambda v: _ints(v, None, 1) and list(v) == sorted(v)),
    number('optim.decay_factor', 0, 1, lo_open=True),
    boolean('optim.shard_opt_state'),
    integer('train.global_batch_size', 1),
    # train.num_epochs / num_steps: check_train_config (num_steps may be
    # unset).
    text('train.init_checkpoint'),
    integer('train.log_every_steps', 1),
    integer('train.checkpoint_every_steps', 1),
    integer('train.keep_checkpoints', 1),
    boolean('train.eval_at_end'),
    choice('train.bn_stats', 'global', 'per_device'),
    integer('test.input_size', 1),
    # test.scales: _check_scales.
    boolean('test.flip'),
    boolean('test.project2image'),
    Rule('test.grouping.nms_kernel',
         'an odd integer >= 1 (a max-pool window centred on each pixel)',
         lambda v: _is_int(v) and v >= 1 and v % 2 == 1),
    integer('test.grouping.max_people', 1),
    number('test.grouping.detection_threshold', 0, 1),
    number('test.grouping.tag_threshold', 0, lo_open=True),
    boolean('test.grouping.use_detection_val'),
    boolean('test.grouping.ignore_too_much'),
    boolean('test.grouping.adjust'),
    boolean('test.grouping.refine'),
)

# Keys checked across keys (not in RULES), for the coverage test.
CROSS_CHECKED = ('data.input_size', 'data.heatmap_size', 'train.num_epochs',
                 'train.num_steps', 'test.scales')


def _get(config: ml_collections.ConfigDict, key: str):
  value = config
  for part in key.split('.'):
    value = value[part]
  return value


def _has(config: ml_collections.ConfigDict, key: str) -> bool:
  try:
    _get(config, key)
  except (KeyError, AttributeError):
    return False
  return True


def check_rules(config: ml_collections.ConfigDict,
                groups: Optional[Sequence[str]] = None) -> None:
  """Raises ConfigError for the first key outside its RULES range.

  Args:
    config: a configs/*.py config. Keys it does not have are skipped.
    groups: only the rows of these top-level groups ('model', 'test');
      None: every row.
  """
  for rule in RULES:
    if groups is not None and rule.key.split('.')[0] not in groups:
      continue
    if not _has(config, rule.key):
      continue
    value = _get(config, rule.key)
    if not rule.ok(value):
      raise ConfigError(f'config.{rule.key} = {value!r}: must be '
                        f'{rule.valid}')


def _positive_int(config: ml_collections.ConfigDict, key: str) -> int:
  """config[key] (dotted) as an int >= 1, else ConfigError naming it."""
  value = _get(config, key)
  if not integer(key, 1).ok(value):
    raise ConfigError(f'config.{key} = {value!r}: must be an integer >= 1')
  return value


def check_init_checkpoint(path: str) -> None:
  """config.train.init_checkpoint: '' or an existing folder (local or URL).

  A file is most likely the released PyTorch checkpoint (.pth), which has
  to be converted first; the error says how.
  """
  if not path:
    return
  where = epath.Path(path)
  if where.is_dir():
    return
  key = f'config.train.init_checkpoint = {path!r}'
  if where.exists():
    raise ConfigError(
        f'{key} is a file (a PyTorch checkpoint?): convert it first, '
        f'`python convert_torch_weights.py {path} OUT_DIR`, then pass '
        '--config.train.init_checkpoint=OUT_DIR')
  raise ConfigError(f'{key}: no such folder (converted weights or an '
                    'ae_jax workdir)')


def total_steps(train: ml_collections.ConfigDict, epoch_steps: int) -> int:
  """The number of train steps: train.num_steps, else num_epochs epochs."""
  if train.num_steps is None:
    return train.num_epochs * epoch_steps
  return train.num_steps


def check_inference_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for model / test values eval, demo, export reject."""
  check_rules(config, ('model', 'test'))
  _check_scales(config.test)


def check_train_config(config: ml_collections.ConfigDict,
                       num_devices: Optional[int] = None,
                       num_processes: int = 1) -> None:
  """Raises ConfigError for values train_and_evaluate cannot run with.

  Args:
    config: a configs/*.py training config.
    num_devices: the global device count the batch is split over (None:
      not checked).
    num_processes: processes that each read a share of the batch.
  """
  t = config.train
  if t.num_steps is None:
    _positive_int(config, 'train.num_epochs')
  elif (isinstance(t.num_steps, bool) or not isinstance(t.num_steps, int)
        or t.num_steps < 1):
    raise ConfigError(
        f'config.train.num_steps = {t.num_steps!r}: must be an integer >= 1 '
        '(or unset, None, to train config.train.num_epochs epochs)')
  check_rules(config)
  _check_sizes(config.data)
  if config.train.eval_at_end:
    _check_scales(config.test)
  batch = t.global_batch_size
  for count, what in ((num_devices, 'devices'), (num_processes, 'processes')):
    if count and batch % count:
      fits = [n for n in (count * (batch // count), count * (batch // count
                                                              + 1)) if n]
      raise ConfigError(
          f'config.train.global_batch_size = {batch} is not a multiple of '
          f'the {count} {what} (choose e.g. '
          f'{" or ".join(map(str, fits))})')


def _check_sizes(data: ml_collections.ConfigDict) -> None:
  """input_size a multiple of the backbone stride, heatmap_size = input/4.

  The model predicts ceil(input / 32) * 8 per side and the targets are
  input / 4: they agree only for multiples of 32 (100 px: 32 vs 25). The
  target Gaussian (sigma) must fit the heatmap.
  """
  def wh(key):
    size = data[key]
    if _is_int(size):
      return size, size
    if (isinstance(size, (tuple, list)) and len(size) == 2 and
        all(_is_int(v) for v in size)):
      return tuple(size)
    raise ConfigError(f'config.data.{key} = {size!r}: must be an int or a '
                      '(w, h) pair of ints')

  in_wh, hm_wh = wh('input_size'), wh('heatmap_size')
  if any(s < 1 or s % BACKBONE_STRIDE for s in in_wh):
    raise ConfigError(
        f'config.data.input_size = {data.input_size!r}: must be a positive '
        f'multiple of {BACKBONE_STRIDE} (the backbone stride), e.g. '
        f'{max(1, round(in_wh[0] / BACKBONE_STRIDE)) * BACKBONE_STRIDE}')
  want = tuple(s // HEATMAP_STRIDE for s in in_wh)
  if hm_wh != want:
    raise ConfigError(
        f'config.data.heatmap_size = {data.heatmap_size!r}: must be '
        f'config.data.input_size / {HEATMAP_STRIDE} = '
        f'{want[0] if want[0] == want[1] else want} (the size of the '
        'heatmaps the model predicts)')
  if data.sigma > min(hm_wh) / 2:
    raise ConfigError(
        f'config.data.sigma = {data.sigma!r}: must be a number in (0, '
        f'{min(hm_wh) / 2:g}] (half the {min(hm_wh)} px heatmap side; the '
        'paper uses 2 at 128 px)')


def implied_test_sides(input_size: int, scales: Sequence[float]
                     ) -> list[tuple[float, int]]:
  """(scale, the short input side it implies) for the test scales.

  As eval_input.get_multi_scale_size: the smallest scale's side is rounded up
  to TEST_ALIGN px and the others scale from it, so a small scale inflates
  every side (scales (0.01,) at 512: scale 1's side, used for the maps of
  project2image, is 64 / 0.01 = 6400 px). The long side grows with the
  image's aspect ratio on top.
  """
  low = min(scales)
  base = math.ceil(low * input_size / TEST_ALIGN) * TEST_ALIGN
  return [(s, int(base * (s / low))) for s in sorted({*scales, 1.0})]


def _check_scales(test: ml_collections.ConfigDict) -> None:
  """Positive scales, 1 among several, sides <= MAX_TEST_SIDE."""
  scales = test.scales
  if not (isinstance(scales, (tuple, list)) and scales and
          all(_is_number(s) and s > 0 for s in scales)):
    raise ConfigError(f'config.test.scales = {scales!r}: must be one or '
                      'more numbers > 0, e.g. (1,) or (2, 1, 0.5)')
  if len(scales) > 1 and 1 not in scales:
    raise ConfigError(f'config.test.scales = {tuple(scales)!r}: several '
                      'scales must include 1 (the tags come from scale 1)')
  if not integer('test.input_size', 1).ok(test.input_size):
    return  # check_rules names it
  for s, side in implied_test_sides(test.input_size, scales):
    if side > MAX_TEST_SIDE:
      raise ConfigError(
          f'config.test.scales = {tuple(scales)!r}: scale {s:g} implies a '
          f'{side} px input side at config.test.input_size = '
          f'{test.input_size} (the smallest scale is rounded up to '
          f'{TEST_ALIGN} px, the others follow it); every side must be <= '
          f'{MAX_TEST_SIDE} px')

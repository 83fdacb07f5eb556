"""Up-front checks of a training config: one clear line naming the key.

`check_train_config` runs before any data, model or checkpoint work, so a
bad value stops the run in seconds instead of after the first step (a zero
log or checkpoint interval used to divide by zero after step 1; a zero
num_steps silently meant the full epoch schedule).
"""

from typing import Optional

import ml_collections

# AEModel: 5 stride-2 stages (MobileNetV2), then 3 x2 deconvolutions; the
# targets are made at input / HEATMAP_STRIDE (ae_jax.data.transforms).
BACKBONE_STRIDE, HEATMAP_STRIDE = 32, 4


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def _positive_int(config: ml_collections.ConfigDict, key: str) -> int:
  """config[key] (dotted) as an int >= 1, else ConfigError naming it."""
  value = config
  for part in key.split('.'):
    value = value[part]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f'config.{key} = {value!r}: must be an integer >= 1')
  return value


def total_steps(train: ml_collections.ConfigDict, epoch_steps: int) -> int:
  """The number of train steps: train.num_steps, else num_epochs epochs."""
  if train.num_steps is None:
    return train.num_epochs * epoch_steps
  return train.num_steps


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
  for key in ('train.global_batch_size', 'train.log_every_steps',
              'train.checkpoint_every_steps', 'train.keep_checkpoints'):
    _positive_int(config, key)
  _check_sizes(config.data)
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
  input / 4: they agree only for multiples of 32 (100 px: 32 vs 25).
  """
  def wh(key):
    size = data[key]
    if isinstance(size, int) and not isinstance(size, bool):
      return size, size
    if (isinstance(size, (tuple, list)) and len(size) == 2 and
        all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
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

"""Up-front checks of a training config: one clear line naming the key.

`check_train_config` runs before any data, model or checkpoint work, so a
bad value stops the run in seconds instead of after the first step (a zero
log or checkpoint interval used to divide by zero after step 1; a zero
num_steps silently meant the full epoch schedule).
"""

from typing import Optional

import ml_collections


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
  batch = t.global_batch_size
  for count, what in ((num_devices, 'devices'), (num_processes, 'processes')):
    if count and batch % count:
      raise ConfigError(
          f'config.train.global_batch_size = {batch} is not a multiple of '
          f'the {count} {what} (choose e.g. {count * max(1, batch // count)}'
          f' or {count * (batch // count + 1)})')

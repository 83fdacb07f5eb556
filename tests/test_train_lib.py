"""The train loop: NaN check, metric writer, summary.json, mini COCO run.

Resume, SIGTERM and the NaN stop of the loop: test_checkpoints.py.
"""

import json

import numpy as np
import pytest

from ae_jax import train_lib
from tests.conftest import small_config
from tests.conftest import use_synthetic

pytestmark = pytest.mark.usefixtures('compile_cache')

LR, RATIO = 3e-3, 0.001  # small_config: warmup 2 steps


def read_scalars(logdir):
  """{tag: {step: value}} from the TensorBoard event files in `logdir`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in tf.io.gfile.glob(f'{logdir}/events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        scalar = float(tf.make_ndarray(value.tensor))
        out.setdefault(value.tag, {})[event.step] = scalar
  return out


def test_check_finite_names_metric_and_step():
  ok = {'total_loss': 1.0, 'push_loss': 0.1, 'lr': 1e-3}
  train_lib.check_finite([ok, ok], 5)
  bad = {'total_loss': np.nan, 'push_loss': np.nan, 'lr': np.inf}
  with pytest.raises(train_lib.NonFiniteLossError,
                     match=r'total_loss = nan at step 6 \(window checked: '
                     r'steps 5..7\)'):
    train_lib.check_finite([ok, bad, ok], 5)
  with pytest.raises(train_lib.NonFiniteLossError, match='lr = inf at step 3'):
    train_lib.check_finite([dict(ok, lr=np.inf)], 3)


def test_metric_writer_process_zero_only(tmp_path):
  writer = train_lib.make_metric_writer(tmp_path / 'off', enabled=False)
  writer.write_scalars(1, {'total_loss': 1.0})
  writer.close()
  assert not (tmp_path / 'off').exists()
  writer = train_lib.make_metric_writer(tmp_path / 'on')
  writer.write_scalars(3, {'total_loss': 0.25, 'lr': 1e-3})
  writer.close()
  assert read_scalars(tmp_path / 'on') == {
      'total_loss': {3: 0.25}, 'lr': {3: pytest.approx(1e-3)}}


def test_loop_writes_tensorboard_and_summary_history(tmp_path, monkeypatch):
  use_synthetic(monkeypatch)
  config = small_config(num_steps=4, ckpt_every=100, log_every=2)
  returned = train_lib.train_and_evaluate(config, tmp_path)
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary == returned  # host values only, as written
  assert (summary['start_step'], summary['final_step'],
          summary['preempted'], summary['last_checkpoint']) == (0, 4, False, 4)
  history = summary['history']
  assert [h['step'] for h in history] == [2, 4]
  # lr means of steps (0, 1) and (2, 3), from mmcv's warmup formula.
  assert [h['lr'] for h in history] == pytest.approx(
      [LR * (RATIO + (1 + RATIO) / 2) / 2, LR], rel=1e-6)
  for h in history:
    assert h['total_loss'] == pytest.approx(
        h['heatmap_loss'] + h['push_loss'] + h['pull_loss'], rel=1e-6)
  scalars = read_scalars(tmp_path / 'tensorboard')
  for tag in ('total_loss', 'heatmap_loss', 'push_loss', 'pull_loss', 'lr',
              'grad_norm', 'param_norm', 'images_per_sec'):
    assert scalars[tag] == {
        h['step']: pytest.approx(h[tag], rel=1e-6) for h in history}, tag


def test_mini_coco_loss_decreases(coco_mini_root, tmp_path):
  config = small_config(num_steps=6)
  config.data.coco_root = str(coco_mini_root)
  summary = train_lib.train_and_evaluate(config, str(tmp_path))
  losses = [h['total_loss'] for h in summary['history']]
  assert [h['step'] for h in summary['history']] == [1, 2, 3, 4, 5, 6]
  assert losses[-1] < losses[0]
  assert summary['first_loss'] == losses[0]  # one step per log window
  assert summary['last_loss'] == losses[-1]

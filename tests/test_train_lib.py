"""The train loop: NaN check, metric writer, summary.json, mini COCO run,
config checks, the workdir lock and unusable workdirs.

Resume, SIGTERM and the NaN stop of the loop: test_checkpoints.py.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from ae_jax import config_checks
from ae_jax.models.ae_model import AEModel
from ae_jax.train import loop
from ae_jax.train import metric_writer
from ae_jax.train import program as train_program
from ae_jax.train import variables_checkpoint
from ae_jax.train import workdir_lock
from tests.conftest import mounted_tmpfs
from tests.conftest import REPO_ROOT
from tests.conftest import random_variables
from tests.conftest import small_config
from tests.conftest import use_synthetic

pytestmark = pytest.mark.usefixtures('compile_cache')

LR, RATIO = 3e-3, 0.001  # small_config: warmup 2 steps


def read_scalars(logdir):
  """{tag: {step: value}} from the TensorBoard event files in `logdir`, read
  by TensorFlow's own event reader."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in tf.io.gfile.glob(f'{logdir}/events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def test_check_finite_names_metric_and_step():
  ok = {'total_loss': 1.0, 'push_loss': 0.1, 'lr': 1e-3}
  loop.check_finite([ok, ok], 5)
  bad = {'total_loss': np.nan, 'push_loss': np.nan, 'lr': np.inf}
  with pytest.raises(loop.NonFiniteLossError,
                     match=r'total_loss = nan at step 6 \(window checked: '
                     r'steps 5..7\)'):
    loop.check_finite([ok, bad, ok], 5)
  with pytest.raises(loop.NonFiniteLossError, match='lr = inf at step 3'):
    loop.check_finite([dict(ok, lr=np.inf)], 3)


def test_nan_before_any_checkpoint_says_so_and_hints(tmp_path, monkeypatch):
  """A NaN at step 1 said 'last good checkpoint: step None'."""
  use_synthetic(monkeypatch, nan_steps=(0,))
  with pytest.raises(loop.NonFiniteLossError) as info:
    loop.train_and_evaluate(small_config(2, 100), tmp_path / 'w')
  message = str(info.value)
  assert message.startswith('non-finite total_loss = nan at step 1 ')
  assert message.endswith(
      'Training stopped; no checkpoint exists yet (a rerun starts over). '
      'Likely causes: a learning rate too high for the batch '
      '(config.optim.lr = 0.003) or a target sigma too small for the '
      'heatmap (config.data.sigma = 2)')
  assert not os.listdir(tmp_path / 'w' / 'checkpoints')


def test_stop_flag_ctrl_c_once_saves_twice_stops(monkeypatch):
  """First Ctrl-C: stop after this step (saved); the second: at once. A
  SIGINT the launcher ignores (`cmd &` in a script) stays ignored."""
  with loop._StopFlag() as stop:  # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # the handler runs between bytecodes
    assert (stop.requested, stop.signal) == (True, 'SIGINT')
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  monkeypatch.setattr(signal, 'getsignal', lambda s: signal.SIG_IGN if (
      s == signal.SIGINT) else signal.SIG_DFL)
  installed = []
  monkeypatch.setattr(signal, 'signal', lambda s, h: installed.append(s))
  with loop._StopFlag():  # pylint: disable=protected-access
    assert installed == [signal.SIGTERM]


def test_metric_writer_process_zero_only(tmp_path):
  writer = metric_writer.make_metric_writer(tmp_path / 'off', enabled=False)
  writer.write_scalars(1, {'total_loss': 1.0})
  writer.close()
  assert not (tmp_path / 'off').exists()
  writer = metric_writer.make_metric_writer(tmp_path / 'on')
  writer.write_scalars(3, {'total_loss': 0.25, 'lr': 1e-3})
  writer.write_scalars(5, {'total_loss': 0.125})
  writer.close()
  writer.close()  # a second close (the loop's exit stack) is harmless
  assert read_scalars(tmp_path / 'on') == {
      'total_loss': {3: 0.25, 5: 0.125}, 'lr': {3: pytest.approx(1e-3)}}


def test_trainer_imports_neither_tensorflow_nor_torch(tmp_path):
  """What train.py imports to train (json or TFDS ArrayRecord input) and
  the TensorBoard writer bring in no TensorFlow (~3 s, ~450 MB resident
  per process) and no torch."""
  code = (
      'import sys, train\n'
      'from ae_jax.train import loop, checkpoints, metric_writer\n'
      'from ae_jax.data import coco, example_loader, workers, tfds_coco\n'
      'from ae_jax.models import ae_model\n'
      f'w = metric_writer.make_metric_writer({str(tmp_path)!r})\n'
      "w.write_scalars(1, {'lr': 1.0}); w.close()\n"
      "print(sorted({m.split('.')[0] for m in sys.modules} & "
      "{'tensorflow', 'torch'}))\n")
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.strip().splitlines()[-1] == '[]', out.stdout[-2000:]
  assert read_scalars(tmp_path) == {'lr': {1: 1.0}}


def test_loop_writes_tensorboard_and_summary_history(tmp_path, monkeypatch):
  use_synthetic(monkeypatch)
  memory_lines = []

  def spy(compiled, device):
    memory_lines.append(log_step_memory(compiled, device))
    return memory_lines[-1]

  log_step_memory = train_program.log_step_memory
  monkeypatch.setattr(train_program, 'log_step_memory', spy)
  config = small_config(num_steps=4, ckpt_every=100, log_every=2)
  returned = loop.train_and_evaluate(config, tmp_path)
  # The compiled step's memory, asked for once (before step 1); silent on
  # the CPU backend.
  assert memory_lines == ['']
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
  summary = loop.train_and_evaluate(config, str(tmp_path))
  losses = [h['total_loss'] for h in summary['history']]
  assert [h['step'] for h in summary['history']] == [1, 2, 3, 4, 5, 6]
  assert losses[-1] < losses[0]
  assert summary['first_loss'] == losses[0]  # one step per log window
  assert summary['last_loss'] == losses[-1]


@pytest.mark.parametrize('key,value,match', [
    ('train.num_steps', 0, r'config.train.num_steps = 0: must be an integer'
     r' >= 1 \(or unset'),
    ('train.num_steps', -3, r'config.train.num_steps = -3'),
    ('train.log_every_steps', 0, r'config.train.log_every_steps = 0'),
    ('train.checkpoint_every_steps', 0,
     r'config.train.checkpoint_every_steps = 0'),
    ('train.keep_checkpoints', 0, r'config.train.keep_checkpoints = 0'),
    ('train.global_batch_size', 12, r'global_batch_size = 12 is not a '
     r'multiple of the 8 devices \(choose e.g. 8 or 16\)'),
    ('train.global_batch_size', 0, r'global_batch_size = 0: must be'),
    ('train.global_batch_size', 6, r'global_batch_size = 6 is not a '
     r'multiple of the 8 devices \(choose e.g. 8\)$'),
    # The model predicts ceil(100 / 32) * 8 = 32 px, the targets are 25.
    ('data.input_size', 100, r'config.data.input_size = 100: must be a '
     r'positive multiple of 32 \(the backbone stride\), e.g. 96'),
    ('data.heatmap_size', 17, r'config.data.heatmap_size = 17: must be '
     r'config.data.input_size / 4 = 16 \(the size'),
])
def test_bad_train_config_names_the_key(key, value, match):
  config = small_config()
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(config_checks.ConfigError, match=match):
    config_checks.check_train_config(config, num_devices=8)


def test_num_steps_unset_means_epochs_and_process_count_checked():
  config = small_config()
  config.train.num_steps = None
  config_checks.check_train_config(config, num_devices=8)
  config.train.num_epochs = 3
  assert config_checks.total_steps(config.train, epoch_steps=5) == 15
  config.train.num_epochs = 0
  with pytest.raises(config_checks.ConfigError, match='num_epochs = 0'):
    config_checks.check_train_config(config)
  config = small_config()
  config.train.global_batch_size = 9
  with pytest.raises(config_checks.ConfigError, match='of the 2 processes'):
    config_checks.check_train_config(config, num_processes=2)


def test_train_and_evaluate_checks_before_any_work(tmp_path):
  config = small_config()
  config.train.checkpoint_every_steps = 0  # was ZeroDivisionError at step 1
  with pytest.raises(config_checks.ConfigError,
                     match='checkpoint_every_steps = 0'):
    loop.train_and_evaluate(config, tmp_path / 'w')
  assert not (tmp_path / 'w').exists()


def test_unusable_workdirs_are_refused_before_any_work(tmp_path):
  """A workdir that is a file, lies under a file, holds converted weights
  (a variables checkpoint: an init_checkpoint, not a workdir) or is on a
  read-only disk: one WorkdirError naming it and why; nothing is written."""
  (tmp_path / 'a_file').write_text('keep me')
  converted = tmp_path / 'converted'
  variables_checkpoint.save_variables(converted, random_variables(
      AEModel(**small_config().model)))
  before = sorted(os.listdir(converted))
  cases = [(tmp_path / 'a_file', r'a_file is a file, not a folder'),
           (tmp_path / 'a_file' / 'w',
            r'cannot write --workdir .*a_file/w: Not a directory'),
           (converted, r'converted holds a variables checkpoint \(converted '
            r'weights\): .*--config.train.init_checkpoint')]
  read_only = tmp_path / 'read_only'
  read_only.mkdir()
  with mounted_tmpfs(read_only, 'ro,size=1m') as mounted:
    if mounted:
      cases.append((read_only / 'w', 'cannot write --workdir .*read_only/w: '
                    'Read-only file system'))
    for workdir, match in cases:
      with pytest.raises(workdir_lock.WorkdirError, match=match):
        loop.train_and_evaluate(small_config(), workdir)
  assert (tmp_path / 'a_file').read_text() == 'keep me'
  assert sorted(os.listdir(converted)) == before


def _dead_pid() -> int:
  proc = subprocess.Popen(['true'])
  proc.wait()
  return proc.pid


def test_workdir_lock_refuses_second_trainer_and_takes_over_stale(
    tmp_path, caplog):
  with workdir_lock.WorkdirLock(tmp_path) as lock:
    holder = json.loads(lock.path.read_text())
    assert holder['pid'] == os.getpid()
    assert holder['host'] == socket.gethostname()
    # Another trainer of this process (as a second train.py would be).
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf'in use by another trainer \(pid '
                       rf'{os.getpid()} on host'):
      with workdir_lock.WorkdirLock(tmp_path):
        pass
  assert not (tmp_path / 'train.lock').exists()  # released
  # kill -9 leaves the file: a dead pid on this host is taken over.
  stale = {'pid': _dead_pid(), 'host': socket.gethostname(), 'time': 't'}
  (tmp_path / 'train.lock').write_text(json.dumps(stale))
  caplog.set_level('WARNING')
  with workdir_lock.WorkdirLock(tmp_path):
    assert json.loads((tmp_path / 'train.lock').read_text())['pid'] == (
        os.getpid())
  assert any('Taking over the stale lock' in r.getMessage()
             for r in caplog.records)
  # Another host's lock cannot be checked from here: refused.
  (tmp_path / 'train.lock').write_text(json.dumps(
      {'pid': 1, 'host': 'elsewhere', 'time': 't'}))
  with pytest.raises(workdir_lock.WorkdirLockedError,
                     match='pid 1 on host elsewhere.*delete .*train.lock'):
    with workdir_lock.WorkdirLock(tmp_path):
      pass
  assert json.loads((tmp_path / 'train.lock').read_text())['host'] == (
      'elsewhere')


class _FakeUrlPath:
  """A gs://-style path over a dict (epath's URL backends need a network)."""

  def __init__(self, files, url):
    self.files, self.url = files, url.rstrip('/')

  def __truediv__(self, name):
    return _FakeUrlPath(self.files, f'{self.url}/{name}')

  def __str__(self):
    return self.url

  @property
  def parent(self):
    return _FakeUrlPath(self.files, self.url.rsplit('/', 1)[0])

  def mkdir(self, parents=False, exist_ok=False):
    del parents, exist_ok

  def exists(self):
    return self.url in self.files

  def read_text(self):
    if self.url not in self.files:
      raise FileNotFoundError(self.url)
    return self.files[self.url]

  def write_text(self, text):
    self.files[self.url] = text

  def unlink(self, missing_ok=False):
    del missing_ok
    self.files.pop(self.url, None)


def test_workdir_lock_on_url_workdir(monkeypatch):
  """URL workdirs get the same lock file through epath (no os.open)."""
  files = {}
  monkeypatch.setattr(workdir_lock, 'epath', types.SimpleNamespace(
      Path=lambda p: p if isinstance(p, _FakeUrlPath) else _FakeUrlPath(
          files, str(p))))
  with workdir_lock.WorkdirLock('gs://bucket/ae'):
    assert json.loads(files['gs://bucket/ae/train.lock'])['pid'] == (
        os.getpid())
    with pytest.raises(workdir_lock.WorkdirLockedError, match='gs://'):
      with workdir_lock.WorkdirLock('gs://bucket/ae'):
        pass
  assert not files

"""train.py end to end on the mini COCO (subprocess), and flag errors."""

import glob
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

pytestmark = pytest.mark.usefixtures('compile_cache')

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# tests.conftest.small_config as flags: the same step program, so the
# session's persistent compile cache serves it.
SMALL = ['--config', 'configs/tiny.py',
         '--config.model.num_deconv_filters=(16,16,16)',
         '--config.data.input_size=64', '--config.data.heatmap_size=16',
         '--config.data.augment=False', '--config.train.eval_at_end=False',
         '--config.optim.lr=0.003', '--config.optim.warmup_steps=2',
         '--config.train.log_every_steps=1',
         '--config.train.checkpoint_every_steps=100']


def run_train(args, workdir):
  env = dict(os.environ)
  env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
  return subprocess.run(
      [sys.executable, 'train.py', '--workdir', str(workdir)] + args,
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_train_then_resume_on_mini_coco(tmp_path):
  first = run_train(SMALL + ['--config.train.num_steps=2'], tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'step 2/2' in first.stderr and 'img/s' in first.stderr
  assert '8 global devices' in first.stderr  # conftest's fake devices
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['final_step'] == 2 and summary['last_loss'] > 0
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  assert glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*'))

  second = run_train(SMALL + ['--config.train.num_steps=3'], tmp_path)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resumed' in second.stderr and 'step 3/3' in second.stderr
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['start_step'] == 2 and summary['final_step'] == 3


def test_config_typo_and_missing_workdir_fail(tmp_path):
  typo = run_train(['--config', 'configs/tiny.py', '--config.optim.lrr=1'],
                   tmp_path)
  assert typo.returncode != 0 and 'lrr' in typo.stderr
  missing = subprocess.run(
      [sys.executable, 'train.py', '--config', 'configs/tiny.py'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert missing.returncode != 0 and 'workdir' in missing.stderr

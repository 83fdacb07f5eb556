"""train.py end to end on the mini COCO (subprocess): resume, preemption
exit code, skipped-image totals, a truncated newest checkpoint (train.py
and eval.py); one-line user errors."""

import glob
import json
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import sys

import jax
import pytest

from tests.conftest import foreign_info_lines
from tests.conftest import mounted_tmpfs
from tests.conftest import run_signalled

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


def _env():
  env = dict(os.environ)
  env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
  return env


def run_train(args, workdir):
  return subprocess.run(
      [sys.executable, 'train.py', '--workdir', str(workdir)] + args,
      cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith('error:')]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """train.py for 2 steps (saved at 1 and 2) on the mini COCO with one
  unreadable image: (workdir, args, the CompletedProcess). Tests that go
  on from it work on copies."""
  root = tmp_path_factory.mktemp('trained')
  coco = root / 'coco'
  shutil.copytree(REPO_ROOT / 'data' / 'coco_mini', coco)
  (coco / 'val2017' / '000000040083.jpg').write_bytes(b'')  # unreadable
  args = SMALL + [f'--config.data.coco_root={coco}']
  first = run_train(args + ['--config.train.num_steps=2',
                            '--config.train.checkpoint_every_steps=1'],
                    root / 'w')
  return root / 'w', args, first


def test_train_preempt_resume_on_mini_coco(trained, tmp_path):
  """2 steps; then a SIGTERM'd resume (exit 143, saved); skipped totals."""
  trained_dir, args, first = trained
  assert first.returncode == 0, first.stderr[-3000:]
  workdir = tmp_path / 'w'
  shutil.copytree(trained_dir, workdir)
  assert 'step 2/2' in first.stderr and 'img/s' in first.stderr
  assert '8 global devices' in first.stderr  # conftest's fake devices
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['final_step'] == 2 and summary['last_loss'] > 0
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']
  assert glob.glob(str(workdir / 'tensorboard' / 'events.out.tfevents.*'))
  corrupt = summary['skipped_images']['corrupt_image']
  assert corrupt >= 1 and f'Skipped images: {corrupt}' in first.stderr
  assert not (workdir / 'train.lock').exists()
  # The console: the resolved keypoints once, then what the silent first
  # step is doing; no library INFO lines (orbax logged dozens per save).
  lines = first.stderr.splitlines()
  [spec] = [l for l in lines if 'Keypoints (coco): 17 joints nose, ' in l]
  assert 'flip pairs left_eye/right_eye, left_ear/right_ear' in spec
  assert 'OKS sigmas 0.026, 0.025, 0.025, 0.035' in spec
  order = [i for i, l in enumerate(lines)
           for key in ('Training 0 -> 2', 'Compiling the train step',
                       'step 1/2') if key in l]
  assert order == sorted(order) and len(order) == 3, first.stderr[-3000:]
  assert not foreign_info_lines(first.stderr), first.stderr[-3000:]
  # Written with the user's umask (the test process's; 0644 under 022).
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(workdir / 'summary.json').st_mode) == (
      0o666 & ~umask)

  # SIGTERM once the loop's handler is up (it logs 'Training 2 -> 4'):
  # step 3 runs, is saved, and train.py exits 143 for the scheduler.
  returncode, stderr = run_signalled(
      ['train.py', '--workdir', str(workdir)] + args +
      ['--config.train.num_steps=4'], 'Training 2 -> 4 steps',
      signal.SIGTERM, _env())
  assert returncode == 143, stderr[-3000:]
  assert 'Resumed' in stderr and 'Preempted at step 3 (saved)' in stderr
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['start_step'] == 2 and summary['final_step'] == 3
  assert summary['preempted']
  assert '3' in os.listdir(workdir / 'checkpoints')


def test_ctrl_c_saves_the_current_step_and_exits_130(trained, tmp_path):
  """Ctrl-C during the first compile (after 'Compiling the train step'):
  the step runs, is saved, one line, exit 130 (was a 40-line traceback,
  orbax's 'Save Finalize thread failed' and the step lost)."""
  trained_dir, args, _ = trained
  workdir = tmp_path / 'w'
  shutil.copytree(trained_dir, workdir)
  returncode, stderr = run_signalled(
      ['train.py', '--workdir', str(workdir)] + args +
      ['--config.train.num_steps=5'], 'Compiling the train step',
      signal.SIGINT, _env())
  assert returncode == 130, stderr[-3000:]
  assert 'Traceback' not in stderr and 'error' not in stderr.lower()
  assert stderr.strip().splitlines()[-1].endswith(
      'Interrupted (Ctrl-C) at step 3 (saved): exit code 130; rerun the '
      'same command to resume.')
  summary = json.loads((workdir / 'summary.json').read_text())
  assert (summary['final_step'], summary['stop_signal']) == (3, 'SIGINT')
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2', '3']
  assert not (workdir / 'train.lock').exists()


def _truncate_biggest_file(folder):
  files = [p for p in folder.rglob('*') if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  data = biggest.read_bytes()
  biggest.write_bytes(data[:len(data) // 2])


def _orbax_noise(text):
  return [t for t in ('Traceback', 'Task exception', 'Event loop is closed',
                      'never retrieved', 'destroyed but it is pending')
          if t in text]


def test_truncated_newest_checkpoint_is_one_warning(trained, tmp_path):
  """Step 2's largest data file cut in half: train.py resumes from step 1
  and eval.py evaluates step 1, each with one warning naming step 2 and
  the cause, and nothing else from orbax or asyncio."""
  trained_dir, args, _ = trained
  workdir = tmp_path / 'w'
  shutil.copytree(trained_dir, workdir)
  _truncate_biggest_file(workdir / 'checkpoints' / '2' / 'state')
  result = subprocess.run(
      [sys.executable, 'eval.py', '--config', 'configs/tiny.py',
       '--config.model.num_deconv_filters=(16,16,16)', '--ckpt',
       str(workdir), '--max_images=1', '--config.test.input_size=64',
       '--config.test.flip=False'] + args[-1:],
      cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  text = result.stderr + result.stdout
  assert result.returncode == 0, text[-3000:]
  assert not _orbax_noise(text), text[-3000:]
  [line] = [l for l in text.splitlines() if 'incomplete checkpoint' in l]
  assert 'Skipping incomplete checkpoint step 2: ' in line
  assert 'OUT_OF_RANGE' in line and line.endswith('(using step 1).')
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']
  result = run_train(args + ['--config.train.num_steps=2'], workdir)
  text = result.stderr + result.stdout
  assert result.returncode == 0, text[-3000:]
  assert not _orbax_noise(text), text[-3000:]
  [line] = [l for l in text.splitlines() if 'incomplete checkpoint' in l]
  assert 'Skipping incomplete checkpoint step 2: ' in line
  assert 'OUT_OF_RANGE' in line
  assert 'resuming from step 1' in line
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['start_step'] == 1 and summary['final_step'] == 2
  assert {'2', '2.incomplete'} <= set(os.listdir(workdir / 'checkpoints'))


def test_full_disk_is_one_error_line_and_leaves_no_partial_step(tmp_path):
  """A 3 MB disk fills up at the first save: one `error:` line naming the
  checkpoint folder and the cause, exit 1, no traceback (orbax's save
  threads log each failure), no half-written step left behind."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  with mounted_tmpfs(disk, 'size=3m') as mounted:
    if not mounted:
      pytest.skip('mounting a 3 MB tmpfs needs root')
    result = run_train(SMALL + [
        f'--config.data.coco_root={REPO_ROOT / "data" / "coco_mini"}',
        '--config.train.num_steps=2',
        '--config.train.checkpoint_every_steps=1'], disk / 'w')
    left = sorted(os.listdir(disk / 'w' / 'checkpoints'))
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert not _orbax_noise(result.stderr), result.stderr[-3000:]
  [line] = _error_lines(result.stderr)
  assert line.startswith(
      f'error: cannot write a checkpoint to {disk / "w" / "checkpoints"}: ')
  assert line.endswith("No space left on device [os_error_code='28']")
  assert left == []  # the temporary folder of step 1 was removed


def test_user_errors_are_one_line(tmp_path):
  typo = run_train(['--config', 'configs/tiny.py', '--config.optim.lrr=1'],
                   tmp_path)
  assert typo.returncode == 1 and 'Traceback' not in typo.stderr
  assert _error_lines(typo.stderr) == [
      'error: --config.optim.lrr: no such config key or bad value (\'lrr\' '
      'Did you mean "lr" instead of "lrr"?)'], typo.stderr
  for script in ('eval.py', 'demo.py', 'export.py'):  # the same parser
    other = subprocess.run(
        [sys.executable, script, '--config', 'configs/tiny.py', '--ckpt',
         str(tmp_path), '--out', str(tmp_path / 'o'),
         '--config.test.flip_tset=1'], cwd=REPO_ROOT, env=_env(),
        capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and 'Traceback' not in other.stderr
    [line] = _error_lines(other.stderr)
    assert line.startswith('error: --config.test.flip_tset: no such config '
                           'key'), (script, line)
  zero = run_train(SMALL + ['--config.train.num_steps=0'], tmp_path / 'z')
  assert zero.returncode == 1 and 'Traceback' not in zero.stderr
  assert _error_lines(zero.stderr) == [
      'error: config.train.num_steps = 0: must be an integer >= 1 (or '
      'unset, None, to train config.train.num_epochs epochs)'], zero.stderr
  # A live trainer (this test process) holds the workdir.
  (tmp_path / 'train.lock').write_text(json.dumps(
      {'pid': os.getpid(), 'host': socket.gethostname(), 'time': 'now'}))
  locked = run_train(SMALL, tmp_path)
  assert locked.returncode == 1 and 'Traceback' not in locked.stderr
  [line] = _error_lines(locked.stderr)
  assert f'in use by another trainer (pid {os.getpid()} on host' in line
  assert not (tmp_path / 'checkpoints').exists()
  missing = subprocess.run(
      [sys.executable, 'train.py', '--config', 'configs/tiny.py'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert missing.returncode != 0 and 'workdir' in missing.stderr

"""Input worker processes: a dead worker is one error naming its cause and
file, never a hang; SIGTERM, Ctrl-C and kill -9 of the trainer leave no
worker behind.

Library level (a source whose decoder kills its worker on one image) and
train.py end to end: every process a launch starts carries an environment
tag, so the processes left after the trainer ended are found in /proc.
A decoder crash in train.py's workers is injected by a `sitecustomize`
module on PYTHONPATH (Python imports it in every process it starts) that
makes cv2.imdecode kill the calling input worker on the chosen file.
"""

import itertools
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import jax
import pytest

from ae_jax.data import coco
from ae_jax.data import example_loader
from ae_jax.data import pipeline
from ae_jax.data import workers
from tests.test_train_cli import SMALL

pytestmark = pytest.mark.usefixtures('compile_cache')

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CRASH_FILE = '000000196141.jpg'
DEATHS = {  # how the worker dies -> what the error says
    'segv': 'killed by SIGSEGV: a crash in native code',
    'oom': 'killed by SIGKILL: out of memory?',
    'exit': 'exit code 3',
}


def _crashing_dataset(root, how, num_workers):
  """A 2-worker train input whose decoder kills its worker on CRASH_FILE.

  The source class is defined here, in a function, so that cloudpickle
  sends it to the workers by value.
  """

  class CrashingSource(coco.ExampleSource):

    def image(self, i):
      if (self.examples[i].file_name == CRASH_FILE and
          multiprocessing.parent_process() is not None):  # workers only
        if how == 'exit':
          os._exit(3)  # pylint: disable=protected-access
        os.kill(os.getpid(), {'segv': signal.SIGSEGV,
                              'oom': signal.SIGKILL}[how])
      return super().image(i)

  index = coco.load_coco_index(str(root), 'val2017')
  load = example_loader.make_loader(
      CrashingSource(index.examples, index.image_dir), input_wh=(64, 64),
      heatmap_wh=(16, 16), scale_type='short', trans_factor=0.0,
      max_people=30)
  batches = pipeline.HostBatches(
      load, seed=0, global_batch_size=2, process_index=0, local_batch=2,
      augmentation=dict(rot_factor=0.0, scale_factor=(1.0, 1.0),
                        flip_prob=0.0, augment=False))
  return pipeline.TrainDataset(batches, 0, len(index), {}, num_workers, 1)


@pytest.mark.parametrize('how', sorted(DEATHS))
def test_dead_worker_is_one_error_naming_cause_and_file(coco_mini_root,
                                                        how):
  it = iter(_crashing_dataset(coco_mini_root, how, 2))
  t0 = time.time()
  with pytest.raises(workers.InputWorkerError) as info:
    list(itertools.islice(it, 8))  # 2 epochs: the file is in one of them
  message = str(info.value)
  assert '\n' not in message
  assert DEATHS[how] in message and f'while loading {CRASH_FILE}' in message
  assert 'for batch ' in message and 'rerun to resume' in message
  assert time.time() - t0 < 120  # detected, not a hang
  assert not multiprocessing.active_children()  # every worker stopped


# ------------------------------------------------------------ train.py


def _tagged(tag):
  """Pids of live (not zombie) processes whose environment holds `tag`."""
  found = []
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/environ', 'rb') as f:
        if tag.encode() not in f.read():
          continue
      with open(f'/proc/{entry}/stat') as f:
        if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
          continue
    except OSError:
      continue
    found.append(int(entry))
  return found


def _wait_gone(tag, seconds=30):
  deadline = time.time() + seconds
  while _tagged(tag) and time.time() < deadline:
    time.sleep(0.5)
  return _tagged(tag)


def _env(tag, extra_path=None):
  env = dict(os.environ, AE_JAX_TEST_TAG=tag)
  env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
  if extra_path:
    env['PYTHONPATH'] = os.pathsep.join(
        [str(extra_path)] + [p for p in [env.get('PYTHONPATH')] if p])
  return env


def _start(workdir, tag, args=(), extra_path=None):
  return subprocess.Popen(
      [sys.executable, 'train.py', '--workdir', str(workdir)] + SMALL +
      ['--config.train.num_steps=1000', '--config.data.workers=2'] +
      list(args), cwd=REPO_ROOT, env=_env(tag, extra_path),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
      start_new_session=True)


def _workers_running(proc, tag, timeout=300):
  """Reads the log until the input workers run; returns the lines."""
  lines, deadline = [], time.time() + timeout
  for line in proc.stderr:
    lines.append(line)
    if 'Training 0 -> ' in line:
      break
  while len(_tagged(tag)) < 4 and time.time() < deadline:  # + 2 workers
    time.sleep(0.2)                                       # + tracker
  assert len(_tagged(tag)) >= 4, ''.join(lines)[-3000:]
  return lines


@pytest.mark.parametrize('stop', ['sigterm', 'ctrl_c', 'kill9'])
def test_trainer_stopped_leaves_no_worker(tmp_path, stop):
  """SIGTERM: saves, exits 143; Ctrl-C (SIGINT to the process group, as a
  terminal sends it): saves, exits 130; kill -9: gone. In every case no process of
  the launch is left after it, and none hangs."""
  tag = uuid.uuid4().hex
  proc = _start(tmp_path / 'w', tag)
  try:
    lines = _workers_running(proc, tag)
    if stop == 'sigterm':
      proc.send_signal(signal.SIGTERM)
    elif stop == 'ctrl_c':
      os.killpg(proc.pid, signal.SIGINT)
    else:
      proc.kill()
    lines.extend(proc.stderr)
    code = proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  log = ''.join(lines)
  if stop == 'sigterm':
    assert code == 143 and 'Preempted at step 1 (saved)' in log, log[-3000:]
  elif stop == 'ctrl_c':
    # The trainer saves the step it is on and exits 130; the workers, which
    # got the SIGINT too (some while still starting), ignore it.
    assert code == 130 and 'Interrupted (Ctrl-C) at step' in log, log[-3000:]
  else:
    assert code == -signal.SIGKILL
  assert not _wait_gone(tag), f'left behind after {stop}: {_tagged(tag)}'


SITECUSTOMIZE = '''
import multiprocessing, os, signal
import cv2
_imdecode = cv2.imdecode
def _crash_on_one_file(buf, *args, **kwargs):
  if (multiprocessing.parent_process() is not None and
      len(buf) == {size}):  # the chosen file, in an input worker
    os.kill(os.getpid(), signal.SIGSEGV)
  return _imdecode(buf, *args, **kwargs)
cv2.imdecode = _crash_on_one_file
'''


def test_train_cli_decoder_crash_is_one_error_line(tmp_path, coco_mini_root):
  """A segfault in a worker's decoder: train.py ends with one `error:` line
  naming the signal and the file (exit 1), and leaves no process."""
  size = (coco_mini_root / 'val2017' / CRASH_FILE).stat().st_size
  site = tmp_path / 'site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(SITECUSTOMIZE.format(size=size))
  tag = uuid.uuid4().hex
  proc = _start(tmp_path / 'w', tag, extra_path=site)
  try:
    _, stderr = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 1, stderr[-3000:]
  errors = [l for l in stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1]
  assert 'killed by SIGSEGV' in errors[0] and CRASH_FILE in errors[0]
  assert 'Traceback' not in stderr, stderr[-3000:]
  assert not _wait_gone(tag), _tagged(tag)

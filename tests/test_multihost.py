"""train.py as 2 processes x 2 CPU devices == 1 process x 4 devices,
through a preemption (SIGTERM to one process) and a kill -9.

The README's multi-process launch (--coordinator_address, --num_processes,
--process_id; gloo CPU collectives) run for real on one machine: two
train.py processes on 127.0.0.1, 2 fake CPU devices each, against one
train.py process with 4 devices, on configs/tiny.py narrowed as
tests/test_train_cli.py (64 px) with augmentation on. Each process reads
its own half of every global batch (ae_jax.data.pipeline's per-host
split); with augmentation seeded by the global example position the two
halves differ, so equal losses need each process on its own half.

The 1-process run is launched with the same flags (--num_processes=1), so
its all-reduces go through gloo too and sum in the same order: the two
runs then agree to the last bit (measured: every logged metric and every
final parameter). A plain 1-process run's in-process all-reduce sums in
another order; the ulp-level difference at step 1 grows under Adam (a
parameter whose gradient is float noise moves by +-lr on its sign, see
tests/test_sharding.py) to ~1% of grad_norm by step 4 (measured: 0.205301
vs 0.207345), as between 1 process with 8 and with 4 devices.

2 devices per process, not 4 or 8: the same cross-process mesh, per-host
split and gloo collectives, with fewer gloo ranks in each of the step's
all-reduces (111 with global BatchNorm statistics).
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import jax

from ae_jax.train import checkpoints
from ae_jax import sharding
from tests.test_train_cli import SMALL

pytestmark = pytest.mark.usefixtures('compile_cache')

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 5
DEVICES = 2  # per process; the 1-process reference has 2 x DEVICES
ARGS = [a for a in SMALL if 'augment' not in a] + [
    '--config.data.augment=True', f'--config.train.num_steps={STEPS}',
    '--heartbeat_timeout_s=10']
TIMEOUT_S = 420  # per launch (~4 min on 2 busy cores); a hang fails, killed
PREEMPTED = 143  # loop.PREEMPTED_EXIT_CODE (not imported: no jax init)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(num_devices: int, cache: str) -> dict:
  """A CPU process with `num_devices` fake devices, compile cache `cache`.

  Multi-process runs get a cache of their own, empty at their first
  launch: the processes' cache keys differ from a 1-process run's, and one
  process loading a step the other compiles would leave the waiting one's
  gloo collectives to time out. Later launches: process 0 loads its step
  from the cache; process 1 compiles again, since jax writes entries only
  from process 0 and, on the CPU backend, a key includes the process's own
  topology fingerprint.
  """
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_COORDINATOR_ADDRESS', 'AE_JAX_DISTRIBUTED',
                      'JAX_COMPILATION_CACHE_DIR')}
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if 'xla_force_host_platform_device_count' not in f]
  env['XLA_FLAGS'] = ' '.join(
      flags + [f'--xla_force_host_platform_device_count={num_devices}'])
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_COMPILATION_CACHE_DIR'] = cache
  return env


def _launch(workdir: pathlib.Path, num_processes: int, num_devices: int,
            codes=None, signal_when=None, tag='run', args=()):
  """Runs train.py as `num_processes` processes; returns their logs.

  Every launch passes the multi-process flags (jax.distributed, gloo
  collectives), also with one process.

  Args:
    codes: the exit code (or a tuple of allowed ones) of each process
      (default 0s).
    signal_when: (text, signal, i): sends `signal` to process 1 only, once
      `text` is in the log of process i.

  Every process is killed when one fails unexpectedly or the time runs out.
  """
  port = _free_port()
  procs, logs = [], []
  for i in range(num_processes):
    extra = [f'--coordinator_address=127.0.0.1:{port}',
             f'--num_processes={num_processes}', f'--process_id={i}']
    log = open(workdir.parent / f'{workdir.name}.{tag}.{i}.log', 'w+')
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, 'train.py', '--workdir', str(workdir)] + ARGS +
        list(args) + extra, cwd=REPO_ROOT, env=_env(num_devices, str(
            jax.config.jax_compilation_cache_dir if num_processes == 1
            else workdir.parent / 'cache2')),
        stdout=log, stderr=subprocess.STDOUT))
  expected = [c if isinstance(c, tuple) else (c,)
              for c in codes or [0] * num_processes]
  deadline = time.time() + TIMEOUT_S
  t0, ended = time.time(), {}
  try:
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        if p.poll() is not None:
          ended.setdefault(i, time.time() - t0)
      if time.time() > deadline or any(
          p.poll() not in (None,) + expected[i]
          for i, p in enumerate(procs)):
        break
      if signal_when and signal_when[0] in pathlib.Path(
          logs[signal_when[2]].name).read_text():
        procs[1].send_signal(signal_when[1])
        signal_when = None
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  for i in range(num_processes):
    ended.setdefault(i, time.time() - t0)
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  got = [p.returncode for p in procs]
  assert all(c in e for c, e in zip(got, expected)), (
      f'exit codes {got} != {expected} (timeout {TIMEOUT_S}s);\n' +
      '\n'.join(f'--- process {i}:\n{t[-2500:]}' for i, t in enumerate(texts)))
  return texts, ended


_LOG_STEP = re.compile(r'step (\d+)/\d+  loss (\S+) \(hm (\S+) push (\S+) '
                       r'pull (\S+)\)')
_LOGGED = ('total_loss', 'heatmap_loss', 'push_loss', 'pull_loss')


def _assert_steps_match(history, reference, what):
  """Every metric of every logged step equals the reference run's.

  rtol 1e-5 (the issue asks 1e-4; the runs agree to the last bit);
  atol for pull_loss, ~3e-8 here.
  """
  for h in history:
    want = reference[h['step']]
    for name in sorted(set(h) - {'step', 'images_per_sec'}):
      np.testing.assert_allclose(
          h[name], want[name], rtol=1e-5, atol=1e-12,
          err_msg=f'{what}: {name} at step {h["step"]}')


def _assert_log_matches(log, reference, what):
  """The process-0 log lines ('step N/T  loss .4g (hm .4g push .3g pull
  .3g)') of a launch that ends before its summary: the reference's values
  printed the same way."""
  lines = _LOG_STEP.findall(log)
  assert lines, log[-2000:]
  for step, *values in lines:
    want = reference[int(step)]
    assert values == [f'{want[n]:{f}}' for n, f in zip(
        _LOGGED, ('.4g', '.4g', '.3g', '.3g'))], (what, step, values)
  return [int(s) for s, *_ in lines]


def test_two_processes_through_sigterm_and_kill_match_one_process(tmp_path):
  """2 processes x 2 devices == 1 process x 4 devices, through a SIGTERM
  and a kill -9 of process 1 (only) and the reruns that resume.

  SIGTERM: both processes stop after the same step, save it and exit 143.
  kill -9: process 0 stops within the heartbeat timeout (10 s here), not
  a hang: its gloo collective fails (connection reset), then jax's
  shutdown barrier aborts it (SIGABRT, a shell's 134). Every rerun of the
  same command resumes from the last checkpoint; every logged step of
  every launch and the final params match the uninterrupted 1-process
  run.
  """
  logs1, _ = _launch(tmp_path / 'one', num_processes=1,
                     num_devices=2 * DEVICES)
  assert (f'process 0 / 1, {2 * DEVICES} local / {2 * DEVICES} global '
          'devices') in logs1[0]
  one = json.loads((tmp_path / 'one' / 'summary.json').read_text())
  assert [h['step'] for h in one['history']] == list(range(1, STEPS + 1))
  reference = {h['step']: h for h in one['history']}

  two = tmp_path / 'two'
  logs, _ = _launch(two, 2, DEVICES, codes=[PREEMPTED] * 2, tag='term',
                    signal_when=('Training 0 -> ', signal.SIGTERM, 1))
  for i, log in enumerate(logs):
    assert (f'process {i} / 2, {DEVICES} local / {2 * DEVICES} global '
            'devices' in log), log[-2000:]
  stops = {int(re.search(r'Preempted at step (\d+) \(saved\)', log)[1])
           for log in logs}
  assert len(stops) == 1, stops  # the same step on both processes
  stop = stops.pop()
  assert 1 <= stop < STEPS - 1
  first = json.loads((two / 'summary.json').read_text())
  assert first['preempted'] and first['final_step'] == stop
  assert [h['step'] for h in first['history']] == list(range(1, stop + 1))
  _assert_steps_match(first['history'], reference, 'SIGTERMed run')
  assert not (two / 'train.lock').exists()

  # Resume, saving every step; kill -9 process 1 once step stop+1 is done.
  logs, ended = _launch(
      two, 2, DEVICES, codes=[(1, -signal.SIGABRT), -signal.SIGKILL],
      tag='kill', args=['--config.train.checkpoint_every_steps=1'],
      signal_when=(f'step {stop + 1}/', signal.SIGKILL, 0))
  assert f'Resumed from {two / "checkpoints"} at step {stop}' in logs[0]
  assert 'another task died' in logs[0] or 'error:' in logs[0], (
      logs[0][-2000:])
  assert ended[0] - ended[1] < 60, ended  # bounded: heartbeat + margin
  logged = _assert_log_matches(logs[0], reference, 'killed run')
  assert logged[0] == stop + 1, logged
  saved = max(int(d) for d in os.listdir(two / 'checkpoints') if d.isdigit())
  assert saved >= stop  # stop+1 too, unless the kill beat its save

  logs, _ = _launch(two, 2, DEVICES, tag='rerun')
  assert f'Resumed from {two / "checkpoints"} at step {saved}' in logs[0]
  assert not (two / 'train.lock').exists()  # a stale one taken over
  last = json.loads((two / 'summary.json').read_text())
  assert last['start_step'] == saved and last['final_step'] == STEPS
  assert [h['step'] for h in last['history']] == list(
      range(saved + 1, STEPS + 1))
  _assert_steps_match(last['history'], reference, 'rerun')
  # The final params and BN statistics (step STEPS of both workdirs).
  want = checkpoints.restore_variables(tmp_path / 'one')
  got = checkpoints.restore_variables(two)
  flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
  flat_got = jax.tree_util.tree_leaves(got)
  assert len(flat_got) == len(flat_want)
  for (path, w), g in zip(flat_want, flat_got):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_put_replicated_keys_and_arrays():
  """The helper the train loop uses for values every process holds (step key)."""
  mesh = sharding.make_mesh()
  key = jax.random.key(3)
  rep = sharding.put_replicated(key, mesh)
  assert rep.sharding.is_fully_replicated and len(rep.sharding.device_set) == 8
  np.testing.assert_array_equal(jax.random.key_data(rep),
                                jax.random.key_data(key))
  assert jax.random.key_impl(rep) == jax.random.key_impl(key)
  arr = sharding.put_replicated(np.arange(4.0), mesh)
  assert arr.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(arr), np.arange(4.0))

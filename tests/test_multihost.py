"""train.py as 2 processes x 4 CPU devices == 1 process x 8 devices.

The README's multi-process launch (--coordinator_address, --num_processes,
--process_id; gloo CPU collectives) run for real on one machine: two
train.py processes on 127.0.0.1, 4 fake CPU devices each, against one
train.py process with 8 devices, on configs/tiny.py narrowed as
tests/test_train_cli.py (64 px) with augmentation on. Each process reads
its own half of every global batch (ae_jax.data.pipeline's per-host
split); with augmentation seeded by the global example position the two
halves differ, so equal losses need each process on its own half.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

import jax

from ae_jax import checkpoints
from ae_jax import sharding
from tests.test_train_cli import SMALL

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
ARGS = [a for a in SMALL if 'augment' not in a] + [
    '--config.data.augment=True', f'--config.train.num_steps={STEPS}']
TIMEOUT_S = 420  # per launch (~4 min on 2 busy cores); a hang fails, killed


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(num_devices: int, cache: bool) -> dict:
  """A CPU process with `num_devices` fake devices.

  `cache`: use the session's compile cache. Not for multi-process runs: the
  processes' cache keys differ, so one would load the step while the other
  compiles it, and the waiting one's gloo collectives time out.
  """
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_COORDINATOR_ADDRESS', 'AE_JAX_DISTRIBUTED',
                      'JAX_COMPILATION_CACHE_DIR')}
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if 'xla_force_host_platform_device_count' not in f]
  env['XLA_FLAGS'] = ' '.join(
      flags + [f'--xla_force_host_platform_device_count={num_devices}'])
  env['JAX_PLATFORMS'] = 'cpu'
  if cache:
    env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
  return env


def _launch(workdir: pathlib.Path, num_processes: int, num_devices: int):
  """Runs train.py as `num_processes` processes; returns their stderr.

  Every process is killed when one fails or the time runs out.
  """
  port = _free_port()
  procs, logs = [], []
  for i in range(num_processes):
    extra = ([] if num_processes == 1 else
             [f'--coordinator_address=127.0.0.1:{port}',
              f'--num_processes={num_processes}', f'--process_id={i}'])
    log = open(workdir.parent / f'{workdir.name}.{i}.log', 'w+')
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, 'train.py', '--workdir', str(workdir)] + ARGS +
        extra, cwd=REPO_ROOT, env=_env(num_devices, num_processes == 1),
        stdout=log, stderr=subprocess.STDOUT))
  deadline = time.time() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs):
      if time.time() > deadline or any(p.poll() for p in procs):
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  codes = [p.returncode for p in procs]
  assert codes == [0] * num_processes, (
      f'exit codes {codes} (timeout {TIMEOUT_S}s);\n' +
      '\n'.join(f'--- process {i}:\n{t[-2500:]}' for i, t in enumerate(texts)))
  return texts


def test_two_processes_match_one_process(tmp_path):
  logs2 = _launch(tmp_path / 'two', num_processes=2, num_devices=4)
  logs1 = _launch(tmp_path / 'one', num_processes=1, num_devices=8)
  for i, log in enumerate(logs2):
    assert (f'process {i} / 2, 4 local / 8 global devices' in log), log[-2000:]
    assert f'step {STEPS}/{STEPS}' in log or i > 0
  assert 'process 0 / 1, 8 local / 8 global devices' in logs1[0]
  two = json.loads((tmp_path / 'two' / 'summary.json').read_text())
  one = json.loads((tmp_path / 'one' / 'summary.json').read_text())
  assert [h['step'] for h in two['history']] == list(range(1, STEPS + 1))
  assert [h['step'] for h in one['history']] == list(range(1, STEPS + 1))
  for h2, h1 in zip(two['history'], one['history']):
    for name in ('total_loss', 'heatmap_loss', 'push_loss', 'pull_loss',
                 'grad_norm'):
      np.testing.assert_allclose(h2[name], h1[name], rtol=1e-4,
                                 err_msg=f'{name} at step {h1["step"]}')
  # Final variables from both workdirs' last checkpoints (restored on this
  # 8-device process, whatever topology saved them). Same computation up
  # to reduction order: BatchNorm statistics agree to float tolerance.
  # Adam's updates are ~lr * sign(m / sqrt(v)), so where a gradient is
  # near float noise (BN biases, some kernels) the two runs may step
  # differently: every parameter within 2 * (sum of the lrs), and (measured
  # 97%) most within 1e-4 relative; see tests/test_sharding.py.
  v2 = checkpoints.restore_variables(str(tmp_path / 'two'))
  v1 = checkpoints.restore_variables(str(tmp_path / 'one'))
  for a, b in zip(jax.tree_util.tree_leaves(v1['batch_stats']),
                  jax.tree_util.tree_leaves(v2['batch_stats'])):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  p1, p2 = (np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(
      v['params'])]) for v in (v1, v2))
  lr_sum = sum(h['lr'] for h in one['history'])
  assert np.abs(p2 - p1).max() <= 2 * lr_sum
  assert (np.abs(p2 - p1) <= 1e-6 + 1e-4 * np.abs(p1)).mean() > 0.95

def test_put_replicated_keys_and_arrays():
  """The helper train_lib uses for values every process holds (step key)."""
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

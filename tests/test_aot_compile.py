"""The train step compiled by libtpu for a 4-chip TPU v5e, on this CPU.

No TPU is needed: `jax.experimental.topologies` describes the slice and
the real TPU compiler runs (ae_jax.aot.compiler). The `test` extra installs
libtpu, so this runs in CI; without it the module fails (it does not skip)
so the TPU path cannot silently go untested. Two compiles of the tiny
config at 64 px (narrow model, 8 images per chip; 128 px only makes the
compile longer and changes no property below): float32 with global
BatchNorm statistics (train.py's default) and bfloat16 with per-device
statistics; each property below compares one setting, the other changes
nothing it depends on (per-device statistics do not change the
activations stored; the dtype does not change the collectives).
"""

import signal
import subprocess
import sys
import time

import jax
from jax.sharding import PartitionSpec as P
import pytest

from ae_jax.aot import report
from ae_jax.aot import targets
from configs import tiny
from tests import conftest

TOPOLOGY = 'v5e:2x2'
PER_CHIP = 8


def _config(dtype='float32', bn_stats='global'):
  config = tiny.get_config()
  config.model.dtype = dtype
  config.train.bn_stats = bn_stats
  config.data.input_size, config.data.heatmap_size = 64, 16
  config.train.global_batch_size = PER_CHIP * 4
  return config


@pytest.fixture(scope='module')
def checks():
  """'fp32' / 'bf16' -> report.Check of the 4-chip train step."""
  assert targets.has_libtpu(), (
      "libtpu is missing: pip install -e '.[torch,test]' installs it")
  return {'fp32': report.train_check(_config(), TOPOLOGY, search=False),
          'bf16': report.train_check(_config('bfloat16', 'per_device'),
                                          TOPOLOGY, search=False)}


def test_step_compiles_and_fits_on_four_chips(checks):
  check = checks['fp32']
  assert (check.tpu.chips, check.tpu.hosts) == (4, 1)
  assert check.tpu.devices[0].device_kind == 'TPU v5 lite'
  first = check.first
  assert first.fits and first.per_chip == PER_CHIP
  m = first.memory
  assert m['total'] == (m['arguments'] + m['outputs'] - m['aliased'] +
                        m['temps'] + m['code'])
  # The donated state: its outputs reuse the argument buffers.
  assert m['aliased'] > 0.9 * m['outputs']
  assert first.flops > 0 and first.bytes > 0
  assert first.seconds > 0 and 'all-reduce' in first.collectives


def test_bf16_needs_less_memory_than_fp32(checks):
  fp32, bf16 = checks['fp32'].first, checks['bf16'].first
  assert bf16.memory['temps'] < 0.8 * fp32.memory['temps']
  assert bf16.bytes < 0.8 * fp32.bytes
  # Parameters and Adam moments stay float32: same arguments.
  assert bf16.memory['arguments'] == fp32.memory['arguments']


def test_per_device_bn_has_fewer_all_reduces_than_global(checks):
  global_count, _ = checks['fp32'].first.collectives['all-reduce']
  local_count, _ = checks['bf16'].first.collectives['all-reduce']
  # Global: a pair per BatchNorm forward and backward plus the gradient's;
  # per device: the combined pmean of gradients, losses and statistics.
  assert global_count > 50
  assert local_count < 10 < global_count


def test_params_replicated_and_batch_sharded(checks):
  state, batch, rng = checks['fp32'].first.input_shardings[0]
  for s in jax.tree_util.tree_leaves(state.params):
    assert s.spec == P() and s.is_fully_replicated
  for s in jax.tree_util.tree_leaves(state.opt_state):
    assert s.is_fully_replicated  # shard_opt_state False
  # The step key is unused (no stochastic layer): jit drops it.
  assert rng is None or rng.is_fully_replicated
  assert set(batch) == {'image', 'mask', 'keypoints'}
  for s in batch.values():
    assert s.spec == P('data') and not s.is_fully_replicated
    assert len(s.device_set) == 4


def test_report_names_the_chip_figures_and_verdict(checks):
  check = checks['bf16']
  config = _config('bfloat16', 'per_device')
  table = report.train_report(config, check.tpu, check.first, None)
  assert '4 chips, 1 host' in table and f'per chip {PER_CHIP}' in table
  assert 'of 16 GiB HBM: fits' in table
  assert '819 GB/s' in table and '197 TFLOP/s' in table
  assert 'all-reduce' in table
  assert report.verdict(check.first, None, 4).startswith('fits: ')


def test_without_libtpu_one_line_says_how_to_install(monkeypatch):
  monkeypatch.setattr(targets, 'has_libtpu', lambda: False)
  with pytest.raises(targets.AotError, match=r"pip install -e '\.\[tpu\]'"):
    report.train_check(_config(), TOPOLOGY)


def test_cli_unknown_topology_is_one_error_line(tmp_path):
  result = subprocess.run(
      [sys.executable, 'train.py', '--config', 'configs/tiny.py',
       '--workdir', str(tmp_path / 'w'), '--aot_topology=v9x:2x2'],
      cwd=conftest.REPO_ROOT, capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == 1
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'v9x:2x2' in errors[0]
  assert not (tmp_path / 'w').exists()  # nothing written


def test_cli_ctrl_c_during_the_compile_ends_at_once(tmp_path):
  """Ctrl-C while libtpu compiles (native code, minutes for the paper
  config): one `error:` line and exit 130 within seconds, not after the
  compile."""
  proc = subprocess.Popen(
      [sys.executable, 'train.py', '--config', 'configs/tiny.py',
       '--workdir', str(tmp_path / 'w'), f'--aot_topology={TOPOLOGY}',
       '--noaot_search'],
      cwd=conftest.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  try:
    for line in proc.stdout:  # the progress line comes before the compile
      if line.startswith('Compiling the train step'):
        break
    # Inside the compile (~1 min). Without cli.interruptible the Ctrl-C
    # waited for the compile's end (26 s more, sent 12 s in).
    time.sleep(8)
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    code = proc.wait(timeout=60)
    waited = time.time() - t0
  finally:
    if proc.poll() is None:
      proc.kill()
  errors = [l for l in proc.stderr.read().splitlines()
            if l.startswith('error:')]
  assert code == 130 and errors == ['error: interrupted (Ctrl-C)'], errors
  assert waited < 10, waited
  assert not (tmp_path / 'w').exists()  # nothing written


def _eval_cli(*args):
  return subprocess.run(
      [sys.executable, 'eval.py', '--config', 'configs/tiny.py', *args],
      cwd=conftest.REPO_ROOT, capture_output=True, text=True, timeout=120,
      check=False)


def test_eval_cli_needs_a_checkpoint_unless_compiling_only():
  result = _eval_cli()
  assert result.returncode != 0 and '--ckpt is required' in result.stderr
  result = _eval_cli('--aot_topology=v5e:2x2', '--aot_image_size=640by480')
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert result.returncode == 1 and len(errors) == 1
  assert '--aot_image_size' in errors[0]

"""bench/accelerator.py's smoke mode runs (tiny sizes, one CPU device), so
the prepared GPU / TPU script cannot rot between device runs."""

import pytest

from bench import accelerator

pytestmark = pytest.mark.usefixtures('compile_cache')


def _rows(table):
  return [line.split(' | ') for line in table.splitlines()
          if line.startswith('| ') and not line.startswith('| part')]


def test_smoke_prints_one_table_with_every_part():
  table = accelerator.main(['--smoke', '--peak_tflops', '0.05'])
  rows = _rows(table)
  train = [r for r in rows if r[0] == '| train']
  assert [r[1] for r in train] == ['kernels=cpu bfloat16 bn=per_device']
  for r in train:
    assert float(r[2]) > 0 and r[3].endswith('%'), r  # img/s, MFU
    assert float(r[4]) > 0  # GFLOP per image from cost_analysis
    # One device: the per-device pmean stays as 1-replica all-reduces.
    assert 0 <= int(r[5].split()[0]) <= 3, r
  evals = [r for r in rows if r[0] == '| eval']
  assert [r[1] for r in evals] == ['scales [1.0], flip',
                                   'scales [1.0, 0.5], flip']
  assert all('end to end' in r[2] for r in evals)
  (inp,) = [r for r in rows if r[0] == '| input']
  assert float(inp[2]) > 0 and 'cpu-ms/img' in inp[8]
  assert 'MFU: bf16 0.05, fp32 0.05' in table


def test_budget_guard_skips_and_still_prints():
  table = accelerator.main(['--smoke', '--budget_s', '0.001'])
  rows = _rows(table)
  assert len(rows) == 4  # 1 train, 2 eval, 1 input
  assert all('skipped: time budget' in r[-1] for r in rows), rows


def test_peak_table_picks_the_device_kind():
  assert accelerator.peak_tflops('NVIDIA H100 PCIe', 'bfloat16') == 756.0
  assert accelerator.peak_tflops('NVIDIA H200', 'float32') == 494.7
  assert accelerator.peak_tflops('TPU v5 lite', 'bfloat16') == 197.0
  assert accelerator.peak_tflops('cpu', 'float32') is None

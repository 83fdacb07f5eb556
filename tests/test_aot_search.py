"""aot_compile's batch search and report, on a stand-in compiler.

The search only sees (per-chip batch -> fits, memory): a synthetic memory
model checks that it finds the boundary in few compiles, without libtpu.
"""

import pytest

from ae_jax import aot_check
from ae_jax import aot_compile
from ae_jax import aot_targets

GiB = aot_targets.GiB
LIMIT = 16 * GiB


def _compiler(memory_of, limit=LIMIT):
  """per-chip batch -> Compiled with memory_of(b) bytes; records calls."""
  calls = []

  def compile_at(b):
    calls.append(b)
    total = memory_of(b)
    memory = {'total': int(total)} if total <= limit else {}
    return aot_compile.Compiled(b, total <= limit, memory)

  return compile_at, calls


def _largest(memory_of, limit=LIMIT):
  b = 1
  while memory_of(b + 1) <= limit:
    b += 1
  return b


# (first per-chip batch, memory model, most compiles allowed), one row each:
CASES = [
    # Linear: 2 compiles for the line, then the prediction and one above.
    (48, lambda b: 0.4 * GiB + 0.13 * GiB * b, 4),
    # The configured batch does not fit: halved until it does.
    (400, lambda b: 0.4 * GiB + 0.13 * GiB * b, 6),
    # Memory grows faster above 80 images: the line overshoots, bisection.
    (32, lambda b: 0.4 * GiB + 0.13 * GiB * b + 0.05 * GiB * max(0, b - 80),
     10),
    # Small first batch: the second point doubles it.
    (2, lambda b: 12 * GiB + 0.5 * GiB * b, 5),
]


@pytest.mark.parametrize('first_batch,memory_of,budget', CASES)
def test_search_finds_the_largest_batch_that_fits(first_batch, memory_of,
                                                  budget):
  compile_at, calls = _compiler(memory_of)
  found = aot_compile.search_batch(compile_at, compile_at(first_batch),
                                   LIMIT, max_compiles=10)
  best = _largest(memory_of)
  assert found.best == best
  assert best in calls and best + 1 in calls  # confirmed by compiling
  assert len(calls) <= budget, calls
  assert f'{best} fits and {best + 1} does not' in found.how


def test_search_reports_when_nothing_fits():
  compile_at, _ = _compiler(lambda b: 20 * GiB + b)
  found = aot_compile.search_batch(compile_at, compile_at(8), LIMIT)
  assert found.best == 0 and 'does not fit' in found.how
  line = aot_check.verdict(compile_at(8), found, chips=4)
  assert line.startswith('does not fit') and 'no per-chip batch' in line


def test_verdict_names_the_batch_that_fits():
  memory_of = lambda b: 0.4 * GiB + 0.13 * GiB * b  # pylint: disable=unnecessary-lambda-assignment
  compile_at, _ = _compiler(memory_of)
  first = compile_at(200)
  found = aot_compile.search_batch(compile_at, first, LIMIT)
  line = aot_check.verdict(first, found, chips=16)
  best = _largest(memory_of)
  assert line.startswith('does not fit: 200 images per chip')
  assert (f'per-chip batch {best} fits (--config.train.global_batch_size='
          f'{best * 16})') in line


def test_roofline_takes_the_slower_of_flops_and_bytes():
  chip = aot_targets.CHIPS['v5e']
  c = aot_compile.Compiled(48, True, {}, flops=2.4e12, bytes=64e9)
  r = aot_check.roofline(c, chip)
  assert r['byte_s'] == pytest.approx(64e9 / 819e9)
  assert r['flop_s'] == pytest.approx(2.4e12 / 197e12)
  assert r['images_per_s'] == pytest.approx(48 / r['byte_s'])
  assert 'memory-bound' in aot_check.roofline_line(c, chip)
  compute = aot_compile.Compiled(48, True, {}, flops=2.4e13, bytes=1e9)
  assert 'compute-bound' in aot_check.roofline_line(compute, chip)


def test_unknown_topology_is_one_line_error():
  with pytest.raises(aot_targets.AotError, match='GENERATION'):
    aot_targets.describe_slice('v9z:2x2')
  with pytest.raises(aot_targets.AotError, match='AxB'):
    aot_targets.describe_slice('v5e')


def test_gpu_names_need_the_cuda_plugin(monkeypatch):
  monkeypatch.setattr(aot_targets, 'has_compiler',
                      lambda platform: platform == 'tpu')
  with pytest.raises(aot_targets.AotError,
                     match=r"jax CUDA plugin: pip install -e '\.\[cuda12\]'"):
    aot_targets.describe_slice('h100:2x8')
  with pytest.raises(aot_targets.AotError, match='NAME:'):
    aot_targets.describe_slice('h100:2x2x8')  # GPUs: [HOSTSx]GPUS


def test_gpu_target_configs_describe_the_chips():
  for name, memory in (('h100', 84942979072), ('a100', 85100068864)):
    text = aot_targets.GPU_TARGETS[name]
    assert f'device_memory_size: {memory}' in text
    assert aot_targets.CHIPS[name].hbm_gib * GiB == pytest.approx(memory)
    assert aot_targets.CHIPS[name].device_kind in text

"""aot.compiler's batch search and the reports, on a stand-in compiler.

The search only sees (per-chip batch -> fits, memory): a synthetic memory
model checks that it finds the boundary in few compiles, without libtpu.
"""

import numpy as np
import pytest

from ae_jax import keypoints
from ae_jax.aot import compiler
from ae_jax.aot import hlo_stats
from ae_jax.aot import report
from ae_jax.aot import targets
from ae_jax.data import eval_input
from configs import tiny

GiB = hlo_stats.GiB
LIMIT = 16 * GiB


def _compiler(memory_of, limit=LIMIT):
  """per-chip batch -> Compiled with memory_of(b) bytes; records calls."""
  calls = []

  def compile_at(b):
    calls.append(b)
    total = memory_of(b)
    memory = {'total': int(total)} if total <= limit else {}
    return compiler.Compiled(b, total <= limit, memory)

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
  found = compiler.search_batch(compile_at, compile_at(first_batch),
                                   LIMIT, max_compiles=10)
  best = _largest(memory_of)
  assert found.best == best
  assert best in calls and best + 1 in calls  # confirmed by compiling
  assert len(calls) <= budget, calls
  assert f'{best} fits and {best + 1} does not' in found.how


def test_search_reports_when_nothing_fits():
  compile_at, _ = _compiler(lambda b: 20 * GiB + b)
  found = compiler.search_batch(compile_at, compile_at(8), LIMIT)
  assert found.best == 0 and 'does not fit' in found.how
  line = report.verdict(compile_at(8), found, chips=4)
  assert line.startswith('does not fit') and 'no per-chip batch' in line


def test_verdict_names_the_batch_that_fits():
  memory_of = lambda b: 0.4 * GiB + 0.13 * GiB * b  # pylint: disable=unnecessary-lambda-assignment
  compile_at, _ = _compiler(memory_of)
  first = compile_at(200)
  found = compiler.search_batch(compile_at, first, LIMIT)
  line = report.verdict(first, found, chips=16)
  best = _largest(memory_of)
  assert line.startswith('does not fit: 200 images per chip')
  assert (f'per-chip batch {best} fits (--config.train.global_batch_size='
          f'{best * 16})') in line


def test_roofline_takes_the_slower_of_flops_and_bytes():
  chip = targets.CHIPS['v5e']
  c = compiler.Compiled(48, True, {}, flops=2.4e12, bytes=64e9)
  r = report.roofline(c, chip)
  assert r['byte_s'] == pytest.approx(64e9 / 819e9)
  assert r['flop_s'] == pytest.approx(2.4e12 / 197e12)
  assert r['images_per_s'] == pytest.approx(48 / r['byte_s'])
  assert 'memory-bound' in report.roofline_line(c, chip)
  compute = compiler.Compiled(48, True, {}, flops=2.4e13, bytes=1e9)
  assert 'compute-bound' in report.roofline_line(compute, chip)


def test_unknown_topology_is_one_line_error():
  with pytest.raises(targets.AotError, match='GENERATION'):
    targets.describe_slice('v9z:2x2')
  with pytest.raises(targets.AotError, match='AxB'):
    targets.describe_slice('v5e')


def test_gpu_names_need_the_cuda_plugin(monkeypatch):
  monkeypatch.setattr(targets, 'has_compiler',
                      lambda platform: platform == 'tpu')
  with pytest.raises(targets.AotError,
                     match=r"jax CUDA plugin: pip install -e '\.\[cuda12\]'"):
    targets.describe_slice('h100:2x8')
  with pytest.raises(targets.AotError, match='NAME:'):
    targets.describe_slice('h100:2x2x8')  # GPUs: [HOSTSx]GPUS


def test_gpu_target_configs_describe_the_chips():
  for name, memory in (('h100', 84942979072), ('a100', 85100068864)):
    text = targets.GPU_TARGETS[name]
    assert f'device_memory_size: {memory}' in text
    assert targets.CHIPS[name].hbm_gib * GiB == pytest.approx(memory)
    assert targets.CHIPS[name].device_kind in text


def test_eval_sizes_are_the_inputs_the_predictor_makes():
  """The shapes eval's program is compiled for: what eval_input.resize_inputs
  makes of such an image (one per scale, and the scale-1 map size)."""
  image = np.zeros((480, 640, 3), np.uint8)
  for scales in ((1.0,), (2.0, 1.0, 0.5)):
    sizes, base = compiler.eval_sizes((480, 640), 512, scales)
    made = eval_input.resize_inputs(image, 512, scales)
    assert sizes == tuple(i.shape[:2] for i in made.images)
    assert base == tuple(made.base_hw)


def test_eval_check_reports_per_image_and_exits_2_when_it_does_not_fit(
    monkeypatch):
  """eval.py --aot_topology's table and exit code on a stand-in compiler
  (8 GiB per image: 2 per v5e chip fit, 3 do not)."""
  calls = []

  def compile_at(b):
    calls.append(b)
    temps = 8 * GiB * b - 1
    if temps > LIMIT:
      return compiler.Compiled(b, False, {})
    memory = dict(arguments=0, outputs=0, aliased=0, temps=temps, code=0,
                  total=temps)
    return compiler.Compiled(b, True, memory, flops=1e11 * b, bytes=4e9 * b)

  monkeypatch.setattr(compiler, 'eval_forward_compiler',
                      lambda *args: compile_at)
  config = tiny.get_config()
  config.test.scales = (2, 1, 0.5)
  lines = []
  code = report.check_eval(config, 'v5e:2x2', keypoints.COCO,
                           batch_size=4, out=lines.append)
  text = '\n'.join(lines)
  assert code == 0 and calls == [1]  # one image per chip of the host
  assert 'eval runs per host, on its 4 chips' in text
  assert 'inputs 2: ' in text and '0.5: ' in text  # every scale's size
  assert '40.0 GB per image' not in text and '4.000 GB per image' in text
  assert '205 img/s per chip' in text  # 819 GB/s / 4 GB per image
  assert lines[-1].startswith('fits: ')
  lines.clear()
  code = report.check_eval(config, 'v5e:2x2', keypoints.COCO,
                           batch_size=12, out=lines.append)
  assert code == report.DOES_NOT_FIT_EXIT_CODE
  assert lines[-1] == ('does not fit: 3 image(s) per chip; per-chip batch 2 '
                       'fits')
  with pytest.raises(targets.AotError, match='multiple of the 4 chips'):
    report.check_eval(config, 'v5e:2x2', keypoints.COCO, batch_size=6,
                      out=lines.append)

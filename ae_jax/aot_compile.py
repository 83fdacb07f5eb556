r"""Compile the train step (or eval's forward) for a slice it is not on.

With libtpu installed (the `tpu` extra), `jax.experimental.topologies`
describes the devices of a TPU slice without TPU hardware
(ae_jax.aot_targets), and jit's `.lower(...).compile()` on a mesh over
them runs the real TPU compiler, as MaxText's train_compile.py does.
`train_step_compiler` compiles the very step train.py would run
(ae_jax.train_program: model, dtype, bn_stats, optimizer-state sharding,
donation, the ('data',) mesh over every chip of every host) and reads the
compiler's own counts into a `Compiled`: per-chip memory, FLOPs and
bytes, the collectives in the module. `search_batch` finds the largest
per-chip batch that fits by compiling. Nothing is trained or written.
ae_jax.aot_check prints the report of train.py / eval.py --aot_topology.

Legend: b per-chip batch (images), B = b x chips the global batch.
"""

import dataclasses
import re
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from ae_jax import hlo_stats
from ae_jax import keypoints
from ae_jax import sharding
from ae_jax import train_program
from ae_jax.aot_targets import GiB
from ae_jax.aot_targets import Slice
from ae_jax.models import ae_model


# ------------------------------------------------------------- compiling


@dataclasses.dataclass(frozen=True)
class Compiled:
  """What the compiler says about one program on one chip.

  Attributes:
    per_chip: images per chip.
    fits: whether the compiler placed the program in HBM.
    memory: per-chip bytes: 'arguments', 'outputs', 'aliased', 'temps',
      'code', 'total' (= arguments + outputs - aliased + temps + code);
      for a program that does not fit, 'total' is what the compiler
      reported needing (if it said) and 'limit' its HBM limit.
    flops, bytes: per chip per call (cost_analysis 'flops', 'bytes
      accessed').
    collectives: kind -> (count, bytes) (hlo_stats.collectives).
    seconds: compile time.
    hlo: the compiled module's text ('' when it did not fit).
    input_shardings: the compiled program's input shardings.
    bytes_from_hlo: the compiler gave no cost analysis; `bytes` is
      hlo_stats.entry_traffic's sum and `flops` is 0.
  """
  per_chip: int
  fits: bool
  memory: Dict[str, int]
  flops: float = 0.0
  bytes: float = 0.0
  collectives: Dict[str, Tuple[int, int]] = dataclasses.field(
      default_factory=dict)
  seconds: float = 0.0
  hlo: str = ''
  input_shardings: Any = None
  bytes_from_hlo: bool = False


def compiled_memory(compiled: Any) -> Dict[str, int]:
  """Per-device bytes of a compiled program (`compiled.memory_analysis()`).

  Returns:
    'arguments', 'outputs', 'aliased' (outputs that reuse donated
    arguments), 'temps', 'code' and 'total' = arguments + outputs -
    aliased + temps + code; {} where the backend does not say.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  memory = {
      'arguments': stats.argument_size_in_bytes,
      'outputs': stats.output_size_in_bytes,
      'aliased': stats.alias_size_in_bytes,
      'temps': stats.temp_size_in_bytes,
      'code': stats.generated_code_size_in_bytes}
  memory['total'] = (memory['arguments'] + memory['outputs'] -
                     memory['aliased'] + memory['temps'] + memory['code'])
  return memory


def memory_text(memory: Dict[str, int]) -> str:
  """'7.30 GiB (arguments 0.11 + temporaries 7.10 + ...)'."""
  m = memory
  return (f'{m["total"] / GiB:.2f} GiB (arguments {m["arguments"] / GiB:.2f}'
          f' + temporaries {m["temps"] / GiB:.2f} + outputs '
          f'{m["outputs"] / GiB:.2f} - aliased (donated) '
          f'{m["aliased"] / GiB:.2f} + code {m["code"] / GiB:.2f})')


_OOM = re.compile(r'RESOURCE_EXHAUSTED|Ran out of memory|exceeds the '
                  r'(?:HBM|memory)', re.I)


def compile_lowered(lower: Callable[[], Any], per_chip: int,
                    capacity: float) -> Compiled:
  """Compiles `lower()` and reads memory, cost and collectives.

  Args:
    lower: () -> a jax Lowered (the lowering is timed with the compile).
    per_chip: images per chip (recorded).
    capacity: the chip's memory in bytes: a program over it does not fit
      (the TPU compiler itself refuses programs over its HBM; XLA:GPU does
      not check).

  A compile that fails for lack of memory gives fits=False (any other
  error is raised). Where the compiler gives no cost analysis (XLA:GPU's
  compile-only client), `bytes` is summed from the module's entry
  instructions (hlo_stats.entry_traffic) and `flops` stays 0.
  """
  start = time.time()
  try:
    compiled = lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if not _OOM.search(text):
      raise
    return Compiled(per_chip, False, _oom_memory(text),
                    seconds=time.time() - start)
  seconds = time.time() - start
  memory = compiled_memory(compiled)
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  hlo = compiled.as_text()
  flops = float(cost.get('flops', 0.0))
  nbytes = float(cost.get('bytes accessed', 0.0))
  from_hlo = not cost
  if from_hlo:
    nbytes = float(sum(t.padded for t in hlo_stats.entry_traffic(hlo)))
  return Compiled(per_chip, memory.get('total', 0) <= capacity, memory,
                  flops, nbytes, hlo_stats.collectives(hlo), seconds, hlo,
                  compiled.input_shardings, from_hlo)


def _oom_memory(text: str) -> Dict[str, int]:
  """The bytes needed and the limit from the compiler's OOM message."""
  units = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
  sizes = [float(n) * units[u.upper()] for n, u in re.findall(
      r'([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)i?B\b', text)]
  out = {}
  m = re.search(r'Used\s+([0-9.]+)([KMGT]?)i?B?\s+of\s+([0-9.]+)([KMGT]?)'
                r'i?B?\s+hbm', text, re.I)
  if m:
    out['total'] = int(float(m.group(1)) * units[m.group(2).upper()])
    out['limit'] = int(float(m.group(3)) * units[m.group(4).upper()])
  elif sizes:
    out['total'] = int(max(sizes))
  return out


def train_step_compiler(config: ml_collections.ConfigDict, tpu: Slice,
                        num_joints: int) -> Callable[[int], Compiled]:
  """per-chip batch -> the compiled train step of `config` on `tpu`.

  The program is train_program.make_train_program's, on the mesh of
  every chip of the slice (all hosts), for the 'tpu' backend's kernels.
  """
  mesh = tpu.mesh()
  program = train_program.make_train_program(
      config, mesh, num_joints=num_joints, epoch_steps=1000,
      kernels=ae_model.default_kernels(tpu.chip.platform),
      init_rng=jax.random.key(config.seed))

  def compile_at(per_chip: int) -> Compiled:
    args = train_program.abstract_step_args(
        program, config, num_joints, mesh, per_chip * tpu.chips)
    return compile_lowered(lambda: program.step_fn.lower(*args), per_chip,
                           tpu.chip.hbm_gib * GiB)

  return compile_at


def eval_sizes(image_hw: Tuple[int, int], input_size: int,
               scales: Sequence[float]) -> Tuple[Tuple[Tuple[int, int], ...],
                                                 Tuple[int, int]]:
  """Resized input (H, W) per scale (descending) and the scale-1 size.

  As Predictor._prepare: mmpose's short side = input_size x scale, long
  side aligned to 64 (inference.get_multi_scale_size).
  """
  from ae_jax import inference  # pylint: disable=g-import-not-at-top
  scales = tuple(sorted((float(s) for s in scales), reverse=True))
  height, width = image_hw
  low = min(scales)
  sizes = tuple(inference.get_multi_scale_size(height, width, input_size, s,
                                               low)[0][::-1] for s in scales)
  base = inference.get_multi_scale_size(height, width, input_size, 1.0,
                                        low)[0][::-1]
  return sizes, base


def eval_forward_compiler(config: ml_collections.ConfigDict, tpu: Slice,
                          spec: keypoints.KeypointSpec,
                          image_hw: Tuple[int, int]
                          ) -> Callable[[int], Compiled]:
  """per-chip batch -> eval's compiled device program on one host's chips.

  The program is inference.compute_batch (normalise, forward at every
  test scale with flip, resize, average, NMS / top-k), what
  Predictor.predict_stream runs for a batch of one shape bucket; eval
  runs on each host's own chips, so the mesh is host 0's.
  """
  from ae_jax import inference  # pylint: disable=g-import-not-at-top
  test = config.test
  mesh = tpu.mesh(host=0)
  model = ae_model.create_model(
      {**config.model, 'num_joints': spec.num_joints},
      ae_model.default_kernels(tpu.chip.platform))
  shapes = jax.eval_shape(
      model.init, jax.random.key(0), jax.ShapeDtypeStruct(
          (1, 64, 64, 3), np.float32))
  rep = sharding.replicated(mesh)
  variables = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), shapes)
  sizes, base = eval_sizes(image_hw, test.input_size, test.scales)
  scales = tuple(sorted((float(s) for s in test.scales), reverse=True))
  grouping = inference.grouping_params(test.grouping)

  def compile_at(per_chip: int) -> Compiled:
    batch = per_chip * mesh.size
    images = tuple(jax.ShapeDtypeStruct(
        (batch, h, w, 3), np.uint8, sharding=sharding.batch_sharding(mesh))
                   for h, w in sizes)
    lower = lambda: inference.compute_batch.lower(  # pylint: disable=g-long-lambda
        variables, images, model=model, scales=scales, flip=test.flip,
        base_hw=base, flip_index=tuple(spec.flip_index),
        project2image=test.project2image, max_people=grouping.max_people,
        nms_kernel=grouping.nms_kernel)
    return compile_lowered(lower, per_chip, tpu.chip.hbm_gib * GiB)

  return compile_at


# ---------------------------------------------------------- batch search


@dataclasses.dataclass(frozen=True)
class Search:
  """The largest per-chip batch that fits, and how it was found.

  Attributes:
    best: the largest per-chip batch seen to fit (0: none fits).
    tried: every compile, in order.
    predicted: the linear prediction from the first two that fit.
    how: one line for the report.
  """
  best: int
  tried: Tuple[Compiled, ...]
  predicted: Optional[int]
  how: str


def search_batch(compile_at: Callable[[int], Compiled], first: Compiled,
                 limit_bytes: float, max_compiles: int = 8) -> Search:
  """Largest per-chip batch that fits, found by compiling.

  Memory is close to linear in the batch (the state is fixed, the
  activations grow with it): a line through two compiles that fit
  predicts the largest batch under `limit_bytes`. That batch and its
  neighbour (above if it fits, else below) are compiled to confirm; a
  wrong prediction continues by bisection between the largest batch seen
  to fit and the smallest seen not to.

  Args:
    compile_at: per-chip batch -> Compiled.
    first: the compile at the configured batch.
    limit_bytes: the HBM per chip the prediction aims under.
    max_compiles: stop after this many compiles (first included).
  """
  tried = {first.per_chip: first}

  def at(b):
    if b not in tried:
      tried[b] = compile_at(b)
    return tried[b]

  b0 = first.per_chip
  while not at(b0).fits and b0 > 1 and len(tried) < max_compiles:
    b0 = max(1, b0 // 2)  # no memory figure above the limit: halve
  if not at(b0).fits:
    return Search(0, tuple(tried.values()), None,
                  f'per-chip batch {b0} does not fit either')
  b1 = b0 // 2 if b0 >= 4 else b0 * 2
  m0 = at(b0).memory['total']
  m1 = at(b1).memory.get('total', m0)
  predicted = b0
  if at(b1).fits and m1 != m0:
    slope = (m1 - m0) / (b1 - b0)
    predicted = max(1, int((limit_bytes - (m0 - slope * b0)) // slope))

  def bounds():
    lo = max(b for b, c in tried.items() if c.fits)
    hi = min((b for b, c in tried.items() if not c.fits and b > lo),
             default=None)
    return lo, hi

  lo, hi = bounds()
  while len(tried) < max_compiles and (hi is None or hi > lo + 1):
    if predicted not in tried and lo < predicted and (
        hi is None or predicted < hi):
      guess = predicted
    elif lo == predicted:
      guess = lo + 1  # confirm above the prediction
    elif hi == predicted:
      guess = hi - 1  # confirm below it
    elif hi is None:
      guess = lo + max(1, lo // 8)  # the line was low: gallop
    else:
      guess = (lo + hi) // 2
    at(guess)
    lo, hi = bounds()
  sizes = ', '.join(_tried_text(c) for c in sorted(
      tried.values(), key=lambda c: c.per_chip))
  how = (f'compiled per-chip batches {sizes}; the line through {b0} and '
         f'{b1} predicted {predicted}')
  if hi == lo + 1:
    how += f'; {lo} fits and {hi} does not (both compiled)'
  else:
    how += f'; {lo} is the largest that fit within {max_compiles} compiles'
  return Search(lo, tuple(tried.values()), predicted, how)


def _tried_text(c: Compiled) -> str:
  """'48: 7.3 GiB' / '200: does not fit'."""
  if c.fits:
    return f'{c.per_chip} ({c.memory["total"] / GiB:.2f} GiB)'
  return f'{c.per_chip} (does not fit)'

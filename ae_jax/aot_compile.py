r"""Compile the train step (or eval's forward) for a TPU slice, on any CPU.

  python train.py --config configs/coco512.py --workdir W \
      --aot_topology=v5e:4x4 [--config.model.dtype=bfloat16 ...]
  python eval.py --config configs/coco512.py --aot_topology=v5e:2x2 \
      [--config.test.scales='(2, 1, 0.5)'] [--aot_image_size=640x480]

With libtpu installed (the `tpu` extra), `jax.experimental.topologies`
describes the devices of a TPU slice without TPU hardware, and jit's
`.lower(...).compile()` on a mesh over them runs the real TPU compiler
(as MaxText's train_compile.py does). The train check compiles the very
step train.py would run (ae_jax.train_program: model, dtype, bn_stats,
optimizer-state sharding, donation, the ('data',) mesh over every chip of
every host) and reads the compiler's own counts: per-chip memory,
FLOPs and bytes, the collectives in the module. Nothing is trained or
written; the workdir is not touched.

The roofline bound of a step is max(FLOPs / peak, bytes / HBM bandwidth)
with the chip's published peak and bandwidth (CHIPS): what the compiler's
counts allow at best, not a measured speed.

Exit status (train.py / eval.py with --aot_topology): 0 fits, 2 does not
fit (the last line names the per-chip batch that would), 1 an `error:`
line (no libtpu, unknown topology, bad config).

Legend: b per-chip batch (images), B = b x chips the global batch.
"""

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh
import ml_collections
import numpy as np

from ae_jax import config_checks
from ae_jax import hlo_stats
from ae_jax import keypoints
from ae_jax import sharding
from ae_jax import train_program
from ae_jax.models import ae_model

GiB = 2**30
DOES_NOT_FIT_EXIT_CODE = 2


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures of an accelerator the check compiles for.

  Attributes:
    name: 'v5e', 'h100', ...: the prefix of a topology name.
    device_kind: jax's device_kind of its devices.
    hbm_gib: memory per chip (GiB).
    peak_tflops: dense bfloat16 peak per chip (TPU float32 matmuls run as
      bfloat16 passes at JAX's default precision; GPU float32 as TF32 at
      half this rate: the roofline uses the bfloat16 figure for both).
    hbm_gbps: memory bandwidth per chip, GB/s (1e9 bytes).
    platform: 'tpu' (libtpu) or 'cuda' (the jax CUDA plugin).
    topology_kwargs: extra get_topology_desc arguments.
  """
  name: str
  device_kind: str
  hbm_gib: float
  peak_tflops: float
  hbm_gbps: float
  platform: str = 'tpu'
  topology_kwargs: Tuple[Tuple[str, str], ...] = ()


def _gpu_target(cores: int, smem_core: int, smem_optin: int, fpus: int,
                bandwidth: int, l2: int, clock_ghz: float, memory: int,
                major: int, name: str) -> str:
  """A GpuTargetConfigProto text: what XLA:GPU needs to compile for a GPU
  it does not have (get_topology_desc's target_config)."""
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: {smem_core}
  threads_per_core_limit: 2048 core_count: {cores} fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth}
  l2_cache_size: {l2} clock_rate_ghz: {clock_ghz}
  device_memory_size: {memory} shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {major} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""


# GPU device descriptions: the values of XLA's own spec files
# (openxla/xla xla/backends/gpu/target_config/specs/{h100_sxm,a100_sxm_80}
# .txtpb, what XLA:GPU reads off those GPUs); the cuDNN / CUDA versions
# are those the cuda12 extra installs.
GPU_TARGETS = {
    'h100': _gpu_target(132, 233472, 232448, 128, 3352320000000, 52428800,
                        1.98, 84942979072, 9, 'NVIDIA H100 80GB HBM3'),
    'a100': _gpu_target(108, 167936, 166912, 64, 2039040000000, 41943040,
                        1.41, 85100068864, 8, 'NVIDIA A100-SXM4-80GB'),
}

CHIPS = {c.name: c for c in (
    # cloud.google.com/tpu/docs/v4: 275 TFLOPS (bf16), HBM2 32 GiB,
    # 1200 GBps. Two TensorCores per chip: 'megacore' = one device per chip.
    Chip('v4', 'TPU v4', 32, 275, 1200,
         topology_kwargs=(('chip_config_name', 'megacore'),)),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOPs (bf16), HBM2 16 GB, 819 GBps.
    Chip('v5e', 'TPU v5 lite', 16, 197, 819),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOPs (bf16), HBM2e 95 GB,
    # 2765 GBps.
    Chip('v5p', 'TPU v5', 95, 459, 2765),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOPs (bf16), HBM 32 GB, 1638 GBps.
    Chip('v6e', 'TPU v6 lite', 32, 918, 1638),
    # NVIDIA H100 SXM5 80GB datasheet: 989 TFLOPS dense BF16 (1979 with
    # sparsity), 3.35 TB/s HBM3; memory as the device reports it (XLA spec).
    Chip('h100', 'NVIDIA H100 80GB HBM3', 84942979072 / 2**30, 989, 3350,
         platform='cuda'),
    # NVIDIA A100 80GB SXM datasheet: 312 TFLOPS dense BF16, 2039 GB/s.
    Chip('a100', 'NVIDIA A100-SXM4-80GB', 85100068864 / 2**30, 312, 2039,
         platform='cuda'),
)}
INSTALL_HINTS = {'tpu': "pip install -e '.[tpu]'",
                 'cuda': "pip install -e '.[cuda12]'"}
COMPILERS = {'tpu': 'libtpu', 'cuda': 'the jax CUDA plugin'}


class AotError(ValueError):
  """A user error of the check (topology name, batch); one line."""


def has_libtpu() -> bool:
  """Whether libtpu (the TPU compiler) is installed."""
  return importlib.util.find_spec('libtpu') is not None


def has_compiler(platform: str) -> bool:
  """Whether the compiler for 'tpu' (libtpu) / 'cuda' is installed."""
  if platform == 'tpu':
    return has_libtpu()
  return importlib.util.find_spec('jax_cuda12_plugin') is not None


@dataclasses.dataclass(frozen=True)
class Slice:
  """The devices of a TPU slice or GPU nodes, described without hardware."""
  name: str
  chip: Chip
  devices: Tuple[Any, ...]

  @property
  def chips(self) -> int:
    return len(self.devices)

  @property
  def hosts(self) -> int:
    return len({d.process_index for d in self.devices})

  def mesh(self, host: Optional[int] = None) -> Mesh:
    """The ('data',) mesh over every chip (or one host's), as train.py's."""
    devices = [d for d in self.devices
               if host is None or d.process_index == host]
    return jax.make_mesh((len(devices),), (sharding.DATA_AXIS,),
                         axis_types=(AxisType.Auto,), devices=devices)


def describe_slice(name: str) -> Slice:
  """'v5e:4x4' (TPU generation:topology) or 'h100:2x8' (GPU:hosts x GPUs
  per host) -> its devices, described by the compiler without hardware.

  Raises:
    AotError: an unknown chip, a malformed topology, no compiler for it
      (one line naming the pip extra), a topology the compiler rejects.
  """
  gen, _, shape = name.partition(':')
  chip = CHIPS.get(gen)
  pattern = r'\d+(x\d+){1,2}' if chip and chip.platform == 'tpu' else (
      r'(\d+x)?\d+')
  if chip is None or not re.fullmatch(pattern, shape):
    tpus = ', '.join(c.name for c in CHIPS.values() if c.platform == 'tpu')
    gpus = ', '.join(c.name for c in CHIPS.values() if c.platform == 'cuda')
    raise AotError(
        f'--aot_topology={name!r}: expected a TPU GENERATION:AxB[xC] '
        f'(GENERATION one of {tpus}; e.g. v5e:4x4, v4:2x2x2) or a GPU '
        f'NAME:[HOSTSx]GPUS (NAME one of {gpus}; e.g. h100:8, h100:2x8)')
  if not has_compiler(chip.platform):
    raise AotError(f'--aot_topology={name} needs {COMPILERS[chip.platform]}:'
                   f' {INSTALL_HINTS[chip.platform]}')
  kwargs = dict(chip.topology_kwargs, topology_name=name)
  if chip.platform == 'cuda':  # jax's GPU topology: slices x hosts x GPUs
    hosts, _, gpus = shape.rpartition('x')
    kwargs = {'target_config': GPU_TARGETS[gen],
              'topology': f'1x{hosts or 1}x{gpus}'}
  try:
    topo = topologies.get_topology_desc(platform=chip.platform, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise AotError(f'--aot_topology={name!r}: {COMPILERS[chip.platform]} '
                   f'does not know it ({" ".join(str(e).split())[:200]})'
                   ) from None
  return Slice(name, chip, tuple(topo.devices))


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


# ---------------------------------------------------------------- report


def roofline(c: Compiled, chip: Chip) -> Dict[str, float]:
  """Bound of one call from the compiler's counts and the chip's figures.

  Returns:
    flop_s / byte_s: seconds at peak FLOPs / at full HBM bandwidth;
    images_per_s: per chip, per_chip / max of the two; intensity: FLOP
    per byte; balance: the chip's FLOP per byte of bandwidth.
  """
  flop_s = c.flops / (chip.peak_tflops * 1e12)
  byte_s = c.bytes / (chip.hbm_gbps * 1e9)
  bound = max(flop_s, byte_s, 1e-30)
  return {'flop_s': flop_s, 'byte_s': byte_s,
          'images_per_s': c.per_chip / bound,
          'intensity': c.flops / max(c.bytes, 1.0),
          'balance': chip.peak_tflops * 1e12 / (chip.hbm_gbps * 1e9)}


def _gib(n: float) -> str:
  return f'{n / GiB:.2f} GiB'


def memory_line(c: Compiled, hbm_gib: float) -> str:
  """'7.30 GiB (arguments ... + code ...) of 16 GiB HBM: fits'."""
  m = c.memory
  if not c.fits:
    need = f'needs {_gib(m["total"])}' if 'total' in m else 'needs more'
    limit = (f' (compiler limit {_gib(m["limit"])})' if 'limit' in m
             else '')
    return f'{need} of {hbm_gib:.3g} GiB HBM{limit}: does not fit'
  return f'{memory_text(m)} of {hbm_gib:.3g} GiB HBM: fits'


def collectives_line(c: Compiled) -> str:
  """'all-reduce 111 (38.5 MB)' per kind, or 'none'."""
  if not c.collectives:
    return 'none'
  return ', '.join(f'{kind} {n} ({nbytes / 1e6:.1f} MB)'
                   for kind, (n, nbytes) in c.collectives.items())


def roofline_line(c: Compiled, chip: Chip, what: str = 'img/s') -> str:
  """The roofline bound of `c` on `chip`, with the figures it uses."""
  r = roofline(c, chip)
  if c.bytes_from_hlo:
    return (f'{r["images_per_s"]:,.0f} {what} per chip (bytes alone: '
            f'{c.bytes / 1e9:.1f} GB at {chip.hbm_gbps:g} GB/s = '
            f'{r["byte_s"] * 1e3:.1f} ms; the compiler reports no FLOPs)')
  kind = 'memory' if r['byte_s'] >= r['flop_s'] else 'compute'
  return (f'{r["images_per_s"]:,.0f} {what} per chip ({kind}-bound: '
          f'{c.bytes / 1e9:.1f} GB at {chip.hbm_gbps:g} GB/s = '
          f'{r["byte_s"] * 1e3:.1f} ms, {c.flops / 1e12:.3f} TFLOP at '
          f'{chip.peak_tflops:g} TFLOP/s = {r["flop_s"] * 1e3:.1f} ms; '
          f'{r["intensity"]:.0f} FLOP/byte vs the chip\'s '
          f'{r["balance"]:.0f})')


def step_cost_line(c: Compiled) -> str:
  """FLOPs and bytes of one call, in all and per image."""
  b = c.per_chip
  if c.bytes_from_hlo:
    return (f'{c.bytes / 1e9:.2f} GB read and written by the entry '
            f'instructions ({c.bytes / b / 1e9:.3f} GB per image; the '
            'compiler gives no cost analysis, so no FLOP count)')
  return (f'{c.flops / 1e12:.3f} TFLOP, {c.bytes / 1e9:.2f} GB accessed '
          f'({c.flops / b / 1e9:.1f} GFLOP, {c.bytes / b / 1e9:.3f} GB per '
          'image)')


def format_table(rows: Sequence[Tuple[str, str]]) -> str:
  """A two-column markdown table."""
  return '\n'.join(['| | |', '|---|---|'] +
                   [f'| {k} | {v} |' for k, v in rows])


def train_report(config: ml_collections.ConfigDict, tpu: Slice,
                 first: Compiled, search: Optional[Search]) -> str:
  """The table of the train check (see the module docstring)."""
  c, chip = first, tpu.chip
  b = c.per_chip
  rows = [
      ('topology', f'{tpu.name} ({chip.device_kind}): {tpu.chips} chips, '
                   f'{tpu.hosts} host{"s" if tpu.hosts > 1 else ""}'),
      ('batch', f'global {b * tpu.chips}, per chip {b}'),
      ('config', f'model.dtype {config.model.dtype}, train.bn_stats '
                 f'{config.train.bn_stats}, optim.shard_opt_state '
                 f'{config.optim.shard_opt_state}, input '
                 f'{config.data.input_size}'),
      ('per-chip memory', memory_line(c, chip.hbm_gib)),
  ]
  if search is not None:
    rows.append(('largest per-chip batch that fits',
                 f'{search.best} ({search.how})' if search.best else
                 search.how))
  if c.fits:
    rows += [
        ('per chip-step', step_cost_line(c)),
        ('roofline', roofline_line(c, chip)),
        ('collectives per step', collectives_line(c)),
    ]
  rows.append(('compile time', f'{c.seconds:.0f} s' + (
      f' (all {len(search.tried)} compiles: '
      f'{sum(t.seconds for t in search.tried):.0f} s)' if search else '')))
  return format_table(rows)


def verdict(first: Compiled, search: Optional[Search], chips: int) -> str:
  """The last line: 'fits: ...' or 'does not fit: ... per-chip batch N'."""
  if first.fits:
    return (f'fits: {first.memory["total"] / GiB:.2f} GiB per chip at '
            f'{first.per_chip} images per chip')
  need = (f'{first.memory["total"] / GiB:.2f} GiB'
          if 'total' in first.memory else 'more than HBM')
  if search and search.best:
    fix = (f'per-chip batch {search.best} fits (--config.train.'
           f'global_batch_size={search.best * chips})')
  else:
    fix = 'no per-chip batch fits (a smaller model or input?)'
  return (f'does not fit: {first.per_chip} images per chip need {need}; '
          f'{fix}')


# ----------------------------------------------------------- entry points


@dataclasses.dataclass(frozen=True)
class Check:
  """One check's compiles: the slice, the configured batch's, the search."""
  tpu: Slice
  first: Compiled
  search: Optional[Search]


def train_check(config: ml_collections.ConfigDict, topology: str, *,
                search: bool = True, max_compiles: int = 8) -> Check:
  """Compiles the train step of `config` for `topology` (no printing).

  Args:
    config: the training config (with the command's overrides).
    topology: e.g. 'v5e:4x4'.
    search: also find the largest per-chip batch that fits (always done
      when the configured batch does not fit).
    max_compiles: the search's budget of compiles.

  Raises:
    AotError, config_checks.ConfigError: one-line user errors.
  """
  tpu = describe_slice(topology)
  config_checks.check_train_config(config, tpu.chips, tpu.hosts)
  spec = keypoints.resolve_spec(config.data)
  per_chip = config.train.global_batch_size // tpu.chips
  compile_at = train_step_compiler(config, tpu, spec.num_joints)
  first = compile_at(per_chip)
  found = None
  if search or not first.fits:
    found = search_batch(compile_at, first, tpu.chip.hbm_gib * GiB,
                         max_compiles)
  return Check(tpu, first, found)


def check_train(config: ml_collections.ConfigDict, topology: str, *,
                search: bool = True, top_fusions: int = 0,
                hlo_out: str = '', max_compiles: int = 8,
                out: Callable[[str], None] = print) -> int:
  """train.py --aot_topology: compile the step, print the table.

  Args:
    config, topology, search, max_compiles: as train_check.
    top_fusions: print the N instructions that move the most bytes.
    hlo_out: write the compiled module's text there.
    out: where the report goes.

  Returns:
    0 fits, DOES_NOT_FIT_EXIT_CODE otherwise.

  Raises:
    AotError, config_checks.ConfigError: one-line user errors.
  """
  out(f'Compiling the train step for {topology}...')
  check = train_check(config, topology, search=search,
                      max_compiles=max_compiles)
  first = check.first
  out(train_report(config, check.tpu, first, check.search))
  if first.fits and top_fusions:
    out(f'\nThe {top_fusions} instructions of the compiled step that move '
        'the most bytes (per image; tiled = with TPU tile padding):')
    out(hlo_stats.format_top(hlo_stats.entry_traffic(first.hlo),
                             top_fusions, per=first.per_chip))
  if hlo_out and first.hlo:
    with open(hlo_out, 'w') as f:
      f.write(first.hlo)
  out(verdict(first, check.search, check.tpu.chips))
  return 0 if first.fits else DOES_NOT_FIT_EXIT_CODE


def eval_report(config: ml_collections.ConfigDict, tpu: Slice,
                image_hw: Tuple[int, int], first: Compiled,
                search: Optional[Search]) -> str:
  """The table of the eval check."""
  c, chip, test = first, tpu.chip, config.test
  sizes, base = eval_sizes(image_hw, test.input_size, test.scales)
  chips = sum(d.process_index == 0 for d in tpu.devices)
  per_scale = ', '.join(f'{s:g}: {h}x{w}' for s, (h, w) in zip(
      sorted(test.scales, reverse=True), sizes))
  rows = [
      ('topology', f'{tpu.name} ({chip.device_kind}): eval runs per host, '
                   f'on its {chips} chips'),
      ('images', f'{image_hw[0]}x{image_hw[1]} (HxW) -> inputs {per_scale} '
                 f'(HxW per scale), maps at {base[0]}x{base[1]}; flip '
                 f'{test.flip}; model.dtype {config.model.dtype}'),
      ('batch', f'per chip {c.per_chip} images'),
      ('per-chip memory', memory_line(c, chip.hbm_gib)),
  ]
  if search is not None:
    rows.append(('largest per-chip batch that fits',
                 f'{search.best} ({search.how})' if search.best else
                 search.how))
  if c.fits:
    rows += [
        ('per call', step_cost_line(c)),
        ('roofline', roofline_line(c, chip)),
        ('collectives', collectives_line(c)),
    ]
  rows.append(('compile time', f'{c.seconds:.0f} s' + (
      f' (all {len(search.tried)} compiles: '
      f'{sum(t.seconds for t in search.tried):.0f} s)' if search else '')))
  return format_table(rows)


def check_eval(config: ml_collections.ConfigDict, topology: str,
               spec: keypoints.KeypointSpec, *,
               image_hw: Tuple[int, int] = (480, 640),
               batch_size: Optional[int] = None,
               search: bool = False, top_fusions: int = 0,
               hlo_out: str = '', max_compiles: int = 8,
               out: Callable[[str], None] = print) -> int:
  """eval.py --aot_topology: compile eval's device program, print a table.

  Args:
    config: the eval config (config.model, config.test).
    topology: e.g. 'v5e:2x2'.
    spec: the keypoint spec (joint count, flip index).
    image_hw: the original image size (H, W); COCO's most common is
      480 x 640.
    batch_size: images per batch on a host (eval.py --batch_size; a
      multiple of its chips; default one per chip).
    search, top_fusions, hlo_out, max_compiles, out: as check_train.

  Returns:
    0 fits, DOES_NOT_FIT_EXIT_CODE otherwise.
  """
  tpu = describe_slice(topology)
  chips = sum(d.process_index == 0 for d in tpu.devices)
  batch_size = batch_size or chips
  if batch_size <= 0 or batch_size % chips:
    raise AotError(f'--batch_size={batch_size}: not a positive multiple of '
                   f'the {chips} chips of a {tpu.name} host')
  per_chip = batch_size // chips
  out(f'Compiling eval\'s forward for {tpu.name}, at '
      f'{per_chip} image(s) per chip, scales {tuple(config.test.scales)}...')
  compile_at = eval_forward_compiler(config, tpu, spec, image_hw)
  first = compile_at(per_chip)
  found = None
  if search or not first.fits:
    found = search_batch(compile_at, first, tpu.chip.hbm_gib * GiB,
                         max_compiles)
  out(eval_report(config, tpu, image_hw, first, found))
  if first.fits and top_fusions:
    out(f'\nThe {top_fusions} instructions that move the most bytes (per '
        'image):')
    out(hlo_stats.format_top(hlo_stats.entry_traffic(first.hlo),
                             top_fusions, per=per_chip))
  if hlo_out and first.hlo:
    with open(hlo_out, 'w') as f:
      f.write(first.hlo)
  if first.fits:
    out(f'fits: {first.memory["total"] / GiB:.2f} GiB per chip at '
        f'{per_chip} image(s) per chip')
    return 0
  best = found.best if found else 0
  out(f'does not fit: {per_chip} image(s) per chip; '
      + (f'per-chip batch {best} fits' if best else 'no batch fits'))
  return DOES_NOT_FIT_EXIT_CODE

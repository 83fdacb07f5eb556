r"""What the compile-only check compiles for: chips, their figures, slices.

A topology name is a TPU generation and its slice shape, as libtpu's
`jax.experimental.topologies.get_topology_desc` takes it ('v5e:4x4',
'v4:2x2x2', one device per chip), or a GPU and its hosts x GPUs per host
('h100:8', 'h100:2x8'), compiled by XLA:GPU from a target description
(the jax CUDA plugin, `pip install -e '.[cuda12]'`). `describe_slice`
gives the slice's devices without the hardware; `CHIPS` holds the
published per-chip figures the roofline uses.
"""

import dataclasses
import importlib.util
import re
from typing import Any, Optional, Tuple

import jax
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh

from ae_jax import sharding

GiB = 2**30


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

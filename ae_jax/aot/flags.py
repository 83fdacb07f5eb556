"""The --aot_* flags of train.py and eval.py (ae_jax.aot.compiler).

Importing this module defines them (absl flags, no JAX import, so --help
stays fast).
"""

import os

from absl import flags

TOPOLOGY = flags.DEFINE_string(
    'aot_topology', None, 'Compile only, for this TPU slice (e.g. v5e:4x4, '
    "v4:2x2x2, v5p:2x2x1, v6e:2x2) with libtpu (pip install -e '.[tpu]'), "
    'print per-chip memory, FLOPs, bytes, roofline and collectives; exit 0 '
    'if it fits, 2 if not. Trains / evaluates nothing.')
SEARCH = flags.DEFINE_bool(
    'aot_search', True, 'With --aot_topology: also find the largest '
    'per-chip batch that fits (a few more compiles; always when the '
    'configured batch does not fit).')
TOP_FUSIONS = flags.DEFINE_integer(
    'aot_top_fusions', 0, 'With --aot_topology: list the N instructions of '
    'the compiled program that move the most bytes.')
HLO_OUT = flags.DEFINE_string(
    'aot_hlo_out', '', 'With --aot_topology: write the compiled module '
    'text to this file.')


def prepare_environment() -> None:
  """Before JAX starts a backend: compile only, never hold a chip.

  JAX_PLATFORMS=cpu keeps the process off any local accelerator (a TPU
  VM's chips may be training; the topology's devices need no backend);
  ALLOW_MULTIPLE_LIBTPU_LOAD lets libtpu load beside another process that
  holds its lock file.
  """
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

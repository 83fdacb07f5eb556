r"""train.py / eval.py --aot_topology: compile, then one table and a verdict.

The compiling is ae_jax.aot.compiler's, the slices ae_jax.aot.targets';
this module runs a check and prints what the compiler said (memory against
HBM, the largest per-chip batch that fits, FLOPs, bytes, the roofline
bound, collectives, compile time) and returns the exit status: 0 fits,
DOES_NOT_FIT_EXIT_CODE (2) does not fit, the last line naming the per-chip
batch that would.
"""

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import ml_collections

from ae_jax import config_checks
from ae_jax import keypoints
from ae_jax.aot import compiler
from ae_jax.aot import hlo_stats
from ae_jax.aot import targets
from ae_jax.aot.compiler import Compiled
from ae_jax.aot.compiler import Search
from ae_jax.aot.hlo_stats import GiB
from ae_jax.aot.targets import Chip
from ae_jax.aot.targets import Slice
from ae_jax.aot.targets import describe_slice
from ae_jax.data import coco

DOES_NOT_FIT_EXIT_CODE = 2


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
  return f'{hlo_stats.memory_text(m)} of {hbm_gib:.3g} GiB HBM: fits'


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


def _result_rows(c: Compiled, chip: Chip, search: Optional[Search],
                 cost: str, collectives: str) -> List[Tuple[str, str]]:
  """The rows both checks end with: the search, cost, roofline and
  collectives (when it fits) and the compile time; `cost` and
  `collectives` name their rows."""
  rows = []
  if search is not None:
    rows.append(('largest per-chip batch that fits',
                 f'{search.best} ({search.how})' if search.best else
                 search.how))
  if c.fits:
    rows += [(cost, step_cost_line(c)), ('roofline', roofline_line(c, chip)),
             (collectives, collectives_line(c))]
  rows.append(('compile time', f'{c.seconds:.0f} s' + (
      f' (all {len(search.tried)} compiles: '
      f'{sum(t.seconds for t in search.tried):.0f} s)' if search else '')))
  return rows


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
  return format_table(rows + _result_rows(c, chip, search, 'per chip-step',
                                         'collectives per step'))


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


def _print(line: str) -> None:
  print(line, flush=True)  # progress shows while the next compile runs


def _reporting(compile_at: Callable[[int], Compiled],
               progress: Optional[Callable[[str], None]]
               ) -> Callable[[int], Compiled]:
  """`compile_at` that tells `progress` about each compile as it ends."""
  if progress is None:
    return compile_at

  def compile_and_report(per_chip: int) -> Compiled:
    c = compile_at(per_chip)
    what = (f'{c.memory["total"] / GiB:.2f} GiB, fits' if c.fits else
            'does not fit')
    progress(f'  per-chip batch {per_chip}: {what} ({c.seconds:.0f} s)')
    return c

  return compile_and_report


def train_check(config: ml_collections.ConfigDict, topology: str, *,
                search: bool = True, max_compiles: int = 8,
                progress: Optional[Callable[[str], None]] = None) -> Check:
  """Compiles the train step of `config` for `topology` (no printing).

  Args:
    config: the training config (with the command's overrides).
    topology: e.g. 'v5e:4x4'.
    search: also find the largest per-chip batch that fits (always done
      when the configured batch does not fit).
    max_compiles: the search's budget of compiles.
    progress: called with one line per compile as it ends (a search of
      the paper config takes several 4-15 min compiles).

  Raises:
    targets.AotError, config_checks.ConfigError: one-line user errors.
  """
  tpu = describe_slice(topology)
  config_checks.check_train_config(config, tpu.chips, tpu.hosts)
  spec = coco.resolve_spec(config.data)
  per_chip = config.train.global_batch_size // tpu.chips
  compile_at = _reporting(compiler.train_step_compiler(
      config, tpu, spec.num_joints), progress)
  first = compile_at(per_chip)
  found = None
  if search or not first.fits:
    found = compiler.search_batch(compile_at, first,
                                     tpu.chip.hbm_gib * GiB, max_compiles)
  return Check(tpu, first, found)


def check_train(config: ml_collections.ConfigDict, topology: str, *,
                search: bool = True, top_fusions: int = 0,
                hlo_out: str = '', max_compiles: int = 8,
                out: Optional[Callable[[str], None]] = None) -> int:
  """train.py --aot_topology: compile the step, print the table.

  Args:
    config, topology, search, max_compiles: as train_check.
    top_fusions: print the N instructions that move the most bytes.
    hlo_out: write the compiled module's text there.
    out: where the report and the progress lines go (default: print).

  Returns:
    0 fits, DOES_NOT_FIT_EXIT_CODE otherwise.

  Raises:
    targets.AotError, config_checks.ConfigError: one-line user errors.
  """
  out = out or _print
  out(f'Compiling the train step for {topology}...')
  check = train_check(config, topology, search=search,
                      max_compiles=max_compiles, progress=out)
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
  sizes, base = compiler.eval_sizes(image_hw, test.input_size,
                                       test.scales)
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
  return format_table(rows + _result_rows(c, chip, search, 'per call',
                                         'collectives'))


def check_eval(config: ml_collections.ConfigDict, topology: str,
               spec: keypoints.KeypointSpec, *,
               image_hw: Tuple[int, int] = (480, 640),
               batch_size: Optional[int] = None,
               search: bool = False, top_fusions: int = 0,
               hlo_out: str = '', max_compiles: int = 8,
               out: Optional[Callable[[str], None]] = None) -> int:
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
  out = out or _print
  tpu = describe_slice(topology)
  chips = sum(d.process_index == 0 for d in tpu.devices)
  batch_size = batch_size or chips
  if batch_size <= 0 or batch_size % chips:
    raise targets.AotError(
        f'--batch_size={batch_size}: not a positive multiple of the '
        f'{chips} chips of a {tpu.name} host')
  per_chip = batch_size // chips
  out(f'Compiling eval\'s forward for {tpu.name}, at '
      f'{per_chip} image(s) per chip, scales {tuple(config.test.scales)}...')
  compile_at = _reporting(compiler.eval_forward_compiler(
      config, tpu, spec, image_hw), out)
  first = compile_at(per_chip)
  found = None
  if search or not first.fits:
    found = compiler.search_batch(compile_at, first,
                                     tpu.chip.hbm_gib * GiB, max_compiles)
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

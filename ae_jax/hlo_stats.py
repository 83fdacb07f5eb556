"""Counts read off a compiled XLA module's text (`compiled.as_text()`).

Used by ae_jax.aot_compile for the TPU programs it compiles ahead of time:
the collectives by kind with the bytes they move, and the instructions of
the entry computation that move the most bytes (the fusions to cut on a
memory-bound step). Shapes in the text carry XLA's layouts, e.g.
`bf16[48,256,256,32]{3,2,1,0:T(8,128)(2,1)}`: on TPU the minor dimensions
are stored in tiles (8 x 128 for 32-bit types, (16, 128) packed for
bfloat16), so a [..., 32] array padded to 128 lanes occupies 4x its
logical bytes; `shape_bytes` gives both. `S(1)` marks on-chip memory
(VMEM), which moves no HBM bytes.

Legend: `instruction` is one line `%name = SHAPE opcode(%a, %b), attrs`.
"""

import collections
import dataclasses
import math
import re
from typing import Dict, List, Sequence, Tuple

DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2,
               'u16': 2, 'f16': 2, 'bf16': 2, 'f8e4m3fn': 1, 'f8e5m2': 1,
               's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
               'c64': 8, 'c128': 16}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
               'collective-permute', 'collective-broadcast')
# Instructions that move no data of their own.
_FREE = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant',
         'after-all', 'partition-id', 'replica-id', 'copy-done',
         'all-reduce-done', 'all-gather-done', 'collective-permute-done',
         'async-done', 'slice-done', 'send-done', 'recv-done', 'opt-barrier'}

_ARRAY = re.compile(r'\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*)$')
_OP = re.compile(r'^([a-z][a-z0-9-]*)\((.*)$')


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One instruction of a computation.

  Attributes:
    name: without the '%'.
    opcode: e.g. 'fusion', 'all-reduce-start', 'convolution'.
    shape: its result shape text (a tuple in parentheses, or one array).
    operands: the operand names, in order.
    attrs: the text after the operand list (kind=, calls=, metadata=...).
  """
  name: str
  opcode: str
  shape: str
  operands: Tuple[str, ...]
  attrs: str

  @property
  def op_name(self) -> str:
    """The JAX source op of the instruction (metadata op_name), or ''."""
    m = re.search(r'op_name="([^"]*)"', self.attrs)
    return m.group(1) if m else ''

  @property
  def fusion_kind(self) -> str:
    """kLoop / kInput / kOutput / kCustom for a fusion, else ''."""
    m = re.search(r'\bkind=(k[A-Za-z]+)', self.attrs)
    return m.group(1) if m else ''


def shape_bytes(shape: str, padded: bool = False) -> int:
  """Bytes of every array in a shape text (a tuple counts all its arrays).

  Args:
    shape: e.g. 'f32[8,128]{1,0:T(8,128)}' or '(f32[8], u32[])'.
    padded: apply the first tile of each layout (TPU), i.e. count the
      bytes the array occupies rather than its logical bytes.
  """
  total = 0.0
  for dtype, dims, layout in _ARRAY.findall(shape):
    sizes = [int(d) for d in dims.split(',') if d]
    if padded and layout:
      sizes = _tiled(sizes, layout)
    total += DTYPE_BYTES.get(dtype, 4) * math.prod(sizes)
  return int(total)


def _tiled(sizes: List[int], layout: str) -> List[int]:
  """`sizes` rounded up to the layout's first tile (minor dims)."""
  m = re.match(r'\{([0-9,]*)(?::(.*))?\}', layout)
  if not m or not m.group(2) or not sizes:
    return sizes
  tile = re.search(r'T\(([0-9,]+)\)', m.group(2))
  minor_to_major = [int(d) for d in m.group(1).split(',') if d]
  if not tile or len(minor_to_major) != len(sizes):
    return sizes
  tile_dims = [int(t) for t in tile.group(1).split(',')]
  physical = list(reversed(minor_to_major))  # major -> minor
  out = list(sizes)
  for t, dim in zip(reversed(tile_dims), reversed(physical)):
    out[dim] = -(-out[dim] // t) * t
  return out


def _split_shape(rest: str) -> Tuple[str, str]:
  """'SHAPE opcode(...)...' -> (SHAPE, 'opcode(...)...')."""
  if rest.startswith('('):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {'(': 1, ')': -1}.get(ch, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(' ')
  return shape, tail


def parse_computations(hlo_text: str) -> Dict[str, List[Instruction]]:
  """Computation name -> its instructions; the entry one is '__entry__'."""
  comps: Dict[str, List[Instruction]] = {}
  current = None
  for line in hlo_text.splitlines():
    if not line.startswith(' '):
      m = re.match(r'^(ENTRY\s+)?%(\S+)\s*\(', line)
      if m:
        current = '__entry__' if m.group(1) else m.group(2)
        comps[current] = []
      elif line.startswith('}'):
        current = None
      continue
    m = _INSTR.match(line)
    if current is None or not m:
      continue
    shape, tail = _split_shape(m.group(2))
    op = _OP.match(tail)
    if not op:
      continue
    depth, end = 1, 0
    body = op.group(2)
    for end, ch in enumerate(body):
      depth += {'(': 1, ')': -1}.get(ch, 0)
      if depth == 0:
        break
    operands = tuple(re.findall(r'%([^\s,()]+)', body[:end]))
    comps[current].append(Instruction(m.group(1), op.group(1), shape,
                                      operands, body[end + 1:]))
  return comps


def collectives(hlo_text: str) -> Dict[str, Tuple[int, int]]:
  """Collective kind -> (count, bytes of their results) in the module.

  Synchronous ops and the `-start` halves of asynchronous ones count once
  (`all-reduce` and `all-reduce-start` are both 'all-reduce'); a
  combined collective over a tuple counts once with the tuple's bytes.
  For an all-reduce the bytes are the reduced arrays; for an all-gather
  the gathered result.
  """
  out: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0])
  for instrs in parse_computations(hlo_text).values():
    for ins in instrs:
      kind = ins.opcode[:-len('-start')] if ins.opcode.endswith(
          '-start') else ins.opcode
      if kind not in COLLECTIVES:
        continue
      shape = ins.shape
      if ins.opcode.endswith('-start') and kind != 'all-reduce':
        # (operands, results[, context]): count the results.
        arrays = _top_level(shape)
        shape = arrays[1] if len(arrays) > 1 else shape
      out[kind][0] += 1
      out[kind][1] += shape_bytes(shape)
  return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def _top_level(shape: str) -> List[str]:
  """The top-level elements of a tuple shape text."""
  if not shape.startswith('('):
    return [shape]
  parts, depth, start = [], 0, 1
  for i, ch in enumerate(shape):
    if ch in '({[':
      depth += 1
    elif ch in ')}]':
      depth -= 1
    if (ch == ',' and depth == 1) or (ch == ')' and depth == 0):
      parts.append(shape[start:i].strip())
      start = i + 1
  return parts


@dataclasses.dataclass(frozen=True)
class Traffic:
  """Bytes one entry instruction reads and writes.

  Attributes:
    name, opcode, kind: the instruction, e.g. 'fusion.12', 'fusion', 'kOutput'.
    root: the opcode at the root of a fusion's computation ('' otherwise).
    convolution: whether a fusion's computation holds a convolution.
    op_name: the JAX op it came from (metadata).
    shape: its result shape text.
    nbytes: logical bytes of its operands and result.
    padded: the same with TPU tile padding.
  """
  name: str
  opcode: str
  kind: str
  root: str
  convolution: bool
  op_name: str
  shape: str
  nbytes: int
  padded: int


def entry_traffic(hlo_text: str) -> List[Traffic]:
  """Bytes per instruction of the entry computation, largest first.

  Operands and results in on-chip memory (S(1) layouts) count zero; a
  fusion that reads a slice of an operand is counted with the whole
  operand (an upper bound, as XLA's own 'bytes accessed' per operand).
  """
  comps = parse_computations(hlo_text)
  entry = comps.get('__entry__', [])
  shapes = {ins.name: ins.shape for ins in entry}
  out = []
  for ins in entry:
    if ins.opcode in _FREE:
      continue
    texts = [ins.shape] + [shapes.get(o, '') for o in ins.operands]
    texts = [_drop_vmem(t) for t in texts]
    called = re.search(r'calls=%([^\s,]+)', ins.attrs)
    body = comps.get(called.group(1), []) if called else []
    root = body[-1].opcode if body else ''
    conv = any(b.opcode == 'convolution' for b in body)
    out.append(Traffic(
        ins.name, ins.opcode, ins.fusion_kind, root, conv, ins.op_name,
        ins.shape, sum(shape_bytes(t) for t in texts),
        sum(shape_bytes(t, padded=True) for t in texts)))
  return sorted(out, key=lambda t: -t.padded)


def _drop_vmem(shape: str) -> str:
  """The shape text without its on-chip (S(1)) arrays."""
  arrays = _top_level(shape) if shape.startswith('(') else [shape]
  return ', '.join(a for a in arrays if 'S(1)' not in a)


def short_op_name(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(AEModel))/backbone/layer2_0/conv_0/..'
  -> 'bwd backbone/layer2_0/conv_0/..' (fwd / bwd / the rest)."""
  parts = op_name.split('/')
  if parts and parts[0].startswith('jit('):
    parts = parts[1:]
  where = ''
  if parts and parts[0].startswith('transpose('):
    where, parts = 'bwd ', parts[1:]
  elif parts and parts[0].startswith('jvp('):
    where, parts = 'fwd ', parts[1:]
  return where + '/'.join(parts)


def format_top(traffic: Sequence[Traffic], n: int, per: float = 1.0,
               unit: str = 'MB') -> str:
  """A markdown table of the `n` instructions that move the most bytes.

  Args:
    traffic: entry_traffic's list.
    n: rows.
    per: divide bytes by this (e.g. the images per chip: bytes per image).
    unit: 'MB' (1e6 bytes).
  """
  total = sum(t.padded for t in traffic) or 1
  lines = [f'| # | instruction | kind | {unit} (tiled) | {unit} (logical) | '
           '% of total | largest result | source op |',
           '|---|---|---|---|---|---|---|---|']
  for i, t in enumerate(traffic[:n], 1):
    kind = t.kind or t.opcode
    if t.convolution:
      kind += ' conv'
    elif t.root:
      kind += f' {t.root}'
    arrays = _top_level(t.shape) if t.shape.startswith('(') else [t.shape]
    result = _ARRAY.search(max(arrays, key=shape_bytes))  # the largest
    res = f'{result.group(1)}[{result.group(2)}]' if result else t.shape[:40]
    lines.append(f'| {i} | {t.name} | {kind} | {t.padded / per / 1e6:.1f} | '
                 f'{t.nbytes / per / 1e6:.1f} | {100 * t.padded / total:.1f} '
                 f'| {res} | {short_op_name(t.op_name)[:70]} |')
  return '\n'.join(lines)

"""Grouping's device half: NMS'd top-k candidates (mmpose HeatmapParser).

`top_candidates` (jnp; jit, vmap and jax2tf friendly) does mmpose's
kernel x kernel max-pool NMS and keeps the top `max_people` peaks per joint
(ties: lower flat index first, as lax.top_k), their tags and the 4
neighbour heat values that adjust reads: only these cross to the host,
where decode.decode_candidates groups them. The NMS is written as shifted
maxima, not lax.reduce_window, so that an ONNX export of it runs
(onnxruntime rejects the MaxPool that reduce_window converts to); top_k
first picks the best chunks of each row, so that the final top_k sorts a
few thousand values instead of H x W (bench/RESULTS_eval.md).

Legend: K joints, H x W map, L tag dim, M = max_people.
"""

import functools

import jax
import jax.numpy as jnp

from ae_jax.infer import decode

_CHUNK = 128  # values per chunk of top_k's first pass


def _window_max(x: jnp.ndarray, axis: int, kernel: int):
  """Max over a centred window of `kernel` lines along `axis`, clipped at
  the border (= -inf padding), as pieces.

  Shifted maxima: the interior is an elementwise max of slices of the
  unpadded array (it vectorises; a -inf pad inside the fusion does not),
  each of the (kernel - 1) / 2 border lines per side its own short max.

  Returns:
    [(start, stop, max of lines start:stop)] in order, covering the axis.
  """
  pad, size = (kernel - 1) // 2, x.shape[axis]
  part = functools.partial(jax.lax.slice_in_dim, x, axis=axis)

  def line(i, start, stop):  # output line i: the max of lines start:stop
    return i, i + 1, part(start, stop).max(axis=axis, keepdims=True)

  if isinstance(size, int) and size <= 2 * pad:  # no interior line
    return [line(i, max(0, i - pad), min(size, i + pad + 1))
            for i in range(size)]
  # (size may be symbolic, as in a shape-polymorphic export: > 2 * pad.)
  inner = functools.reduce(jnp.maximum, [
      part(d, size - 2 * pad + d) for d in range(kernel)])
  return ([line(i, 0, i + pad + 1) for i in range(pad)] +
          [(pad, size - pad, inner)] +
          [line(size - pad + j, size - 2 * pad + j, size)
           for j in range(pad)])


def nms(heat: jnp.ndarray, kernel: int) -> jnp.ndarray:
  """[K, H, W] heat where it is the max of its kernel x kernel window, else
  -inf (mmpose: torch MaxPool2d(kernel, 1, (kernel - 1) // 2) == heat).

  Separable (rows, then columns); the comparison is made piece by piece of
  the column pass, before one concatenation (comparing after it keeps XLA:
  CPU from vectorising the pieces).
  """
  rows = jnp.concatenate([m for _, _, m in _window_max(heat, 1, kernel)],
                         axis=1)
  out = []
  for start, stop, pooled in _window_max(rows, 2, kernel):
    h = jax.lax.slice_in_dim(heat, start, stop, axis=2)
    out.append(jnp.where(pooled == h, h, -jnp.inf))
  return jnp.concatenate(out, axis=2)


def top_k(x: jnp.ndarray, k: int, chunk: int = _CHUNK):
  """lax.top_k of the rows of x [R, N] (ties: lower index first), exactly.

  Over the best chunks: the rows in chunks of `chunk` values, the k chunks
  with the highest maxima (ties: lower chunk first) hold the k highest
  values (a value outside them has k chunk maxima, hence k values, ranked
  above it), so only k x chunk values per row go to the final top_k, in
  flat order so that ties break as lax.top_k's. Compiled top_k over the
  whole rows is a partial sort on XLA:CPU; chunk maxima vectorise.

  Returns:
    values [R, k] descending, indices [R, k] int32.
  """
  rows, n = x.shape
  if not isinstance(n, int) or -(-n // chunk) <= 2 * k:
    return jax.lax.top_k(x, k)  # a symbolic size, or little to skip
  groups = -(-n // chunk)
  if groups * chunk != n:
    x = jnp.pad(x, ((0, 0), (0, groups * chunk - n)),
                constant_values=-jnp.inf)
  blocks = x.reshape(rows, groups, chunk)
  _, best = jax.lax.top_k(blocks.max(axis=2), k)
  best = -jax.lax.top_k(-best, k)[0]  # ascending (top_k: no sort op)
  values = jnp.take_along_axis(blocks, best[..., None], axis=1)
  val, pos = jax.lax.top_k(values.reshape(rows, k * chunk), k)
  return val, jnp.take_along_axis(best, pos // chunk, axis=1) * chunk + (
      pos % chunk)


def top_candidates(heat: jnp.ndarray, tags: jnp.ndarray, max_people: int,
                   nms_kernel: int = 5,
                   by_sort: bool = False) -> decode.Candidates:
  """heat [K, H, W], tags [K, H, W, L] -> decode.Candidates (M = max_people).

  by_sort: a stable full sort instead of lax.top_k (same result), for
  jax2tf: lax.top_k lowers to a StableHLO composite that TF's XlaCallModule
  cannot read.
  """
  num_joints, height, width = heat.shape
  peaks = nms(heat, nms_kernel).reshape(num_joints, -1)
  if by_sort:
    iota = jax.lax.broadcasted_iota(jnp.int32, peaks.shape, 1)
    neg, idx = jax.lax.sort((-peaks, iota), dimension=1, is_stable=True,
                            num_keys=1)
    val, idx = -neg[:, :max_people], idx[:, :max_people]
  else:
    val, idx = top_k(peaks, max_people)  # [K, M]
  y, x = idx // width, idx % width
  flat_heat = heat.reshape(num_joints, -1)
  tag = jnp.take_along_axis(
      tags.reshape(num_joints, height * width, -1), idx[..., None], axis=1)

  def at(yy, xx):
    return jnp.take_along_axis(flat_heat, yy * width + xx, axis=1)

  neighbors = jnp.stack([
      at(jnp.minimum(height - 1, y + 1), x), at(jnp.maximum(0, y - 1), x),
      at(y, jnp.minimum(width - 1, x + 1)), at(y, jnp.maximum(0, x - 1))], -1)
  return decode.Candidates(val=val, idx=idx.astype(jnp.int32), tag=tag,
                           neighbors=neighbors)

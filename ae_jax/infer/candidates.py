"""Grouping's device half: NMS'd top-k candidates (mmpose HeatmapParser).

`top_candidates` (jnp; jit, vmap and jax2tf friendly) does mmpose's
kernel x kernel max-pool NMS and keeps the top `max_people` peaks per joint
(ties: lower flat index first, as lax.top_k), their tags and the 4
neighbour heat values that adjust reads: only these cross to the host,
where decode.decode_candidates groups them. The NMS is written as shifted
maxima, not lax.reduce_window, so that an ONNX export of it runs
(onnxruntime rejects the MaxPool that reduce_window converts to).

Legend: K joints, H x W map, L tag dim, M = max_people.
"""

import functools

import jax
import jax.numpy as jnp

from ae_jax.infer import decode


def _max_pool(heat: jnp.ndarray, kernel: int) -> jnp.ndarray:
  """kernel x kernel max over [K, H, W], -inf padded: torch MaxPool2d(k, 1).

  Separable (rows, then columns): equal to lax.reduce_window, about 4x
  faster on XLA:CPU.
  """
  pad = (kernel - 1) // 2
  out = heat
  for axis in (1, 2):
    widths = [(0, 0)] * 3
    widths[axis] = (pad, pad)
    padded = jnp.pad(out, widths, constant_values=-jnp.inf)
    size = heat.shape[axis]
    out = functools.reduce(jnp.maximum, [
        jax.lax.slice_in_dim(padded, d, d + size, axis=axis)
        for d in range(kernel)])
  return out


def top_candidates(heat: jnp.ndarray, tags: jnp.ndarray, max_people: int,
                   nms_kernel: int = 5,
                   by_sort: bool = False) -> decode.Candidates:
  """heat [K, H, W], tags [K, H, W, L] -> decode.Candidates (M = max_people).

  by_sort: a stable full sort instead of lax.top_k (same result), for
  jax2tf: lax.top_k lowers to a StableHLO composite that TF's XlaCallModule
  cannot read.
  """
  num_joints, height, width = heat.shape
  pooled = _max_pool(heat, nms_kernel)
  nms = jnp.where(pooled == heat, heat, -jnp.inf).reshape(num_joints, -1)
  if by_sort:
    iota = jax.lax.broadcasted_iota(jnp.int32, nms.shape, 1)
    neg, idx = jax.lax.sort((-nms, iota), dimension=1, is_stable=True,
                            num_keys=1)
    val, idx = -neg[:, :max_people], idx[:, :max_people]
  else:
    val, idx = jax.lax.top_k(nms, max_people)  # [K, M]
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

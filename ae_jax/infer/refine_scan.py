"""Refine's argmax as one jitted scan over all (person, missing joint) pairs.

For query q = (joint k, mean tag t_q) the answer is mmpose's
  argmax over pixels of  heat_k - round(sqrt(sum_l (tag_k[l] - t_q[l])^2))
in float32 (numpy's operation order, round half to even), the first
maximum in row-major order; with the heat at that pixel and at its 4
neighbours (for refine's quarter offsets). The maps stay on their device;
only the queries and [Q] / [Q, 5] results cross.

Exactness: XLA:CPU (and GPU) contract a * a + b * b into an FMA, which
rounds differently from numpy; each square passes through an integer OR
with a runtime zero (`zero`) that no compiler can see through, so squares
and sums round as in numpy. max is exact in any order; the first index is
found by recomputing one row group (below), so ties follow numpy's argmax.

Layout: the queries in slots per joint, [J, S]; one pass scores chunk C
of every joint's slots over its whole map (a fori_loop runs over the
max(queries per joint) / C passes: no Python loop over people or joints,
one compile per padded shape). The map's rows in groups of _ROWS: a tree
of elementwise maxima over each group's rows (XLA:CPU vectorises
elementwise fusions well and fused reductions poorly) gives per-group
column maxima [J, G, C, W], reduced to the max; the first group holding it
is rescored in full to find the first pixel. Memory: O(J x C x H x W /
_ROWS) whatever the number of people.

Numpy maps (refine.argmax_queries_host passes `scan_flat` for its large
scans) are read by XLA:CPU from a reused aligned buffer (no device_put
copy, no fresh pages).

Legend: K joints, J joints scanned, H x W map, L tag dim, Q queries,
S slots per joint, C queries per chunk, G row groups.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ae_jax.infer import refine

# Rows per group of the first tree; queries scored per pass over a map
# (per query, 4 costs as 8 does and pads less: bench/RESULTS_eval.md).
_ROWS = 8
CHUNK = 4


def _tree(fn, xs):
  """fn-reduction of a list of arrays as a balanced tree."""
  while len(xs) > 1:
    xs = [fn(xs[i], xs[i + 1]) if i + 1 < len(xs) else xs[i]
          for i in range(0, len(xs), 2)]
  return xs[0]


def _score(heat, tags, mean, zero):
  """heat - round(|tags - mean|), numpy's float32 operations.

  heat [...], tags: L arrays [...], mean [L] broadcastable, zero int32 0.
  """
  total = None
  for l, tag in enumerate(tags):
    d = tag - mean[l]
    sq = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(d * d, jnp.int32) | zero, jnp.float32)
    total = sq if total is None else total + sq
  return heat - jnp.round(jnp.sqrt(total))


def _chunk_argmax(heat, tags, means, zero):
  """First flat argmax per query.

  heat [J, H, W], tags: L arrays [J, H, W], means [J, C, L] -> [J, C] int32.
  """
  height, width = heat.shape[1:]
  rows = min(_ROWS, height)
  groups, tail = divmod(height, rows)
  mean = [means[:, None, :, l, None] for l in range(means.shape[2])]

  def group_max(start, num):  # [J, num, C, W]: max over `rows` rows
    sl = lambda x, r: x[:, start + r:start + num * rows:rows, None]
    return _tree(jnp.maximum, [
        _score(sl(heat, r), [sl(t, r) for t in tags], mean, zero)
        for r in range(rows)])

  per_group = group_max(0, groups)
  if tail:  # the last `rows` rows as one more group (overlap is harmless)
    per_group = jnp.concatenate([per_group, group_max(height - rows, 1)], 1)
  best = per_group.max(axis=(1, 3))  # [J, C]
  first = jnp.argmax((per_group == best[:, None, :, None]).any(axis=3),
                     axis=1)  # [J, C] first group holding the max
  # Rows of that group (the tail group ends at the last row); earlier rows
  # hold no maximum, so the first maximum among them is the answer.
  start = jnp.minimum(first * rows, height - rows).astype(jnp.int32)

  def window(j, m, s, b):
    pick = lambda x: jax.lax.dynamic_slice(x, (j, s, 0), (1, rows, width))
    hit = (_score(pick(heat), [pick(t) for t in tags], m, zero) == b)
    hit = hit.reshape(-1)
    index = jnp.arange(hit.size, dtype=jnp.int32)
    return s * width + jnp.min(jnp.where(hit, index, hit.size))

  num_j, num_c = means.shape[:2]
  j = jnp.broadcast_to(jnp.arange(num_j, dtype=jnp.int32)[:, None],
                       (num_j, num_c))
  return jax.vmap(window)(j.reshape(-1), means.reshape(num_j * num_c, -1),
                          start.reshape(-1), best.reshape(-1)).reshape(
                              num_j, num_c)


@functools.partial(jax.jit, static_argnames=('chunk',))
def _scan(heat, tags, means, num_chunks, zero, *, chunk):
  """Per joint and slot: flat argmax [J, S] int32, heat there [J, S, 5].

  heat [J, H, W], tags [J, H, W, L], means [J, S, L] (S a multiple of
  chunk); slots of chunks >= num_chunks are left 0.
  """
  num_j, height, width = heat.shape
  tag_planes = [tags[..., l] for l in range(tags.shape[-1])]

  def body(c, flat):
    m = jax.lax.dynamic_slice_in_dim(means, c * chunk, chunk, 1)
    return jax.lax.dynamic_update_slice_in_dim(
        flat, _chunk_argmax(heat, tag_planes, m, zero), c * chunk, 1)

  flat = jax.lax.fori_loop(0, num_chunks, body,
                           jnp.zeros(means.shape[:2], jnp.int32))
  y, x = flat // width, flat % width
  hk = heat.reshape(num_j, 1, -1)

  def at(yy, xx):
    return jnp.take_along_axis(hk, (yy * width + xx)[:, :, None], 2)[..., 0]

  vals = jnp.stack([
      at(y, x), at(y, jnp.minimum(width - 1, x + 1)),
      at(y, jnp.maximum(0, x - 1)), at(jnp.minimum(height - 1, y + 1), x),
      at(jnp.maximum(0, y - 1), x)], -1)
  return flat, vals


def _to_device(x, rows: np.ndarray | None, name: str):
  """x[rows] (all of x if rows is None) as a jax array on its device.

  A numpy x is copied into a reused 64-byte aligned buffer of this thread
  (unless x is aligned and whole), which XLA:CPU then reads without a copy
  and without fresh pages: much cheaper than device_put's copy.
  """
  if isinstance(x, jax.Array):
    return x if rows is None else x[rows]
  x = np.asarray(x, np.float32)
  if rows is None and x.flags.c_contiguous and x.ctypes.data % 64 == 0:
    return jax.device_put(x)
  view = refine.aligned_buffer(name, x.shape if rows is None else
                        (rows.size,) + x.shape[1:])
  if rows is None:
    np.copyto(view, x)
  else:
    np.take(x, rows, axis=0, out=view)
  return jax.device_put(view)


def argmax_queries(heat, tags, joint: np.ndarray, mean_tags: np.ndarray,
                   chunk: int | None = None,
                   stats: dict | None = None) -> refine.Argmax:
  """Refine's argmax for queries (joint [Q], mean_tags [Q, L]), any order.

  Args:
    heat: [K, H, W] float32 maps (jax array on its device, or numpy).
    tags: [K, H, W, L] float32.
    joint: [Q] joint index of each query.
    mean_tags: [Q, L] float32 mean tag of the query's person.
    chunk: queries per map pass (default CHUNK).
    stats: if given, 'bytes_to_host' grows by the bytes of the results.

  Returns:
    refine.Argmax (numpy).
  """
  joint = np.asarray(joint, np.int64)
  mean_tags = np.asarray(mean_tags, np.float32)
  num = joint.size
  active, slot_joint = np.unique(joint, return_inverse=True)
  # Slot of each query among its joint's queries, in query order.
  order = np.argsort(slot_joint, kind='stable')
  counts = np.bincount(slot_joint, minlength=active.size)
  slot = np.empty(num, np.int64)
  slot[order] = np.arange(num) - np.repeat(np.cumsum(counts) - counts,
                                           counts)
  chunk = chunk or CHUNK
  num_chunks = -(-int(counts.max(initial=0)) // chunk)
  # Slots padded to a power of 2 chunks, so that few shapes compile.
  slots = chunk * (1 << max(0, num_chunks - 1).bit_length())
  means = np.zeros((active.size, slots, mean_tags.shape[1]), np.float32)
  means[slot_joint, slot] = mean_tags
  if active.size <= heat.shape[0] // 2:  # scan only joints with queries
    # (their number padded to a power of 2 by repeats: few shapes compile)
    rows = np.resize(active, 1 << (active.size - 1).bit_length())
    means = np.concatenate([means, np.zeros(
        (rows.size - active.size,) + means.shape[1:], np.float32)])
  else:  # all joints, slots of those without queries left empty
    rows = None
    full = np.zeros((heat.shape[0],) + means.shape[1:], np.float32)
    full[active] = means
    means, slot_joint = full, active[slot_joint]
  # (The buffers are reused by this thread's next call: the results are
  # fetched, and the arrays that alias them dropped, before it.)
  heat, tags = _to_device(heat, rows, 'heat'), _to_device(tags, rows, 'tags')
  flat, vals = jax.device_get(_scan(heat, tags, means, np.int32(num_chunks),
                                    np.int32(0), chunk=chunk))
  del heat, tags
  if stats is not None:
    stats['bytes_to_host'] = (stats.get('bytes_to_host', 0) + flat.nbytes +
                              vals.nbytes)
  return refine.Argmax(flat[slot_joint, slot].astype(np.int64),
                       vals[slot_joint, slot])


def scan_flat(heat, tags, joint: np.ndarray,
              mean_tags: np.ndarray) -> np.ndarray:
  """refine.ScanFn: argmax_queries' flat [Q] (for argmax_queries_host)."""
  return argmax_queries(heat, tags, joint, mean_tags).flat


def device_argmax(heat: jax.Array, tags: jax.Array,
                  stats: dict | None = None) -> refine.ArgmaxFn:
  """refine.ArgmaxFn over one image's maps on their device.

  heat [K, H, W], tags [K, H, W, L] jax arrays; `stats['bytes_to_host']`
  (if given) grows by each call's results.
  """
  return functools.partial(argmax_queries, heat, tags, stats=stats)

"""NMS'd top-k candidates on the device; the rest of grouping on the host.

mmpose's HeatmapParser.parse in two halves, so that only what grouping
reads crosses to the host:
- `top_candidates` (jnp, jit/vmap/jax2tf friendly): kernel x kernel max-pool
  NMS, the top `max_people` peaks per joint (ties: lower flat index first,
  as lax.top_k and grouping.find_candidates), their tags and the 4
  neighbour heat values that `adjust` reads.
- `group_candidates` (numpy): threshold, tag matching
  (grouping.match_candidates), adjust from the neighbour values, score, and
  refine (refine.refine_poses: a jitted scan where the maps are, so only
  its queries and results cross).
The result equals grouping.group_poses on the full maps.

Legend: K joints, H x W map, L tag dim, M = max_people.
Candidates (one image): val [K, M] float32 descending, idx [K, M] int32
flat index y * W + x, tag [K, M, L], neighbors [K, M, 4] float32 heat at
(y+1, x), (y-1, x), (y, x+1), (y, x-1), clipped at the border.
"""

import functools
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ae_jax.infer import grouping as grouping_lib
from ae_jax.infer import refine as refine_lib

Candidates = Dict[str, np.ndarray]


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
                   by_sort: bool = False) -> Dict[str, jnp.ndarray]:
  """Device half: heat [K, H, W], tags [K, H, W, L] -> candidates (above).

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
  return {'val': val, 'idx': idx.astype(jnp.int32), 'tag': tag,
          'neighbors': neighbors}


def _adjust(poses: np.ndarray, neigh: np.ndarray) -> np.ndarray:
  """grouping.adjust_poses from each joint's neighbours [P, K, 4]."""
  poses = poses.copy()
  p_idx, k_idx = np.nonzero(poses[:, :, 2] > 0)
  up, down, right, left = np.moveaxis(neigh[p_idx, k_idx], -1, 0)
  y = poses[p_idx, k_idx, 1] + np.where(up > down, np.float32(0.25),
                                        np.float32(-0.25))
  x = poses[p_idx, k_idx, 0] + np.where(right > left, np.float32(0.25),
                                        np.float32(-0.25))
  poses[p_idx, k_idx, 0] = x + np.float32(0.5)
  poses[p_idx, k_idx, 1] = y + np.float32(0.5)
  return poses


def image_maps(heat, tags, index: int):
  """Maps of image `index` of a batch [B, K, H, W] / [B, K, H, W, L].

  On XLA:CPU a numpy view (no copy); elsewhere a slice on the device.
  """
  if all(d.platform == 'cpu' for d in heat.devices()):
    return np.asarray(heat)[index], np.asarray(tags)[index]
  return heat[index], tags[index]


def group_candidates(
    cands: Candidates, map_hw: Tuple[int, int], maps,
    params: grouping_lib.GroupingParams = grouping_lib.GroupingParams(),
    stats: Dict[str, int] | None = None) -> Tuple[np.ndarray, np.ndarray]:
  """Host half: candidates of one image -> (poses [P, K, 3 + L], scores [P]).

  Args:
    cands: numpy candidates of one image (module docstring).
    map_hw: (H, W) of the maps.
    maps: (heat [K, H, W], tags [K, H, W, L]) float32 of the image, jax
      arrays on their device or numpy; only refine reads them, where they
      are (refine.refine_poses), so only its queries and results cross.
    params: grouping options (max_people <= the candidates' M).
    stats: if given, 'bytes_to_host' is increased by refine's results.

  Returns:
    As grouping.group_poses.
  """
  height, width = map_hw
  val, idx = np.asarray(cands['val'], np.float32), np.asarray(cands['idx'])
  tag = np.asarray(cands['tag'], np.float32)
  neigh = np.asarray(cands['neighbors'], np.float32)
  num_joints = val.shape[0]
  if params.detection_threshold < 0:
    raise ValueError('detection_threshold must be >= 0, got '
                     f'{params.detection_threshold}')
  joint_cands, neigh_of = [], {}
  for k in range(num_joints):
    n = min(int(np.sum(val[k] > params.detection_threshold)),
            params.max_people)  # val is descending: the first n
    f = idx[k, :n].astype(np.int64)
    joint_cands.append(grouping_lib.JointCandidates(
        loc=np.stack([f % width, f // width], 1), val=val[k, :n],
        tag=tag[k, :n]))
    for i in range(n):
      neigh_of[(k, int(f[i]))] = neigh[k, i]
  poses = grouping_lib.match_candidates(
      joint_cands, tag_threshold=params.tag_threshold,
      use_detection_val=params.use_detection_val,
      ignore_too_much=params.ignore_too_much, max_people=params.max_people)
  detected = poses[:, :, 2] > 0
  if params.adjust:
    xs = poses[:, :, 0].astype(np.int64)
    ys = poses[:, :, 1].astype(np.int64)
    pn = np.zeros(poses.shape[:2] + (4,), np.float32)
    for p, k in zip(*np.nonzero(detected)):
      pn[p, k] = neigh_of[(int(k), int(ys[p, k] * width + xs[p, k]))]
    poses = _adjust(poses, pn)
  scores = poses[:, :, 2].mean(axis=1)
  if params.refine and poses.shape[0] and not detected.all():
    # The tags at the people's own joints are their candidates' tags.
    heat, tags = maps
    poses = refine_lib.refine_poses(poses, heat, tags,
                                    own_tags=poses[:, :, 3:], stats=stats)
  return poses, scores

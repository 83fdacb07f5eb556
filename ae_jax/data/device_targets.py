"""AE training targets rendered on device, inside the jitted train step (jnp).

The host pipeline (pipeline.py) sends each example's warped, flipped
keypoints and its uint8 mask; `render_targets` turns them into the batch
the losses read, as TF's CenterNet keypoint trainer renders its heatmaps
from padded keypoints. Per 512/128 example this moves the 1.1 MB float32
heatmaps (and the 4 KB encodings) off the host->device link and their
rendering off the host cores (measured in bench/RESULTS_pipeline.md).

Same targets as the host twins in targets.py (mmpose 0.x HeatmapGenerator
and JointsEncoder, tag_per_joint), tested against the same loop
reference: a joint counts when v > 0 and its truncated integer position
lies in the map; its Gaussian is the ceil(6s + 3) patch of
exp(-(dx^2 + dy^2) / 2s^2) with corner round(x - 3s - 1) (half to even),
clipped to the map, max over people; the encoding packs each person's
kept joints to the front as (k * h * w + y * w + x, 1). The Gaussian is
evaluated as exp(-dx^2 / 2s^2) * exp(-dy^2 / 2s^2) (separable, within
2e-7 of mmpose's float32 values) and maxed over the M people on the full
grid, one fused elementwise loop.

People: the host keeps the first M (= max_people) of an image, zero padded;
mmpose encodes only M people too and fails when a later one has a visible
joint, so every image it trains on gets the same heatmaps here.

Shapes (B batch, M people, K joints, h x w heatmap grid):
  in   'keypoints' [B, M, K, 3] float32 (x, y, v) in heatmap pixels
       'mask'      [B, h, w]    uint8 or float32, 1 = train on the pixel
  out  'heatmaps'  [B, h, w, K] float32 in [0, 1]
       'joints'    [B, M, K, 2] int32 (k * h * w + y * w + x, visible)
       'mask'      [B, h, w]    float32
"""

import math
from typing import Dict

import jax.numpy as jnp


def _joint_cells(keypoints: jnp.ndarray, w: int, h: int):
  """Truncated integer (x, y) [..., 2] int32 and the kept flag [...]."""
  # Clipping just outside the map keeps out-of-map joints out and makes
  # the int32 conversion safe for far-away points.
  x = jnp.clip(jnp.trunc(keypoints[..., 0]), -1, w).astype(jnp.int32)
  y = jnp.clip(jnp.trunc(keypoints[..., 1]), -1, h).astype(jnp.int32)
  kept = (keypoints[..., 2] > 0) & (x >= 0) & (x < w) & (y >= 0) & (y < h)
  return x, y, kept


def _axis_profile(pos: jnp.ndarray, kept: jnp.ndarray, n: int,
                  sigma: float) -> jnp.ndarray:
  """exp(-d^2 / 2s^2) inside the clipped patch, else 0: [..., n] float32."""
  center = 3 * sigma + 1
  size = math.ceil(6 * sigma + 3)  # len(np.arange(0, 6s + 3))
  p = pos.astype(jnp.float32)[..., None]
  ul = jnp.round(p - center)  # half to even, as np.round
  br = jnp.minimum(jnp.round(p + center + 1), ul + size)
  grid = jnp.arange(n, dtype=jnp.float32)
  inside = (grid >= ul) & (grid < br) & kept[..., None]
  d = grid - ul - center  # patch index - patch center
  return jnp.where(inside, jnp.exp(-(d * d) / (2 * sigma**2)), 0.0)


def render_heatmaps(keypoints: jnp.ndarray, heatmap_wh: tuple[int, int],
                    sigma: float) -> jnp.ndarray:
  """Gaussian heatmaps, max over people: [B, M, K, 3] -> [B, h, w, K]."""
  w, h = heatmap_wh
  x, y, kept = _joint_cells(keypoints, w, h)
  gx = _axis_profile(x, kept, w, sigma)  # [B, M, K, w]
  gy = _axis_profile(y, kept, h, sigma)  # [B, M, K, h]
  gx = jnp.moveaxis(gx, 2, -1)[:, :, None, :, :]  # [B, M, 1, w, K]
  gy = jnp.moveaxis(gy, 2, -1)[:, :, :, None, :]  # [B, M, h, 1, K]
  # A chain of M elementwise maxima, which XLA fuses into one loop over the
  # output (a max-reduction over the broadcast product was 15x slower on
  # XLA:CPU).
  out = gy[:, 0] * gx[:, 0]
  for m in range(1, keypoints.shape[1]):
    out = jnp.maximum(out, gy[:, m] * gx[:, m])
  return out


def encode_joints(keypoints: jnp.ndarray,
                  heatmap_wh: tuple[int, int]) -> jnp.ndarray:
  """mmpose JointsEncoder: [B, M, K, 3] -> [B, M, K, 2] int32."""
  w, h = heatmap_wh
  num_joints = keypoints.shape[2]
  x, y, kept = _joint_cells(keypoints, w, h)
  flat = jnp.arange(num_joints, dtype=jnp.int32) * (h * w) + y * w + x
  slot = jnp.cumsum(kept, axis=-1) - 1  # [B, M, K]: kept joint's rank
  # one_hot[b, m, k, t]: joint k is person m's t-th kept joint.
  one_hot = kept[..., None] & (slot[..., None] == jnp.arange(num_joints))
  index = jnp.sum(jnp.where(one_hot, flat[..., None], 0), axis=2)
  visible = jnp.any(one_hot, axis=2).astype(jnp.int32)
  return jnp.stack([index, visible], axis=-1).astype(jnp.int32)


def render_targets(batch: Dict[str, jnp.ndarray], *,
                   sigma: float) -> Dict[str, jnp.ndarray]:
  """The loss batch from the host batch (see the module docstring).

  A batch without 'keypoints' already holds its targets ('heatmaps',
  'joints': synthetic data in tests and benchmarks) and only has its mask
  cast to float32.

  Args:
    batch: host batch: 'image', 'mask' and 'keypoints'.
    sigma: heatmap Gaussian sigma (heatmap px, config.data.sigma).

  Returns:
    A new dict: 'image' as given, 'mask' float32, 'heatmaps', 'joints'.
  """
  out = {k: v for k, v in batch.items() if k != 'keypoints'}
  out['mask'] = batch['mask'].astype(jnp.float32)
  if 'keypoints' in batch:
    h, w = batch['mask'].shape[1:3]
    keypoints = batch['keypoints'].astype(jnp.float32)
    out['heatmaps'] = render_heatmaps(keypoints, (w, h), sigma)
    out['joints'] = encode_joints(keypoints, (w, h))
  return out

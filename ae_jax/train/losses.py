"""Associative Embedding losses: masked heatmap MSE and AE push/pull ('exp').

Semantics follow mmpose 0.x `MultiLossFactory` (HeatmapLoss + AELoss with
ae_loss_type='exp', tag dim 1, one stage), vectorised over people and joints
with padding masks instead of mmpose's per-person Python loops.

Legend: B batch, h x w heatmap grid (128 x 128 at 512 input), K joints
(17 for COCO), M=30 people slots; NHWC.
  heatmaps (pred, gt)  [B, h, w, K] float32 (gt in [0, 1])
  mask                 [B, h, w]    float32 (0 = ignored pixel)
  tags                 [B, h, w, K] float32 (one tag per joint map)
  joints               [B, M, K, 2] int32: [..., 0] = k*h*w + y*w + x, the
                       flat index into the [K, h, w] tag maps (mmpose's
                       order), [..., 1] = visible flag (> 0 counts).
"""

from typing import Dict

import jax.numpy as jnp


def heatmap_loss(pred: jnp.ndarray, gt: jnp.ndarray,
                 mask: jnp.ndarray) -> jnp.ndarray:
  """Masked MSE per image (mmpose HeatmapLoss, supervise_empty=True).

  Args:
    pred: predicted heatmaps [B, h, w, K].
    gt: target heatmaps [B, h, w, K].
    mask: ignore mask [B, h, w]; masked pixels count in the mean as zeros,
      as in mmpose (the mean is over all pixels and joints).

  Returns:
    [B] float32: mean over (h, w, K) of (pred - gt)^2 * mask.
  """
  pred = pred.astype(jnp.float32)
  sq = jnp.square(pred - gt) * mask[..., None]
  return jnp.mean(sq, axis=(1, 2, 3))


def gather_joint_tags(tags: jnp.ndarray, joints: jnp.ndarray) -> jnp.ndarray:
  """Tags at the encoded joint positions.

  Args:
    tags: [B, h, w, K] tag maps (NHWC).
    joints: [B, M, K, 2] int32 with the mmpose flat index k*h*w + y*w + x.

  Returns:
    [B, M, K] float32 tag values (garbage where the joint is not visible;
    callers mask with the visible flag).
  """
  b, h, w, k = tags.shape
  # Translate the [K, h, w] flat index to our [h, w, K] layout instead of
  # transposing the maps: idx = k*h*w + p  ->  p*K + k.
  idx = jnp.clip(joints[..., 0], 0, k * h * w - 1)
  joint_k = idx // (h * w)
  pixel = idx % (h * w)
  flat = tags.astype(jnp.float32).reshape(b, h * w * k)
  nhwc_idx = (pixel * k + joint_k).reshape(b, -1)
  return jnp.take_along_axis(flat, nhwc_idx, axis=1).reshape(
      joints.shape[:-1])


def ae_loss(tags: jnp.ndarray, joints: jnp.ndarray):
  """AE 'exp' push and pull losses per image (mmpose AELoss.singleTagLoss).

  A joint counts when its visible flag is > 0; a person with no visible
  joint is left out entirely (it neither pulls nor pushes), as in mmpose.
  With N counted people: pull = (1/N) sum_people mean_joints (t - m)^2 and
  push = sum_{a != b} exp(-(m_a - m_b)^2) / (N (N - 1)) * 0.5; both are 0
  when N = 0, push is 0 when N = 1.

  Args:
    tags: [B, h, w, K] tag maps.
    joints: [B, M, K, 2] int32 joint encodings.

  Returns:
    (push [B], pull [B]) float32.
  """
  joint_tags = gather_joint_tags(tags, joints)  # [B, M, K]
  visible = (joints[..., 1] > 0).astype(jnp.float32)  # [B, M, K]
  n_joints = jnp.sum(visible, axis=-1)  # [B, M]
  person = (n_joints > 0).astype(jnp.float32)  # [B, M]
  safe_n_joints = jnp.maximum(n_joints, 1.0)
  mean_tag = jnp.sum(joint_tags * visible, axis=-1) / safe_n_joints  # [B, M]
  pull_person = jnp.sum(
      jnp.square(joint_tags - mean_tag[..., None]) * visible,
      axis=-1) / safe_n_joints
  n_people = jnp.sum(person, axis=-1)  # [B]
  pull = jnp.sum(pull_person * person, axis=-1) / jnp.maximum(n_people, 1.0)

  diff = mean_tag[:, :, None] - mean_tag[:, None, :]  # [B, M, M]
  m = mean_tag.shape[1]
  pair = person[:, :, None] * person[:, None, :] * (
      1.0 - jnp.eye(m, dtype=jnp.float32))
  push_sum = jnp.sum(jnp.exp(-jnp.square(diff)) * pair, axis=(1, 2))
  pairs = n_people * (n_people - 1.0)
  push = jnp.where(pairs > 0, push_sum / jnp.maximum(pairs, 1.0) * 0.5, 0.0)
  return push, pull


def compute_losses(outputs: jnp.ndarray, heatmaps: jnp.ndarray,
                   mask: jnp.ndarray, joints: jnp.ndarray, *,
                   num_joints: int = 17, heatmap_factor: float = 1.0,
                   push_factor: float = 0.001,
                   pull_factor: float = 0.001) -> Dict[str, jnp.ndarray]:
  """Weighted batch-mean losses of one AE model output.

  Per-image losses are scaled by their factor and averaged over the batch
  (mmpose AESimpleHead.get_loss); the total is their sum, as mmcv's
  parse_losses adds every '*loss*' entry.

  Args:
    outputs: model output [B, h, w, 2K] (heatmaps then tags).
    heatmaps: target heatmaps [B, h, w, K].
    mask: [B, h, w] ignore mask.
    joints: [B, M, K, 2] int32 joint encodings.
    num_joints: K.
    heatmap_factor: config.loss.heatmap_factor (heatmaps_loss_factor).
    push_factor: config.loss.push_factor (push_loss_factor).
    pull_factor: config.loss.pull_factor (pull_loss_factor).

  Returns:
    {'heatmap_loss', 'push_loss', 'pull_loss', 'total_loss'} float32
    scalars (factors applied).
  """
  pred_heatmaps = outputs[..., :num_joints]
  pred_tags = outputs[..., num_joints:2 * num_joints]
  hm = jnp.mean(heatmap_loss(pred_heatmaps, heatmaps, mask)) * heatmap_factor
  push, pull = ae_loss(pred_tags, joints)
  push = jnp.mean(push) * push_factor
  pull = jnp.mean(pull) * pull_factor
  return {'heatmap_loss': hm, 'push_loss': push, 'pull_loss': pull,
          'total_loss': hm + push + pull}

"""Independent PyTorch reference of mmpose 0.x's AE training loss.

Written from the formulas of the AE paper (Newell et al., NeurIPS 2017) in
mmpose's form, not from mmpose's code or ours: per image and per person
loops, no vectorisation. One stage, tag_per_joint, ae_loss_type 'exp':

  heatmap  mean over (K, h, w) of (pred - gt)^2 * mask  (masked pixels
           count in the mean as zeros; supervise_empty)
  pull     (1/N) sum_people mean_{visible joints} (tag - person_mean)^2
  push     (sum_{a, b} exp(-(m_a - m_b)^2) - N) / (N (N - 1)) * 0.5,
           0 when N < 2; people without a visible joint are left out

Each is averaged over the batch and scaled by its factor; the total is
their sum.

Legend (PyTorch NCHW): B batch, K joints, h x w heatmap grid, M people.
  outputs  [B, 2K, h, w] (heatmaps then tags)
  heatmaps [B, K, h, w], mask [B, h, w]
  joints   [B, M, K, 2] int: [..., 0] = k*h*w + y*w + x (flat index into
           the [K, h, w] tag maps), [..., 1] = visible (> 0)
"""

from typing import Dict

import torch


def heatmap_loss(pred: torch.Tensor, gt: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
  """[B]: masked squared error averaged over joints and pixels."""
  return ((pred - gt)**2 * mask[:, None, :, :]).mean(dim=(1, 2, 3))


def single_image_ae_loss(tags: torch.Tensor, joints: torch.Tensor):
  """(push, pull) scalars of one image; tags [K*h*w], joints [M, K, 2]."""
  means, pull = [], tags.new_zeros(())
  for person in joints:
    person_tags = [tags[int(j[0])] for j in person if int(j[1]) > 0]
    if not person_tags:
      continue
    person_tags = torch.stack(person_tags)
    means.append(person_tags.mean())
    pull = pull + ((person_tags - means[-1])**2).mean()
  n = len(means)
  if n == 0:
    return tags.new_zeros(()), tags.new_zeros(())
  if n == 1:
    return tags.new_zeros(()), pull
  means = torch.stack(means)
  diff = means[:, None] - means[None, :]
  push = torch.exp(-diff**2).sum() - n  # drops the n diagonal exp(0) terms
  return push / ((n - 1) * n) * 0.5, pull / n


def ae_losses(outputs: torch.Tensor, heatmaps: torch.Tensor,
              mask: torch.Tensor, joints: torch.Tensor, *, num_joints: int,
              heatmap_factor: float = 1.0, push_factor: float = 0.001,
              pull_factor: float = 0.001) -> Dict[str, torch.Tensor]:
  """The weighted batch-mean losses and their sum (see the module doc)."""
  pred_heatmaps = outputs[:, :num_joints]
  tags = outputs[:, num_joints:2 * num_joints].reshape(outputs.shape[0], -1)
  push, pull = zip(*[single_image_ae_loss(tags[b], joints[b])
                     for b in range(outputs.shape[0])])
  parts = {
      'heatmap_loss': heatmap_loss(pred_heatmaps, heatmaps, mask).mean() *
                      heatmap_factor,
      'push_loss': torch.stack(push).mean() * push_factor,
      'pull_loss': torch.stack(pull).mean() * pull_factor}
  parts['total_loss'] = sum(parts.values())
  return parts

"""Losses vs an independent PyTorch reference written from the spec."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ae_jax.train import losses

K, H, W, M = 17, 8, 10, 30


def torch_reference(outputs, heatmaps, mask, joints, factors):
  """Per-person loops over NCHW torch tensors, from SPEC.md 'Loss'."""
  torch = pytest.importorskip('torch')
  out = torch.from_numpy(outputs).permute(0, 3, 1, 2)  # NCHW
  gt = torch.from_numpy(heatmaps).permute(0, 3, 1, 2)
  msk = torch.from_numpy(mask)
  hm = (((out[:, :K] - gt) ** 2) * msk[:, None]).mean(dim=(1, 2, 3))
  tags = out[:, K:].reshape(out.shape[0], -1)  # [B, K*h*w], k*h*w+y*w+x
  pushes, pulls = [], []
  for b in range(out.shape[0]):
    means, pull = [], torch.zeros(())
    for person in joints[b]:
      vals = [tags[b, int(i)] for i, v in person if v > 0]
      if not vals:
        continue
      vals = torch.stack(vals)
      means.append(vals.mean())
      pull = pull + ((vals - vals.mean()) ** 2).mean()
    n = len(means)
    pulls.append(pull / n if n else torch.zeros(()))
    push = torch.zeros(())
    for a in range(n):
      for c in range(n):
        if a != c:
          push = push + torch.exp(-(means[a] - means[c]) ** 2)
    pushes.append(push / (n * (n - 1)) * 0.5 if n > 1 else torch.zeros(()))
  hm_f, push_f, pull_f = factors
  return {'heatmap_loss': float(hm.mean()) * hm_f,
          'push_loss': float(torch.stack(pushes).mean()) * push_f,
          'pull_loss': float(torch.stack(pulls).mean()) * pull_f}


def random_batch(rng, people_per_image):
  """Random maps and joint encodings; unused slots are all zero."""
  b = len(people_per_image)
  outputs = rng.normal(size=(b, H, W, 2 * K)).astype(np.float32)
  heatmaps = rng.uniform(size=(b, H, W, K)).astype(np.float32)
  mask = (rng.uniform(size=(b, H, W)) > 0.2).astype(np.float32)
  joints = np.zeros((b, M, K, 2), np.int32)
  for i, n in enumerate(people_per_image):
    for p in range(n):
      k = np.arange(K)
      y = rng.integers(0, H, K)
      x = rng.integers(0, W, K)
      joints[i, p, :, 0] = k * H * W + y * W + x
      joints[i, p, :, 1] = rng.uniform(size=K) > 0.4
    if n >= 3:  # A person with indices but no visible joint is skipped.
      joints[i, n - 1, :, 1] = 0
  return outputs, heatmaps, mask, joints


@pytest.mark.parametrize('people', [
    (0,),  # no people: push = pull = 0
    (1,),  # one person: push = 0
    (5,),  # several people, one of them without visible joints
    (0, 1, 4, 30),  # mixed batch, full 30 slots
])
def test_losses_match_torch_reference(people):
  rng = np.random.default_rng(sum(people) + len(people))
  outputs, heatmaps, mask, joints = random_batch(rng, people)
  factors = (1.0, 0.01, 0.1)
  got = jax.jit(lambda *a: losses.compute_losses(
      *a, num_joints=K, heatmap_factor=factors[0], push_factor=factors[1],
      pull_factor=factors[2]))(outputs, heatmaps, mask, joints)
  want = torch_reference(outputs, heatmaps, mask, joints, factors)
  for name, value in want.items():
    np.testing.assert_allclose(float(got[name]), value, rtol=1e-5,
                               atol=1e-7, err_msg=name)
  np.testing.assert_allclose(
      float(got['total_loss']), sum(want.values()), rtol=1e-5)


def test_no_people_and_one_person_give_zero_terms():
  rng = np.random.default_rng(0)
  outputs, _, _, joints = random_batch(rng, (0, 1))
  push, pull = losses.ae_loss(jnp.asarray(outputs[..., K:]), joints)
  assert float(push[0]) == 0.0 and float(pull[0]) == 0.0
  assert float(push[1]) == 0.0 and float(pull[1]) > 0.0


def test_gradients_are_finite_with_empty_images():
  rng = np.random.default_rng(1)
  outputs, heatmaps, mask, joints = random_batch(rng, (0, 1, 3))

  def total(o):
    return losses.compute_losses(o, heatmaps, mask, joints)['total_loss']

  grad = jax.grad(total)(jnp.asarray(outputs))
  assert bool(jnp.all(jnp.isfinite(grad)))
  assert float(jnp.abs(grad[..., K:]).sum()) > 0  # tags receive gradient

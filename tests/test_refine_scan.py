"""The jitted refine scan equals a plain numpy scan, mmpose's formula.

The reference here is the literal per-query computation of mmpose's refine
(heatmap - np.round(np.sqrt(((tags - mean) ** 2).sum(-1))), np.argmax),
written in the test; ties are made common by quantised maps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ae_jax.infer import refine
from ae_jax.infer import refine_scan
from bench import bench_grouping
from tests.references import host_grouping
from tests.references import mmpose_grouping


def _numpy_argmax(heat, tags, joints, means):
  out = []
  for k, mean in zip(joints, means):
    dist = np.sqrt(((tags[k] - mean[None, None]) ** 2).sum(axis=2))
    out.append(np.argmax(heat[k] - np.round(dist)))
  return np.asarray(out)


def test_score_rounds_as_numpy():
  # Unguarded, XLA:CPU contracts d0 * d0 + d1 * d1 into an FMA and a
  # fraction of these sums differ from numpy's by an ulp.
  rng = np.random.default_rng(0)
  tags = rng.normal(0, 6, (2, 1 << 18)).astype(np.float32)
  # Distances near n + 0.5, where an ulp of the sum changes the rounding.
  mean = np.array([0.25, -0.5], np.float32)
  tags[0, :4096] = mean[0] + rng.integers(0, 20, 4096) + 0.5 + rng.normal(
      0, 1e-5, 4096)
  tags[1, :4096] = mean[1] + rng.normal(0, 1e-2, 4096)
  heat = rng.uniform(0, 1, tags.shape[1]).astype(np.float32)
  got = jax.jit(refine_scan._score)(heat, list(tags), jnp.asarray(mean),
                                    np.int32(0))
  d = tags.T - mean[None]
  want = heat - np.round(np.sqrt((d ** 2).sum(axis=1)))
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize('shape,tag_dim,num,quantise,chunk', [
    ((3, 20, 24), 2, 5, False, None),
    ((4, 37, 29), 1, 30, True, None),  # rows not a multiple of the group
    ((5, 5, 7), 2, 40, True, 4),  # fewer rows than a group
    ((17, 33, 40), 2, 120, True, None),  # all joints, several passes
    ((2, 3, 4), 2, 9, True, 1),
])
def test_argmax_equals_numpy_scan(shape, tag_dim, num, quantise, chunk):
  rng = np.random.default_rng(num)
  k, h, w = shape
  heat = rng.uniform(-0.05, 1, shape).astype(np.float32)
  tags = rng.normal(0, 3, shape + (tag_dim,)).astype(np.float32)
  means = rng.normal(0, 3, (num, tag_dim)).astype(np.float32)
  if quantise:  # plateaus of equal scores: the first index must win
    heat, tags = np.round(heat * 4) / 4, np.round(tags * 2) / 2
    means = np.round(means * 2) / 2
  joints = rng.integers(0, k, num)
  got = refine_scan.argmax_queries(jax.device_put(heat), jax.device_put(tags),
                                   joints, means, chunk=chunk)
  want = _numpy_argmax(heat, tags, joints, means)
  np.testing.assert_array_equal(got.flat, want)
  y, x = want // w, want % w
  np.testing.assert_array_equal(got.heat, refine.heat_around(
      heat, joints, want))
  for work, scan in ((0, refine_scan.scan_flat), (0, None),
                     (np.inf, refine_scan.scan_flat)):  # jitted, numpy x 2
    refine._NUMPY_WORK, old = work, refine._NUMPY_WORK
    try:
      host = refine.argmax_queries_host(heat, tags, joints, means, scan)
    finally:
      refine._NUMPY_WORK = old
    np.testing.assert_array_equal(host.flat, want)
    np.testing.assert_array_equal(host.heat, got.heat)
  assert got.heat[:, 0].tolist() == heat[joints, y, x].tolist()
  if quantise:  # the ties were real: several pixels share the max
    score = [heat[j] - np.round(np.sqrt(((tags[j] - m) ** 2).sum(-1)))
             for j, m in zip(joints, means)]
    assert max(int((s == s.max()).sum()) for s in score) > 1


@pytest.mark.parametrize('num_people,seed,quantise,step', [
    (3, 0, False, 7), (6, 1, True, 61)])
def test_scan_refine_matches_reference_on_missing_joint_maps(
    monkeypatch, num_people, seed, quantise, step):
  # People who miss most joints, tags noisy pixel to pixel (the maps a
  # random-weight network gives), at a small size. Step 7: the host scan
  # takes the hot pixels, then rescans the full maps for a few queries.
  monkeypatch.setattr(refine, '_SAMPLE_STEP', step)
  monkeypatch.setattr(refine, '_NUMPY_WORK', 0)
  calls = []
  heat, tags = bench_grouping.missing_joint_maps(
      num_people, height=96, width=128, seed=seed)
  if quantise:  # equal scores across pixels: first-index ties in refine
    heat = np.round(heat * 16) / 16
    tags = np.round(tags * 2) / 2
  got = host_grouping.group_poses(heat, tags, scan=lambda *a: (
      calls.append(a[0].shape), refine_scan.scan_flat(*a))[1])
  poses, scores = host_grouping.rows(got), got.scores
  ref_poses, ref_scores = mmpose_grouping.reference_parse(heat, tags,
                                                          solver='scipy')
  assert (ref_poses[:, :, 2] > 0).mean() > 0.5  # refine filled joints
  if step == 7:  # hot pixels (rows of 256), then some full maps
    assert calls[0][2] == 256 and calls[-1] == heat.shape
  np.testing.assert_array_equal(poses, ref_poses)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)


def test_refine_queries_the_people_own_tags():
  """refine asks for each missing joint with the mean of the person's own
  (candidate) tags, never reading the tag maps at the joints."""
  rows = np.zeros((2, 3, 3 + 2), np.float32)
  rows[0, 0] = [1, 1, 0.5, 1.0, 2.0]
  rows[0, 2] = [2, 2, 0.7, 3.0, 4.0]
  rows[1, 1] = [3, 0, 0.9, -1.0, 0.5]
  asked = []

  def argmax(joints, means):
    asked.append((joints.tolist(), means.tolist()))
    return refine.Argmax(np.array([5, 0, 7]), np.zeros((3, 5), np.float32))

  out = refine.refine(rows, argmax, width=4)
  assert asked == [([1, 0, 2], [[2.0, 3.0], [-1.0, 0.5], [-1.0, 0.5]])]
  np.testing.assert_array_equal(out, rows)  # zero heat: nothing filled

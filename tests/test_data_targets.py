"""Device-rendered heatmaps and encodings equal mmpose's loops (reference).

The targets are rendered inside the jitted train step
(ae_jax/data/device_targets.py) from the padded keypoints the pipeline
sends; the reference is mmpose 0.x's HeatmapGenerator / JointsEncoder as
loops (tests/references/mmpose_pipeline.generate_targets). Tolerance:
heatmaps 1e-6 absolute (float32 exp of the same squared distances, as a
product of the two axes' exps), encodings exact.
"""

import jax
import numpy as np
import pytest

from ae_jax.data import device_targets
from tests.references import mmpose_pipeline

K = 17


def _render(joints, size, sigma=2.0, max_people=30):
  """(heatmaps [h, w, K], encodings [M, K, 2]) of one example, on device.

  As the pipeline does: the first M people, zero padded to M.
  """
  w, h = _wh(size)
  keypoints = np.zeros((1, max_people, K, 3), np.float32)
  kept = joints[:max_people]
  keypoints[0, :len(kept)] = kept
  batch = {'mask': np.ones((1, h, w), np.uint8), 'keypoints': keypoints}
  out = jax.jit(lambda b: device_targets.render_targets(b, sigma=sigma))(
      batch)
  assert out['mask'].dtype == np.float32 and 'keypoints' not in out
  return np.asarray(out['heatmaps'][0]), np.asarray(out['joints'][0])


def _wh(size):
  return (size, size) if np.isscalar(size) else size


def _ref_heatmaps(joints, size, sigma):
  """[h, w, K] from the reference's [K, h, w]."""
  maps, _ = mmpose_pipeline.generate_targets(joints, _wh(size), sigma)
  return maps.transpose(1, 2, 0)


def _ref_encode(joints, size, max_people):
  return mmpose_pipeline.generate_targets(joints, _wh(size), 2,
                                          max_people)[1]


def _random_joints(rng, num_people, size):
  w, h = _wh(size)
  joints = np.zeros((num_people, K, 3), np.float32)
  # Spread beyond the map on all sides, incl. (-1, 0) which int() keeps.
  joints[..., 0] = rng.uniform(-6, w + 6, (num_people, K))
  joints[..., 1] = rng.uniform(-6, h + 6, (num_people, K))
  joints[..., 2] = rng.integers(0, 3, (num_people, K))
  return joints


@pytest.mark.parametrize('num_people,size,seed', [
    (0, 32, 0),  # no people: all zero
    (1, 32, 1),  # one person
    (5, 32, 2),  # overlapping people, max over people
    (3, 20, 3),  # non-power-of-two size, joints on borders
    (4, (28, 16), 4),  # wide (w, size) map: x in [16, 28) is kept
    (4, (12, 24), 5),  # tall (w, size) map
])
def test_heatmaps_match_loops(num_people, size, seed):
  joints = _random_joints(np.random.default_rng(seed), num_people, size)
  joints[0:1, 0] = (-0.5, 3.2, 2) if num_people else 0  # int() -> x = 0
  got = _render(joints, size)[0]
  want = _ref_heatmaps(joints, size, 2)
  w, h = _wh(size)
  assert got.shape == (h, w, K) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  if num_people:
    assert got[3, 0, 0] == 1.0  # the (-0.5, 3.2) joint peaks at (0, 3)


@pytest.mark.parametrize('num_people,size,max_people,seed', [
    (0, 32, 30, 0),  # padding only
    (4, 32, 30, 1),  # packed to the front per person
    (7, 16, 5, 2),  # more people than M: first M encoded
    (6, (28, 16), 30, 3),  # wide (w, size) map: index k*size*w + y*w + x
    (6, (12, 24), 30, 4),  # tall (w, size) map
])
def test_encode_joints_match_loops(num_people, size, max_people, seed):
  joints = _random_joints(np.random.default_rng(seed), num_people, size)
  got = _render(joints, size, max_people=max_people)[1]
  want = _ref_encode(joints, size, max_people)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, want)


def test_heatmap_full_size_peak_and_support():
  """At 128 with sigma 2 each joint is a 15x15 patch peaking at 1."""
  joints = np.zeros((1, K, 3), np.float32)
  joints[0, 4] = (60.7, 100.2, 1)
  got = _render(joints, 128)[0]
  ys, xs = np.nonzero(got[..., 4])
  assert (ys.min(), ys.max(), xs.min(), xs.max()) == (93, 107, 53, 67)
  assert got[100, 60, 4] == 1.0 and got[..., :4].max() == 0


def test_rect_encoding_indexes_the_loss_tag_maps():
  """losses.gather_joint_tags reads [B, h, w, K] maps at the encoded index:
  for a wide map it must return the tag at (y, x, k) of each kept joint."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ae_jax.train import losses  # pylint: disable=g-import-not-at-top
  w, h = 28, 16
  joints = _random_joints(np.random.default_rng(7), 5, (w, h))
  enc = _render(joints, (w, h))[1]
  tags = np.random.default_rng(8).normal(size=(1, h, w, K)).astype(np.float32)
  got = np.asarray(losses.gather_joint_tags(jnp.asarray(tags),
                                            jnp.asarray(enc[None])))[0]
  checked = 0
  for p, person in enumerate(joints):
    kept = [(k, int(x), int(y)) for k, (x, y, v) in enumerate(person)
            if v > 0 and 0 <= int(x) < w and 0 <= int(y) < h]
    for t, (k, x, y) in enumerate(kept):
      assert got[p, t] == tags[0, y, x, k]
      checked += 1
  assert checked > 20


def test_batch_with_targets_passes_through():
  """Synthetic batches carry heatmaps/joints: kept, mask cast to float32."""
  rng = np.random.default_rng(9)
  batch = {'image': np.zeros((2, 16, 16, 3), np.uint8),
           'mask': np.ones((2, 4, 4), np.uint8),
           'heatmaps': rng.uniform(size=(2, 4, 4, K)).astype(np.float32),
           'joints': rng.integers(0, 9, (2, 30, K, 2)).astype(np.int32)}
  out = device_targets.render_targets(batch, sigma=2.0)
  assert sorted(out) == sorted(batch) and out['mask'].dtype == np.float32
  for key in ('image', 'heatmaps', 'joints'):
    np.testing.assert_array_equal(out[key], batch[key])

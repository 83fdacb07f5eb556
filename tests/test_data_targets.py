"""Heatmaps and joint encodings equal loop references written from the spec.

Each TF op is run eagerly and inside a tf.data map (as big_vision pp tests);
the numpy twins (used by the pipeline loader) against the same loops.
Tolerance: heatmaps 1e-6 absolute (float32 exp of the same squared distance;
the TF op may fuse differently), encodings exact.
"""

import math

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from ae_jax.data import targets  # pylint: disable=g-import-not-at-top

K = 17


def _wh(size):
  return (size, size) if np.isscalar(size) else size


def _ref_heatmaps(joints, size, sigma):
  """Per-pixel loops: Gaussian around int(x), int(y) within the 6s+3 patch.

  size is an int (square) or (w, h) as mmpose's output_size.
  """
  w, h = _wh(size)
  out = np.zeros((h, w, K), np.float32)
  radius = 3 * sigma + 1  # patch spans [x - r, x + r] for integer sigma
  for person in joints:
    for k, (x, y, v) in enumerate(person):
      if v <= 0:
        continue
      xi, yi = int(x), int(y)  # truncation toward zero, as mmpose
      if not (0 <= xi < w and 0 <= yi < h):
        continue
      for py in range(h):
        for px in range(w):
          if abs(px - xi) <= radius and abs(py - yi) <= radius:
            val = np.float32(math.exp(-((px - xi)**2 + (py - yi)**2) /
                                      (2 * sigma**2)))
            out[py, px, k] = max(out[py, px, k], val)
  return out


def _ref_encode(joints, size, max_people):
  """JointsEncoder: k * (w * h) + y * w + x for kept joints, packed."""
  w, h = _wh(size)
  out = np.zeros((max_people, K, 2), np.int32)
  for i, person in enumerate(joints[:max_people]):
    tot = 0
    for k, (x, y, v) in enumerate(person):
      xi, yi = int(x), int(y)
      if v > 0 and 0 <= xi < w and 0 <= yi < h:
        out[i, tot] = (k * w * h + yi * w + xi, 1)
        tot += 1
  return out


def _random_joints(rng, num_people, size):
  w, h = _wh(size)
  joints = np.zeros((num_people, K, 3), np.float32)
  # Spread beyond the map on all sides, incl. (-1, 0) which int() keeps.
  joints[..., 0] = rng.uniform(-6, w + 6, (num_people, K))
  joints[..., 1] = rng.uniform(-6, h + 6, (num_people, K))
  joints[..., 2] = rng.integers(0, 3, (num_people, K))
  return joints


def _run(fn, joints, mode, np_fn=None):
  if mode == 'numpy':  # the twin the pipeline's loader uses
    return np_fn(joints)
  if mode == 'eager':
    return fn(tf.constant(joints)).numpy()
  # Ragged person count through a tf.data map, like the pipeline.
  ds = tf.data.Dataset.from_generator(
      lambda: iter([joints]), output_signature=tf.TensorSpec(
          [None, K, 3], tf.float32)).map(fn)
  return next(iter(ds)).numpy()


@pytest.mark.parametrize('mode', ['eager', 'map', 'numpy'])
@pytest.mark.parametrize('num_people,size,seed', [
    (0, 32, 0),  # no people: all zero
    (1, 32, 1),  # one person
    (5, 32, 2),  # overlapping people, max over people
    (3, 20, 3),  # non-power-of-two size, joints on borders
    (4, (28, 16), 4),  # wide (w, size) map: x in [16, 28) is kept
    (4, (12, 24), 5),  # tall (w, size) map
])
def test_heatmaps_match_loops(mode, num_people, size, seed):
  joints = _random_joints(np.random.default_rng(seed), num_people, size)
  joints[0:1, 0] = (-0.5, 3.2, 2) if num_people else 0  # int() -> x = 0
  got = _run(lambda j: targets.generate_heatmaps(j, size, 2.0), joints, mode,
             lambda j: targets.generate_heatmaps_np(j, size, 2.0))
  want = _ref_heatmaps(joints, size, 2)
  w, h = _wh(size)
  assert got.shape == (h, w, K) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  if num_people:
    assert got[3, 0, 0] == 1.0  # the (-0.5, 3.2) joint peaks at (0, 3)


@pytest.mark.parametrize('mode', ['eager', 'map', 'numpy'])
@pytest.mark.parametrize('num_people,size,max_people,seed', [
    (0, 32, 30, 0),  # padding only
    (4, 32, 30, 1),  # packed to the front per person
    (7, 16, 5, 2),  # more people than M: first M encoded
    (6, (28, 16), 30, 3),  # wide (w, size) map: index k*size*w + y*w + x
    (6, (12, 24), 30, 4),  # tall (w, size) map
])
def test_encode_joints_match_loops(mode, num_people, size, max_people, seed):
  joints = _random_joints(np.random.default_rng(seed), num_people, size)
  got = _run(lambda j: targets.encode_joints(j, size, max_people), joints, mode,
             lambda j: targets.encode_joints_np(j, size, max_people))
  want = _ref_encode(joints, size, max_people)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, want)


def test_heatmap_full_size_peak_and_support():
  """At 128 with sigma 2 each joint is a 15x15 patch peaking at 1."""
  joints = np.zeros((1, K, 3), np.float32)
  joints[0, 4] = (60.7, 100.2, 1)
  got = targets.generate_heatmaps(tf.constant(joints), 128, 2.0).numpy()
  ys, xs = np.nonzero(got[..., 4])
  assert (ys.min(), ys.max(), xs.min(), xs.max()) == (93, 107, 53, 67)
  assert got[100, 60, 4] == 1.0 and got[..., :4].max() == 0


def test_rect_encoding_indexes_the_loss_tag_maps():
  """losses.gather_joint_tags reads [B, h, w, K] maps at the encoded index:
  for a wide map it must return the tag at (y, x, k) of each kept joint."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ae_jax import losses  # pylint: disable=g-import-not-at-top
  w, h = 28, 16
  joints = _random_joints(np.random.default_rng(7), 5, (w, h))
  enc = targets.encode_joints_np(joints, (w, h), 30)
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

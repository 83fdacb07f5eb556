"""Grouping: known poses from synthetic maps, parity with a reference parser.

The code under test is decode's matching, adjust and refine (fed by the
host NMS of tests/references/host_grouping.py). The reference
(tests/references/mmpose_grouping.reference_parse) is a straightforward
mmpose-style implementation (shifted-window NMS, full sorts, loops, refine
over every full map); here it mostly runs with scipy's solver so ties break
the same way on random maps. refine's host scan runs with its large scans
jitted, over the hot pixels and (forced) over the full maps; elsewhere these
small maps take its numpy form; the device form is checked in
test_candidates.py and test_refine_scan.py.
"""

import numpy as np
import pytest

from ae_jax.data import affine
from ae_jax.infer import decode
from ae_jax.infer import refine
from ae_jax.infer import refine_scan
from bench import bench_grouping
from tests.references import host_grouping
from tests.references import mmpose_grouping

K = 17


def _group(heat, tags, params=decode.GroupingParams()):
  """(rows [P, K, 3 + L], scores [P]) of the host grouping."""
  poses = host_grouping.group_poses(heat, tags, params)
  return host_grouping.rows(poses), poses.scores


def _paint_joint(heat, tags, k, x, y, value, tag, radius=2):
  """A sharp peak at (x, y) with lower 4-neighbours, tag over a disc."""
  _, h, w = heat.shape
  heat[k, y, x] = max(heat[k, y, x], value)
  for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
    if 0 <= x + dx < w and 0 <= y + dy < h:
      heat[k, y + dy, x + dx] = max(heat[k, y + dy, x + dx], 0.5 * value)
  ys, xs = np.mgrid[0:h, 0:w]
  tags[k][(xs - x) ** 2 + (ys - y) ** 2 <= radius ** 2] = tag


def _people_maps():
  """3 people (tags 0, 3, 6), missing joints, one joint on the border."""
  rng = np.random.default_rng(0)
  h, w = 48, 64
  heat = np.zeros((K, h, w), np.float32)
  tags = np.full((K, h, w, 1), -20.0, np.float32)
  people = []
  for p, (cx, cy) in enumerate(((12, 14), (32, 30), (52, 16))):
    joints = {}
    for k in range(K):
      if (p, k) in ((0, 3), (1, 0), (1, 9), (2, 15), (2, 16)):
        continue  # missing joints (person 1 has no nose: created later)
      x = int(np.clip(cx + rng.integers(-8, 9), 3, w - 4))
      y = int(np.clip(cy + rng.integers(-10, 11), 3, h - 4))
      joints[k] = (x, y, float(np.float32(0.9 - 0.02 * k - 0.01 * p)))
    if p == 2:
      joints[10] = (w - 1, 20, joints[10][2])  # on the right border
    people.append(joints)
  for p, joints in enumerate(people):
    for k, (x, y, v) in joints.items():
      _paint_joint(heat, tags, k, x, y, v, 3.0 * p)
  return heat, tags, people


def _expected_xy(heat, k, x, y):
  """Adjust rule from the spec: quarter pixel toward the higher neighbour."""
  _, h, w = heat.shape
  m = heat[k]
  ex = x + 0.5 + (0.25 if m[y, min(w - 1, x + 1)] > m[y, max(0, x - 1)]
                  else -0.25)
  ey = y + 0.5 + (0.25 if m[min(h - 1, y + 1), x] > m[max(0, y - 1), x]
                  else -0.25)
  return ex, ey


def test_recovers_known_poses():
  heat, tags, people = _people_maps()
  params = decode.GroupingParams(refine=False)
  poses, scores = _group(heat, tags, params)
  assert poses.shape == (3, K, 4)
  by_tag = {int(round(pose[np.argmax(pose[:, 2] > 0), 3] / 3.0)): i
            for i, pose in enumerate(poses)}
  assert sorted(by_tag) == [0, 1, 2]
  for p, joints in enumerate(people):
    pose, score = poses[by_tag[p]], scores[by_tag[p]]
    for k in range(K):
      if k in joints:
        x, y, v = joints[k]
        assert (pose[k, 0], pose[k, 1]) == _expected_xy(heat, k, x, y)
        assert pose[k, 2] == np.float32(v)
        assert pose[k, 3] == 3.0 * p
      else:
        assert pose[k, 2] == 0
    expected = sum(v for _, _, v in joints.values()) / K
    np.testing.assert_allclose(score, expected, rtol=1e-6)
  # The border joint (x = W-1): its right neighbour is itself -> +0.25.
  border = poses[by_tag[2], 10]
  assert border[0] == heat.shape[2] - 1 + 0.75
  # Person 1 (no nose) is created after the people that have one.
  assert by_tag[1] == 2


def test_refine_fills_weak_joint_with_own_tag():
  heat, tags, people = _people_maps()
  # Person 0's missing joint 3 as a weak peak (below the 0.1 threshold)
  # carrying its tag; a stronger peak with a far tag must not win.
  _paint_joint(heat, tags, 3, 20, 6, 0.05, 0.0, radius=1)
  _paint_joint(heat, tags, 3, 40, 40, 0.08, 30.0, radius=1)
  poses, scores = _group(heat, tags)
  p0 = [i for i, pose in enumerate(poses) if pose[0, 3] == 0.0][0]
  assert poses[p0, 3, 2] == np.float32(0.05)
  assert tuple(poses[p0, 3, :2]) == _expected_xy(heat, 3, 20, 6)
  # Scores are taken before refine.
  np.testing.assert_allclose(
      scores[p0], sum(v for _, _, v in people[0].values()) / K, rtol=1e-6)
  ref_poses, ref_scores = mmpose_grouping.reference_parse(heat, tags,
                                                         solver='scipy')
  np.testing.assert_array_equal(poses, ref_poses)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)


def _random_maps(seed, h, w, tag_dim, quantise=False):
  rng = np.random.default_rng(seed)
  heat = rng.uniform(-0.05, 1.0, (K, h, w)).astype(np.float32)
  heat *= rng.uniform(0, 1, (K, h, w)) < 0.3  # sparse: plateaus of zeros
  tags = rng.uniform(0, 5, (K, h, w, tag_dim)).astype(np.float32)
  if quantise:  # equal tags: rounded-cost ties and shared person keys
    tags = np.round(tags * 2) / 2
    heat = np.round(heat * 8) / 8  # equal peak values, plateaus
  return heat.astype(np.float32), tags.astype(np.float32)


@pytest.mark.parametrize('seed,h,w,tag_dim,quantise', [
    (0, 40, 56, 1, False),  # no flip, sizes not multiples of the tile
    (1, 40, 56, 2, False),  # flip tags
    (2, 64, 48, 2, False),
    (3, 33, 70, 1, True),  # ties everywhere
    (4, 48, 48, 2, True),
])
@pytest.mark.parametrize('path', ['hot_pixels', 'full_maps'])
def test_matches_reference_on_random_maps(monkeypatch, seed, h, w, tag_dim,
                                          quantise, path):
  heat, tags = _random_maps(seed, h, w, tag_dim, quantise)
  monkeypatch.setattr(refine, '_NUMPY_WORK', 0)  # the jitted scan
  if path == 'full_maps':
    monkeypatch.setattr(refine, '_HOT_FRACTION', -1.0)
  poses, scores = _group(heat, tags)
  ref_poses, ref_scores = mmpose_grouping.reference_parse(
      heat, tags, solver='scipy')
  assert poses.shape[0] > 5  # a real workout: many people, matches, refine
  np.testing.assert_array_equal(poses, ref_poses)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)


@pytest.mark.parametrize('adjust,refine,use_val', [
    (False, False, True), (True, False, False), (False, True, True)])
def test_options_match_reference(adjust, refine, use_val):
  heat, tags = _random_maps(5, 36, 44, 2)
  params = decode.GroupingParams(adjust=adjust, refine=refine,
                                   use_detection_val=use_val)
  poses, scores = _group(heat, tags, params)
  ref_poses, ref_scores = mmpose_grouping.reference_parse(
      heat, tags, adjust=adjust, refine=refine, use_detection_val=use_val,
      solver='scipy')
  np.testing.assert_array_equal(poses, ref_poses)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)


def test_realistic_maps_match_munkres_reference():
  heat, tags = bench_grouping.synthetic_maps(3, height=128, width=192,
                                             seed=3)
  poses, scores = _group(heat, tags)
  ref_poses, ref_scores = mmpose_grouping.reference_parse(heat, tags,
                                                         solver='munkres')
  assert poses.shape[0] >= 3
  np.testing.assert_array_equal(poses, ref_poses)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)


@pytest.mark.parametrize('num_people,seed', [(4, 0), (12, 1)])
def test_missing_joint_maps_match_reference(num_people, seed):
  # People who miss most joints, tags noisy pixel to pixel: refine fills
  # ~14 joints per person and goes through the tag-space cells.
  heat, tags = bench_grouping.missing_joint_maps(
      num_people, height=128, width=192, seed=seed)
  poses, scores = _group(heat, tags)
  ref_poses, ref_scores = mmpose_grouping.reference_parse(heat, tags,
                                                          solver='scipy')
  assert poses.shape[0] >= num_people // 2
  assert (ref_poses[:, :, 2] > 0).mean() > 0.5  # refine filled joints
  np.testing.assert_array_equal(poses, ref_poses)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)


def test_no_people():
  heat = np.full((K, 20, 24), 0.05, np.float32)
  poses, scores = _group(heat, np.zeros((K, 20, 24, 2)))
  assert poses.shape == (0, K, 5) and scores.shape == (0,)


def test_transform_to_image_inverts_resize_warp():
  center, scale = np.array([320.0, 240.0]), np.array([3.3, 2.4])
  size = (704, 512)
  matrix = affine.get_affine_transform(center, scale, 0, size)
  image_pts = np.array([[[10.0, 20.0, 0.5], [600.5, 400.25, 0.7]]])
  grid = affine.warp_points(image_pts[..., :2], matrix)
  poses = np.concatenate([grid, image_pts[..., 2:]], -1).astype(np.float32)
  back = decode.transform_to_image(poses, center, scale, size)
  np.testing.assert_allclose(back, image_pts, atol=1e-3)


@pytest.mark.parametrize('low,step,width,chunk', [
    (10, 61, 256, 4),  # the defaults
    (0, 7, 8, 1),  # dense samples, rows of 8 hot pixels, 1 query a pass
    (100, 997, 16, 4),  # one sample in 997: most queries rescan the maps
])
def test_refine_host_scan_variants_match_reference(monkeypatch, low, step,
                                                   width, chunk):
  heat, tags = _random_maps(6, 40, 56, 2)
  ref_poses, ref_scores = mmpose_grouping.reference_parse(heat, tags,
                                                          solver='scipy')
  monkeypatch.setattr(refine, '_NUMPY_WORK', 0)  # the jitted scan
  monkeypatch.setattr(refine, '_LOW_PERCENTILE', low)
  monkeypatch.setattr(refine, '_SAMPLE_STEP', step)
  monkeypatch.setattr(refine, '_HOT_WIDTH', width)
  monkeypatch.setattr(refine_scan, 'CHUNK', chunk)
  poses, scores = _group(heat, tags)
  np.testing.assert_array_equal(poses, ref_poses)
  np.testing.assert_array_equal(scores, ref_scores)

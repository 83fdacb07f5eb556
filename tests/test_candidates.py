"""Device candidates + host grouping equal grouping.group_poses on full maps.

The reference is the host parser (grouping.py, itself tested against the
mmpose-style parser in tests/references) run on the same full maps.
"""

import jax
import numpy as np
import pytest

from ae_jax.infer import candidates
from ae_jax.infer import grouping


def _maps(seed, k=17, h=48, w=64, tag_dim=2, plateau=False):
  rng = np.random.default_rng(seed)
  heat = rng.uniform(0, 1, (k, h, w)).astype(np.float32) ** 4
  if plateau:  # equal neighbours, as upsampled maps have
    heat = np.repeat(np.repeat(heat[:, ::2, ::2], 2, 1), 2, 2)
  tags = rng.normal(size=(k, h, w, tag_dim)).astype(np.float32) * 2
  return heat, tags


@pytest.mark.parametrize('seed,plateau,params', [
    (0, False, grouping.GroupingParams()),
    (1, True, grouping.GroupingParams(detection_threshold=0.3)),
    (2, False, grouping.GroupingParams(refine=False, max_people=10)),
    (3, True, grouping.GroupingParams(adjust=False, tag_threshold=3.0)),
])
def test_candidates_grouping_equals_full_map_grouping(seed, plateau, params):
  heat, tags = _maps(seed, plateau=plateau)
  # The full-map grouping refines by the host scan of the hot pixels; the
  # candidates path by the jitted scan of the device maps.
  want_poses, want_scores = grouping.group_poses(heat, tags, params)
  cands = jax.device_get(jax.jit(
      candidates.top_candidates, static_argnums=(2, 3))(
          heat, tags, params.max_people, params.nms_kernel))
  stats = {}
  poses, scores = candidates.group_candidates(
      cands, heat.shape[1:], jax.device_put((heat, tags)), params, stats)
  assert want_poses.shape[0] > 3
  np.testing.assert_array_equal(poses, want_poses)
  np.testing.assert_array_equal(scores, want_scores)
  # Only the scan's results came back (not the maps).
  assert 0 < stats.get('bytes_to_host', 0) < heat.nbytes if params.refine \
      else 'bytes_to_host' not in stats


@pytest.mark.parametrize('by_sort', [False, True])
def test_candidates_are_find_candidates_in_topk_order(by_sort):
  heat, tags = _maps(4, plateau=True)
  cands = jax.device_get(candidates.top_candidates(heat, tags, 30, 5,
                                                   by_sort))
  want = grouping.find_candidates(heat, tags, 30, 0.0, 5)
  for k, joint in enumerate(want):
    n = joint.val.size
    np.testing.assert_array_equal(cands['val'][k, :n], joint.val)
    flat = joint.loc[:, 1] * heat.shape[2] + joint.loc[:, 0]
    np.testing.assert_array_equal(cands['idx'][k, :n], flat)
    np.testing.assert_array_equal(cands['tag'][k, :n], joint.tag)

"""Device candidates + host decode equal the full-map host grouping.

The reference is tests/references/host_grouping.py: its own numpy NMS /
top-k (find_candidates), then decode with refine over the numpy maps; its
poses are themselves compared with the mmpose-style parser in
test_grouping.py.
"""

import jax
import numpy as np
import pytest

from ae_jax.infer import candidates
from ae_jax.infer import decode
from ae_jax.infer import refine_scan
from tests.references import host_grouping


def _maps(seed, k=17, h=48, w=64, tag_dim=2, plateau=False):
  rng = np.random.default_rng(seed)
  heat = rng.uniform(0, 1, (k, h, w)).astype(np.float32) ** 4
  if plateau:  # equal neighbours, as upsampled maps have
    heat = np.repeat(np.repeat(heat[:, ::2, ::2], 2, 1), 2, 2)
  tags = rng.normal(size=(k, h, w, tag_dim)).astype(np.float32) * 2
  return heat, tags


@pytest.mark.parametrize('seed,plateau,params', [
    (0, False, decode.GroupingParams()),
    (1, True, decode.GroupingParams(detection_threshold=0.3)),
    (2, False, decode.GroupingParams(refine=False, max_people=10)),
    (3, True, decode.GroupingParams(adjust=False, tag_threshold=3.0)),
])
def test_candidates_grouping_equals_full_map_grouping(seed, plateau, params):
  heat, tags = _maps(seed, plateau=plateau)
  # The full-map grouping refines by the host scan of the hot pixels; the
  # candidates path by the jitted scan of the device maps.
  want = host_grouping.group_poses(heat, tags, params)
  cands = jax.device_get(jax.jit(
      candidates.top_candidates, static_argnums=(2, 3))(
          heat, tags, params.max_people, params.nms_kernel))
  assert isinstance(cands, decode.Candidates)
  stats = {}
  got = decode.decode_candidates(
      cands, heat.shape[2], params,
      refine_scan.device_argmax(*jax.device_put((heat, tags)), stats))
  assert len(want) > 3
  np.testing.assert_array_equal(host_grouping.rows(got),
                                host_grouping.rows(want))
  np.testing.assert_array_equal(got.scores, want.scores)
  # Only the scan's results came back (not the maps).
  assert 0 < stats.get('bytes_to_host', 0) < heat.nbytes if params.refine \
      else 'bytes_to_host' not in stats


@pytest.mark.parametrize('by_sort', [False, True])
def test_candidates_are_find_candidates_in_topk_order(by_sort):
  heat, tags = _maps(4, plateau=True)
  cands = jax.device_get(candidates.top_candidates(heat, tags, 30, 5,
                                                   by_sort))
  want = host_grouping.find_candidates(heat, tags, 30, 0.0, 5)
  for k, joint in enumerate(want):
    n = joint.val.size
    np.testing.assert_array_equal(cands.val[k, :n], joint.val)
    flat = joint.loc[:, 1] * heat.shape[2] + joint.loc[:, 0]
    np.testing.assert_array_equal(cands.idx[k, :n], flat)
    np.testing.assert_array_equal(cands.tag[k, :n], joint.tag)

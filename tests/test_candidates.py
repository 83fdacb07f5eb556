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


@pytest.mark.parametrize('by_sort,hw', [
    (False, (48, 64)),  # 24 chunks of top_k: lax.top_k over whole rows
    (True, (48, 64)),
    (False, (96, 134)),  # 101 chunks, the last one padded: the best chunks
])
def test_candidates_are_find_candidates_in_topk_order(by_sort, hw):
  heat, tags = _maps(4, h=hw[0], w=hw[1], plateau=True)
  cands = jax.device_get(candidates.top_candidates(heat, tags, 30, 5,
                                                   by_sort))
  want = host_grouping.find_candidates(heat, tags, 30, 0.0, 5)
  for k, joint in enumerate(want):
    n = joint.val.size
    np.testing.assert_array_equal(cands.val[k, :n], joint.val)
    flat = joint.loc[:, 1] * heat.shape[2] + joint.loc[:, 0]
    np.testing.assert_array_equal(cands.idx[k, :n], flat)
    np.testing.assert_array_equal(cands.tag[k, :n], joint.tag)


def _reference_nms(heat, kernel):
  """torch MaxPool2d(kernel, 1, (kernel - 1) // 2) == heat, in numpy."""
  pad = kernel // 2
  num, h, w = heat.shape
  padded = np.full((num, h + 2 * pad, w + 2 * pad), -np.inf, np.float32)
  padded[:, pad:pad + h, pad:pad + w] = heat
  pooled = np.max([padded[:, dy:dy + h, dx:dx + w] for dy in range(kernel)
                   for dx in range(kernel)], axis=0)
  return np.where(pooled == heat, heat, -np.inf)


@pytest.mark.parametrize('shape', [(2, 1, 1), (2, 3, 4), (3, 5, 9),
                                   (2, 17, 6), (1, 40, 31)])
@pytest.mark.parametrize('kernel', [1, 3, 5, 7])
def test_nms_equals_padded_max_pool(shape, kernel):
  # Quantised values: plateaus, where equality with the window max decides.
  rng = np.random.default_rng(sum(shape) + kernel)
  heat = (np.round(rng.uniform(size=shape) * 4) / 4).astype(np.float32)
  got = jax.jit(candidates.nms, static_argnums=1)(heat, kernel)
  np.testing.assert_array_equal(np.asarray(got),
                                _reference_nms(heat, kernel))


@pytest.mark.parametrize('n,k,chunk', [
    (1000, 5, 16),  # chunked, n a multiple of nothing: padded
    (1024, 30, 8),  # chunked, exact
    (300, 7, 4),
    (100, 30, 8),  # 13 chunks <= 2k: lax.top_k itself
])
def test_top_k_equals_lax_top_k(n, k, chunk):
  rng = np.random.default_rng(n + k)
  for trial in range(10):
    x = np.round(rng.normal(size=(3, n)) * 2).astype(np.float32)  # ties
    x[rng.uniform(size=x.shape) < 0.7] = -np.inf  # NMS'd maps: mostly -inf
    if trial == 0:
      x[:] = -np.inf
    want = jax.lax.top_k(x, k)
    got = candidates.top_k(jax.numpy.asarray(x), k, chunk)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize('by_sort', [False, True])
def test_top_candidates_exports_with_symbolic_map_sizes(by_sort):
  # SavedModel / ONNX exports trace the map sizes as symbols.
  tags_shape = jax.export.symbolic_shape('k, 32*h, 32*w, 1')
  exported = jax.export.export(jax.jit(
      lambda h, t: candidates.top_candidates(h, t, 6, 5, by_sort)))(
          jax.ShapeDtypeStruct(tags_shape[:3], np.float32),
          jax.ShapeDtypeStruct(tags_shape, np.float32))
  heat, tags = _maps(5, k=3, h=64, w=96, tag_dim=1)
  want = candidates.top_candidates(heat, tags, 6, 5)
  for got, ref in zip(exported.call(heat, tags), want):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))

"""The closed-form affine equals mmpose's 3-point cv2 construction."""

import numpy as np
import pytest

from ae_jax.data import affine

cv2 = pytest.importorskip('cv2')


def _mmpose_style(center, scale, rot, output_size, inv=False):
  """Reference written from mmpose's get_affine_transform description."""
  scale_tmp = np.asarray(scale) * 200.0
  src_w = scale_tmp[0]
  dst_w, dst_h = output_size
  r = np.pi * rot / 180
  sn, cs = np.sin(r), np.cos(r)
  src_dir = np.array([-(src_w * -0.5) * sn, (src_w * -0.5) * cs])
  dst_dir = np.array([0., dst_w * -0.5])
  third = lambda a, b: b + np.array([-(a - b)[1], (a - b)[0]])
  src = np.zeros((3, 2), np.float32)
  dst = np.zeros((3, 2), np.float32)
  src[0] = center
  src[1] = center + src_dir
  src[2] = third(src[0], src[1])
  dst[0] = [dst_w * 0.5, dst_h * 0.5]
  dst[1] = dst[0] + dst_dir
  dst[2] = third(dst[0], dst[1])
  if inv:
    return cv2.getAffineTransform(dst, src)
  return cv2.getAffineTransform(src, dst)


@pytest.mark.parametrize('center,scale,rot,size', [
    ((320, 213), (3.2, 3.2), 0.0, (512, 512)),  # plain resize
    ((250.5, 160.0), (2.4, 1.1), 27.0, (512, 512)),  # rotation
    ((10, 400), (1.0, 5.0), -30.0, (128, 128)),  # heatmap size
    ((320, 214), (3.2, 2.1), 0.0, (768, 512)),  # non-square test resize
])
@pytest.mark.parametrize('inv', [False, True])
def test_matches_three_point_construction(center, scale, rot, size, inv):
  ours = affine.get_affine_transform(center, scale, rot, size, inv=inv)
  ref = _mmpose_style(np.asarray(center, np.float32), scale, rot, size, inv)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


def test_warp_points_inverse_round_trip():
  m = affine.get_affine_transform((100, 80), (1.5, 1.5), 12.0, (64, 64))
  mi = affine.get_affine_transform((100, 80), (1.5, 1.5), 12.0, (64, 64),
                                   inv=True)
  pts = np.random.default_rng(0).uniform(0, 200, (5, 17, 2))
  np.testing.assert_allclose(affine.warp_points(affine.warp_points(pts, m),
                                                mi), pts, atol=1e-9)

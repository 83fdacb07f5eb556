"""The closed-form affine equals mmpose's 3-point cv2 construction."""

import cv2
import numpy as np
import pytest

from ae_jax.data import affine
from tests.references import mmpose_pipeline


@pytest.mark.parametrize('center,scale,rot,size', [
    ((320, 213), (3.2, 3.2), 0.0, (512, 512)),  # plain resize
    ((250.5, 160.0), (2.4, 1.1), 27.0, (512, 512)),  # rotation
    ((10, 400), (1.0, 5.0), -30.0, (128, 128)),  # heatmap size
    ((320, 214), (3.2, 2.1), 0.0, (768, 512)),  # non-square test resize
])
def test_matches_three_point_construction(center, scale, rot, size):
  ours = affine.get_affine_transform(center, scale, rot, size)
  ref = mmpose_pipeline.get_affine_transform(
      np.asarray(center, np.float32), scale, rot, size)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)


def test_warp_points_is_cv2_transform():
  m = affine.get_affine_transform((100, 80), (1.5, 1.5), 12.0, (64, 64))
  pts = np.random.default_rng(0).uniform(0, 200, (5, 17, 2))
  want = cv2.transform(pts.reshape(-1, 1, 2), m).reshape(pts.shape)
  np.testing.assert_allclose(affine.warp_points(pts, m), want, atol=1e-9)

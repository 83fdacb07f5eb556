"""eval_input's test-time sizes and warp (mmpose's BottomUpGetImgSize and
BottomUpResizeAlign).

Sizes from mmpose's rule (short side to size, long side rounded up to 64)
are worked out by hand; the warp is compared with cv2.warpAffine of the
matrix built from data/affine (the OpenCV 4 arithmetic itself is checked in
test_opencv_warp.py).
"""

import cv2
import numpy as np
import pytest

from ae_jax.data import affine
from ae_jax.data import eval_input


@pytest.mark.parametrize('hw,size,scale,min_scale,want', [
    # landscape 480x640, 512: short 512, long ceil64(682.7) = 704
    ((480, 640), 512, 1, 1, (704, 512)),
    # portrait 640x427: short 512, long ceil64(767.4) = 768
    ((640, 427), 512, 1, 1, (512, 768)),
    # multi-scale min 0.5: aligned at 256 (long ceil64(341.3)=384), x2
    ((480, 640), 512, 1, 0.5, (768, 512)),
    ((480, 640), 512, 2, 0.5, (1536, 1024)),
    ((480, 640), 512, 0.5, 0.5, (384, 256)),
    # square stays square
    ((128, 128), 128, 1, 1, (128, 128)),
])
def test_multi_scale_size(hw, size, scale, min_scale, want):
  got, center, s = eval_input.get_multi_scale_size(*hw, size, scale,
                                                   min_scale)
  assert got == want
  h, w = hw
  np.testing.assert_array_equal(center, [round(w / 2), round(h / 2)])
  # scale covers the short side and keeps the output aspect ratio.
  if w >= h:
    assert s[1] == h / 200.0
  else:
    assert s[0] == w / 200.0
  np.testing.assert_allclose(s[0] / s[1], want[0] / want[1])


def test_resize_align_is_mmpose_warp():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (90, 130, 3), np.uint8)
  out = eval_input.resize_align(image, 128, 1.0, 1.0)
  (w, h), center, scale = eval_input.get_multi_scale_size(90, 130, 128, 1, 1)
  ref = cv2.warpAffine(image, affine.get_affine_transform(
      center, scale, 0, (w, h)), (w, h), flags=cv2.INTER_LINEAR)
  assert out.shape == (128, 192, 3)
  np.testing.assert_array_equal(out, ref)


def test_resize_inputs_per_scale():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 255, (90, 130, 3), np.uint8)
  x = eval_input.resize_inputs(image, 128, (2.0, 1.0, 0.5))
  # min scale 0.5 aligns at 64 (long side ceil64(92.4) = 128), x2, x4.
  assert x.shapes == ((256, 512, 3), (128, 256, 3), (64, 128, 3))
  assert x.base_hw == (128, 256)
  for s, got in zip((2.0, 1.0, 0.5), x.images):
    np.testing.assert_array_equal(
        got, eval_input.resize_align(image, 128, s, 0.5))
  _, center, scale = eval_input.get_multi_scale_size(90, 130, 128, 1.0, 0.5)
  np.testing.assert_array_equal(x.center, center)
  np.testing.assert_array_equal(x.scale, scale)

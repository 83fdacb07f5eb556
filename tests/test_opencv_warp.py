"""The image warps are OpenCV 4.x's, as mmpose 0.x runs them.

OpenCV 5 computes `warpAffine`'s bilinear interpolation differently (float
weights), so on a mini COCO image it differs from 4.x on a few percent of
the pixels by up to 5 levels, and mmpose's poses are no longer reproduced
(README, "Why OpenCV 4"). The reference here is a numpy implementation of
OpenCV 4's fixed-point scheme (tests/references/opencv4_warp.py), applied
to the matrices our train and test paths build, on real images.
"""

import glob
import os
import zlib

import cv2
import numpy as np
import pytest

from ae_jax.data import affine
from ae_jax.data import eval_input
from ae_jax.data import transforms
from tests.conftest import REPO_ROOT
from tests.references import opencv4_warp

IMAGES = sorted(glob.glob(os.path.join(REPO_ROOT, 'data', 'coco_mini',
                                       'val2017', '*.jpg')))


def _rgb(path):
  return cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)


def _report(got, want):
  diff = np.abs(got.astype(np.int64) - want)
  return f'{(diff > 0).mean():.2%} of pixels differ, max {diff.max()} levels'


def test_opencv_major_version_is_4():
  assert cv2.__version__.split('.')[0] == '4', (
      f'OpenCV {cv2.__version__}: mmpose parity needs 4.x (pyproject pin)')


def test_reference_is_not_trivially_equal():
  # A shifted, rotated warp must interpolate (not copy) most pixels, so the
  # comparisons below exercise the weights, the rounding and the border.
  image = _rgb(IMAGES[0])
  aug = transforms.AugParams(rot=17.3, scale=1.21, dx=13.7, dy=-8.2,
                             flip=False)
  mat, _ = transforms.affine_matrices(*image.shape[:2], aug, (512, 512),
                                      (128, 128))
  want = opencv4_warp.warp_affine(image, mat, (512, 512))
  assert (want == 0).all(axis=-1).mean() > 0.01  # some border
  nearest = cv2.warpAffine(image, mat, (512, 512), flags=cv2.INTER_NEAREST)
  assert (nearest != want).mean() > 0.3


@pytest.mark.parametrize('path', IMAGES, ids=os.path.basename)
def test_train_warps_equal_opencv4(path):
  # Random affine parameters over mmpose's ranges (rot +-30, scale
  # 0.75-1.5, shift +-40 px), square and rectangular outputs.
  image = _rgb(path)
  height, width = image.shape[:2]
  ignore = np.zeros((height, width), np.uint8)
  ignore[height // 3:height // 2, width // 4:width // 2] = 1
  rng = np.random.default_rng(zlib.crc32(os.path.basename(path).encode()))
  for sizes in ((512, 128), ((448, 256), (112, 64))):
    input_wh, heatmap_wh = transforms.train_sizes(*sizes)
    aug = transforms.AugParams(
        rot=rng.uniform(-30, 30), scale=rng.uniform(0.75, 1.5),
        dx=rng.uniform(-40, 40), dy=rng.uniform(-40, 40), flip=False)
    keypoints = np.zeros((1, 17, 3), np.float32)
    got_image, got_mask, _ = transforms.transform_example(
        image, ignore, keypoints, aug, input_wh, heatmap_wh)
    mat_in, mat_hm = transforms.affine_matrices(height, width, aug,
                                                input_wh, heatmap_wh)
    want = opencv4_warp.warp_affine(image, mat_in, input_wh)
    assert np.array_equal(got_image, want), _report(got_image, want)
    valid = opencv4_warp.warp_affine((1 - ignore) * np.uint8(255), mat_hm,
                                     heatmap_wh)
    want_mask = (valid / 255.0 > 0.5).astype(np.float32)
    assert np.array_equal(got_mask, want_mask)


@pytest.mark.parametrize('scale', [0.5, 1.0, 2.0])
def test_test_time_resize_equals_opencv4(scale):
  for path in IMAGES:
    image = _rgb(path)
    got = eval_input.resize_align(image, 512, scale, min(scale, 1.0))
    size, center, box = eval_input.get_multi_scale_size(
        *image.shape[:2], 512, scale, min(scale, 1.0))
    matrix = affine.get_affine_transform(center, box, 0, size)
    want = opencv4_warp.warp_affine(image, matrix, size)
    assert np.array_equal(got, want), _report(got, want)

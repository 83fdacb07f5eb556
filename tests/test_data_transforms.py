"""Train transforms with fixed parameters equal an mmpose-style cv2 reference.

The reference is tests/references/mmpose_pipeline.py (written from mmpose
0.x's description: mmcv decode, `_get_mask`, the 3-point
get_affine_transform, warps of image and mask * 255, flip after the affine,
ToTensor + NormalizeTensor, the HeatmapGenerator / JointsEncoder loops).

Tolerances, and why: our matrix is mmpose's in closed form, equal to the
3-point construction (on float32 points) to ~1e-4 output px, and OpenCV 4
snaps source coordinates to 1/32 px, so a handful of pixels may round the
other way, by a step of the image at a sharp edge: the uint8 image may
differ by <= 8 levels on < 0.1% of pixels (measured with the pinned OpenCV
4.14: 6 levels, < 0.08%; OpenCV 5 gave 1 level, < 0.04%), the mask on
< 0.5% of pixels (measured: none). Joints agree to 1e-4 heatmap px
(measured 1.5e-5) and fall in the same integer cells, so heatmaps (1e-6,
float32 exp) and encodings (exact) match.
"""

import cv2
import numpy as np
from pycocotools import coco as coco_api
import pytest

from ae_jax.data import coco
from ae_jax.data import device_targets
from ae_jax.data import transforms
from ae_jax.models import ae_model
from tests.references import mmpose_pipeline

SPLIT = 'val2017'


def _wh(size):
  return (size, size) if np.isscalar(size) else tuple(size)


def _reference(root, image_id, aug, s_in, s_hm, scale_type='short'):
  """One example as mmpose's train pipeline builds it (the reference)."""
  api = coco_api.COCO(str(root / 'annotations' /
                          f'person_keypoints_{SPLIT}.json'))
  info = api.imgs[image_id]
  img = mmpose_pipeline.read_rgb(str(root / SPLIT / info['file_name']))
  anns = api.loadAnns(api.getAnnIds(imgIds=image_id))
  ref = mmpose_pipeline.train_example(
      img, anns, rot=aug.rot, aug_scale=aug.scale, shift=(aug.dx, aug.dy),
      flip=aug.flip, input_wh=_wh(s_in), heatmap_wh=_wh(s_hm),
      scale_type=scale_type)
  return dict(uint8=ref['uint8'], image=ref['image'].transpose(1, 2, 0),
              mask=ref['mask'], joints_xy=ref['joints'],
              heatmaps=ref['heatmaps'].transpose(1, 2, 0), enc=ref['enc'])


def _ours(root, image_id, aug, s_in, s_hm, scale_type='short'):
  index = coco.load_coco_index(str(root), SPLIT)
  i = [e.image_id for e in index.examples].index(image_id)
  ex = index.examples[i]
  image = coco.decode_image(index.image_path(i))
  ignore = coco.decode_ignore_mask(ex.ignore_rle, ex.height, ex.width)
  in_wh, hm_wh = transforms.train_sizes(s_in, s_hm)
  out, mask, joints = transforms.transform_example(
      image, ignore, ex.keypoints, aug, in_wh, hm_wh, scale_type)
  keypoints = np.zeros((1, 30, 17, 3), np.float32)
  keypoints[0, :len(joints)] = joints
  tgt = device_targets.render_targets(
      {'mask': mask[None], 'keypoints': keypoints}, sigma=2.0)
  return dict(
      uint8=out, image=np.asarray(ae_model.normalize_images(out)), mask=mask,
      joints_xy=joints, heatmaps=np.asarray(tgt['heatmaps'][0]),
      enc=np.asarray(tgt['joints'][0]))


def _compare(ours, ref):
  diff = np.abs(ours['uint8'].astype(int) - ref['uint8'])
  assert (diff > 0).mean() < 1e-3 and diff.max() <= 8, diff.max()
  assert (ours['mask'] != ref['mask']).mean() < 5e-3
  np.testing.assert_allclose(ours['joints_xy'], ref['joints_xy'], atol=1e-4)
  # Same integer cells (true for these parameters) -> identical targets.
  np.testing.assert_array_equal(np.trunc(ours['joints_xy'][..., :2]),
                                np.trunc(ref['joints_xy'][..., :2]))
  np.testing.assert_allclose(ours['heatmaps'], ref['heatmaps'], atol=1e-6)
  np.testing.assert_array_equal(ours['enc'], ref['enc'])
  same = diff == 0
  np.testing.assert_allclose(ours['image'][same], ref['image'][same],
                             atol=1e-6)


AUGS = [
    transforms.AugParams(),  # identity: centred 'short' crop
    transforms.AugParams(rot=23.5, scale=0.8, dx=-7, dy=5, flip=True),
    transforms.AugParams(rot=-30.0, scale=1.5, dx=12, dy=-15, flip=False),
]


@pytest.mark.parametrize('image_id', [785, 40083, 196141, 197388])
@pytest.mark.parametrize('aug', AUGS)
def test_small_matches_mmpose_reference(coco_mini_root, image_id, aug):
  _compare(_ours(coco_mini_root, image_id, aug, 128, 32),
           _reference(coco_mini_root, image_id, aug, 128, 32))


def test_full_size_matches_mmpose_reference(coco_mini_root):
  aug = transforms.AugParams(rot=-11.0, scale=1.2, dx=3, dy=-9, flip=True)
  _compare(_ours(coco_mini_root, 196141, aug, 512, 128),
           _reference(coco_mini_root, 196141, aug, 512, 128))


# Rectangular sizes (w, h): wide (the mini COCO demo's 448 x 256 at 1/4) and
# tall, so both branches of _get_scale run for every scale type.
RECT_SIZES = [((112, 64), (28, 16)), ((64, 112), (16, 28))]


@pytest.mark.parametrize('image_id', [785, 40083, 196141, 197388])
@pytest.mark.parametrize('sizes', RECT_SIZES)
@pytest.mark.parametrize('scale_type', ['short', 'long'])
def test_rectangular_matches_mmpose_reference(coco_mini_root, image_id, sizes,
                                              scale_type):
  aug = transforms.AugParams(rot=17.0, scale=0.9, dx=-4, dy=6, flip=True)
  ours = _ours(coco_mini_root, image_id, aug, *sizes, scale_type)
  (in_w, in_h), (hm_w, hm_h) = sizes
  assert ours['uint8'].shape == (in_h, in_w, 3)
  assert ours['mask'].shape == (hm_h, hm_w)
  assert ours['heatmaps'].shape == (hm_h, hm_w, 17)
  _compare(ours, _reference(coco_mini_root, image_id, aug, *sizes,
                            scale_type))


@pytest.mark.parametrize('aug', AUGS[:2])
def test_rectangular_full_size_matches_mmpose_reference(coco_mini_root, aug):
  """The coco_mini training setup: (448, 256) input, (112, 64) maps."""
  _compare(_ours(coco_mini_root, 785, aug, (448, 256), (112, 64), 'long'),
           _reference(coco_mini_root, 785, aug, (448, 256), (112, 64),
                      'long'))


def test_square_pair_equals_int(coco_mini_root):
  aug = AUGS[1]
  a = _ours(coco_mini_root, 40083, aug, 128, 32)
  b = _ours(coco_mini_root, 40083, aug, (128, 128), (32, 32))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_as_wh():
  assert transforms.as_wh(512) == (512, 512)
  assert transforms.as_wh(np.int64(64)) == (64, 64)
  assert transforms.as_wh((448, 256)) == (448, 256)
  assert transforms.as_wh([112, 64]) == (112, 64)
  with pytest.raises(ValueError, match='int or a'):
    transforms.as_wh((1, 2, 3))
  with pytest.raises(ValueError, match='int or a'):
    transforms.as_wh('big')


def test_train_sizes_normalise_once_and_check_the_stride():
  assert transforms.train_sizes(512, 128) == ((512, 512), (128, 128))
  assert transforms.train_sizes((448, 256), [112, 64]) == ((448, 256),
                                                           (112, 64))
  # The heatmap is the model's output: input / 4, else a one-line error
  # naming the key (it used to abort deep in a broadcast of the loss).
  with pytest.raises(ValueError, match=r'heatmap_size 100 .* \(128, 128\)'):
    transforms.train_sizes(512, 100)
  with pytest.raises(ValueError, match='heatmap_size'):
    transforms.train_sizes((448, 256), (112, 112))


@pytest.mark.parametrize('image_id', [785, 40083, 196141, 197388])
def test_long_rect_training_view_is_the_test_view(coco_mini_root, image_id):
  """configs/coco_mini.py trains on (448, 256) 'long' unaugmented; at test
  input_size 256, eval_input.resize_align warps each image with the same zoom
  and box center. The only differences: mmpose's train center is (w/2, h/2)
  and the test center is rounded (round half to even), so images with an
  odd side are shifted by 0.5 image px (<= 0.31 input px here); and an
  image whose test width is narrower than 448 (196141: 384) sees the
  central columns of the training view."""
  from ae_jax.data import affine  # pylint: disable=g-import-not-at-top
  from ae_jax.data import eval_input  # pylint: disable=g-import-not-at-top
  index = coco.load_coco_index(str(coco_mini_root), SPLIT)
  ex = [e for e in index.examples if e.image_id == image_id][0]
  h, w = ex.height, ex.width
  mat_train, _ = transforms.affine_matrices(
      h, w, transforms.AugParams(), (448, 256), (112, 64), 'long')
  (tw, th), t_center, t_scale = eval_input.get_multi_scale_size(
      h, w, 256, 1.0, 1.0)
  mat_test = affine.get_affine_transform(t_center, t_scale, 0, (tw, th))
  assert th == 256
  # Same zoom (the image height fills 256 rows in both views).
  np.testing.assert_allclose(mat_train[:, :2], mat_test[:, :2], rtol=1e-12)
  # Translation: a column offset for a narrower test view, plus the image
  # of the center difference.
  offset = np.array([(448 - tw) / 2.0, 0.0])
  center_shift = mat_test[:, :2] @ (t_center - (w / 2.0, h / 2.0))
  np.testing.assert_allclose(mat_train[:, 2] - mat_test[:, 2],
                             offset + center_shift, atol=1e-9)
  assert np.abs(center_shift).max() <= 0.5 * 256 / h
  image = cv2.cvtColor(cv2.imread(str(coco_mini_root / SPLIT / ex.file_name)),
                       cv2.COLOR_BGR2RGB)
  ignore = np.zeros((h, w), np.uint8)
  train_view, _, _ = transforms.transform_example(
      image, ignore, ex.keypoints, transforms.AugParams(), (448, 256),
      (112, 64), 'long')
  test_view = eval_input.resize_align(image, 256, 1.0, 1.0)
  x0 = (448 - tw) // 2
  train_view = train_view[:, x0:x0 + tw]
  if h % 2 == 0 and w % 2 == 0:  # same center: the same pixels
    np.testing.assert_allclose(mat_train[:, 2] - mat_test[:, 2], offset,
                               atol=1e-9)
    np.testing.assert_array_equal(train_view, test_view)
  else:  # a <= 0.31 px vertical shift: close, not equal
    diff = np.abs(train_view.astype(int) - test_view).mean()
    # Measured 2.7-7.0 levels; a 1-row misalignment gives 6.5-17.5.
    one_row = np.abs(train_view[1:].astype(int) - test_view[:-1]).mean()
    assert diff < 0.5 * one_row, (diff, one_row)


def test_flip_swaps_left_right(coco_mini_root):
  """Flipped joint k sits at the mirror of unflipped joint FLIP_INDEX[k]."""
  plain = _ours(coco_mini_root, 785, transforms.AugParams(rot=5.0), 128, 32)
  flip = _ours(coco_mini_root, 785,
               transforms.AugParams(rot=5.0, flip=True), 128, 32)
  lw, rw = 9, 10  # left / right wrist
  np.testing.assert_allclose(flip['joints_xy'][0, lw, 0],
                             32 - 1 - plain['joints_xy'][0, rw, 0], atol=1e-5)
  np.testing.assert_allclose(flip['joints_xy'][0, lw, 1],
                             plain['joints_xy'][0, rw, 1], atol=1e-5)
  np.testing.assert_array_equal(flip['uint8'], plain['uint8'][:, ::-1])
  np.testing.assert_array_equal(flip['mask'], plain['mask'][:, ::-1])
  # The flipped left-wrist map peaks at int() of the mirrored right wrist
  # (mmpose truncates after mirroring, so maps are mirrored within 1 px).
  x, y = flip['joints_xy'][0, lw, :2]
  assert flip['heatmaps'][int(y), int(x), lw] == 1.0
  py, px = np.unravel_index(plain['heatmaps'][..., rw].argmax(), (32, 32))
  assert int(y) == py and abs(int(x) - (31 - px)) <= 1


def test_shift_matches_randint_range():
  # mmpose: randint(-40 * 640 * 1.2 / 200, 40 * 640 * 1.2 / 200) = [-153, 153)
  assert transforms.translation_range(640, 1.2, 40) == (-153, 153)
  shifts = [transforms.shift_from_uniform(u, 640, 1.2, 40)
            for u in np.linspace(0, 1, 1000, endpoint=False)]
  assert min(shifts) == -153 and max(shifts) == 152
  assert transforms.shift_from_uniform(0.5, 640, 1.2, 0) == 0

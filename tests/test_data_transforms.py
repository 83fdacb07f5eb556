"""Train transforms with fixed parameters equal an mmpose-style cv2 reference.

The reference below is written from mmpose 0.x's description: mmcv decode
(cv2 BGR -> RGB), `_get_mask` (sum of decoded crowd / no-keypoint masks,
valid = m < 0.5), the 3-point cv2.getAffineTransform on float32 points,
cv2.warpAffine of the image (input size) and of mask * 255 (heatmap size,
then > 0.5), flip after the affine, ToTensor + NormalizeTensor, and the
HeatmapGenerator / JointsEncoder loops.

Tolerances, and why: our matrix is mmpose's in closed form, equal to the
3-point construction to ~1e-12 px, and cv2 snaps source coordinates to 1/32
px, so a handful of pixels may round the other way: the uint8 image may
differ by <= 2 levels on < 0.1% of pixels (measured: 1 level, < 0.04%),
the mask on < 0.5% of pixels (measured: none). Joints agree to 1e-4 heatmap
px (measured 1.5e-5) and fall in the same integer cells, so heatmaps (1e-6,
float32 exp) and encodings (exact) match.
"""

import numpy as np
import pytest

cv2 = pytest.importorskip('cv2')
tf = pytest.importorskip('tensorflow')

from pycocotools import coco as coco_api  # pylint: disable=g-import-not-at-top
from pycocotools import mask as mask_api  # pylint: disable=g-import-not-at-top

from ae_jax.data import coco  # pylint: disable=g-import-not-at-top
from ae_jax.data import targets  # pylint: disable=g-import-not-at-top
from ae_jax.data import transforms  # pylint: disable=g-import-not-at-top
from ae_jax.keypoints import FLIP_INDEX  # pylint: disable=g-import-not-at-top
from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SPLIT = 'val2017'


def _mmpose_matrix(center, scale, rot, size):
  """get_affine_transform: 3 float32 point pairs -> cv2.getAffineTransform.

  size is the output (w, h); as in mmpose only its width sets the zoom.
  """
  src_w = scale[0] * 200.0
  dst_w, dst_h = size
  r = np.deg2rad(rot)
  src_dir = np.array([-(src_w * -0.5) * np.sin(r), (src_w * -0.5) * np.cos(r)])
  dst_dir = np.array([0.0, dst_w * -0.5])
  perp = lambda a, b: b + np.array([-(a - b)[1], (a - b)[0]])
  src = np.zeros((3, 2), np.float32)
  dst = np.zeros((3, 2), np.float32)
  src[0], src[1] = center, center + src_dir
  dst[0] = dst[1] = (dst_w * 0.5, dst_h * 0.5)
  dst[1] = dst[0] + dst_dir
  src[2], dst[2] = perp(src[0], src[1]), perp(dst[0], dst[1])
  return cv2.getAffineTransform(src, dst)


def _get_scale(img_scale, out_size, scale_type):
  """BottomUpRandomAffine._get_scale: box (w, h) px, float32 as mmpose."""
  w, h = img_scale
  w_out, h_out = out_size
  if w / w_out < h / h_out:
    if scale_type == 'long':
      box = (h / h_out * w_out, h)
    else:
      box = (w, w / w_out * h_out)
  else:
    if scale_type == 'long':
      box = (w, w / w_out * h_out)
    else:
      box = (h / h_out * w_out, h)
  return np.array(box, np.float32)


def _reference(root, image_id, aug, s_in, s_hm, scale_type='short', sigma=2,
               max_people=30):
  """One example as mmpose's train pipeline builds it (loops, cv2)."""
  api = coco_api.COCO(str(root / 'annotations' /
                          f'person_keypoints_{SPLIT}.json'))
  info = api.imgs[image_id]
  bgr = cv2.imread(str(root / SPLIT / info['file_name']), cv2.IMREAD_COLOR)
  img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
  h, w = info['height'], info['width']
  anns = api.loadAnns(api.getAnnIds(imgIds=image_id))
  m = np.zeros((h, w), np.float32)
  for obj in anns:
    if obj['iscrowd']:
      m += mask_api.decode(mask_api.frPyObjects(obj['segmentation'], h, w))
    elif obj['num_keypoints'] == 0:
      for rle in mask_api.frPyObjects(obj['segmentation'], h, w):
        m += mask_api.decode(rle)
  valid = m < 0.5
  people = [a for a in anns if a['iscrowd'] == 0 or a['num_keypoints'] > 0]
  joints = np.array([np.reshape(a['keypoints'], (-1, 3)) for a in people],
                    np.float32)
  # BottomUpRandomAffine: sizes are an int (square) or (w, h).
  in_w, in_h = (s_in, s_in) if np.isscalar(s_in) else s_in
  hm_w, hm_h = (s_hm, s_hm) if np.isscalar(s_hm) else s_hm
  center = np.array((w / 2, h / 2)) + (aug.dx, aug.dy)
  img_scale = np.array([w, h], np.float32) * np.float32(aug.scale)
  mat_hm = _mmpose_matrix(center, _get_scale(img_scale, (hm_w, hm_h),
                                             scale_type) / 200.0,
                          aug.rot, (hm_w, hm_h))
  mat_in = _mmpose_matrix(center, _get_scale(img_scale, (in_w, in_h),
                                             scale_type) / 200.0,
                          aug.rot, (in_w, in_h))
  mask = cv2.warpAffine((valid * 255).astype(np.uint8), mat_hm,
                        (hm_w, hm_h)) / 255
  mask = (mask > 0.5).astype(np.float32)
  for p in range(len(joints)):
    for k in range(17):
      x, y = joints[p, k, :2]
      joints[p, k, :2] = mat_hm @ np.array([x, y, 1.0])
  out = cv2.warpAffine(img, mat_in, (in_w, in_h))
  if aug.flip:  # BottomUpRandomFlip: mirror in the map width
    out = out[:, ::-1].copy()
    mask = mask[:, ::-1].copy()
    joints = joints[:, FLIP_INDEX]
    joints[:, :, 0] = hm_w - joints[:, :, 0] - 1
  hms = np.zeros((17, hm_h, hm_w), np.float32)
  xs = np.arange(0, 6 * sigma + 3, 1, np.float32)
  g = np.exp(-((xs - 3 * sigma - 1)**2 + (xs[:, None] - 3 * sigma - 1)**2) /
             (2 * sigma**2))
  enc = np.zeros((max_people, 17, 2), np.int32)
  for p, person in enumerate(joints):
    tot = 0
    for k, (x, y, v) in enumerate(person):
      xi, yi = int(x), int(y)
      if v <= 0 or not (0 <= xi < hm_w and 0 <= yi < hm_h):
        continue
      enc[p, tot] = (k * hm_w * hm_h + yi * hm_w + xi, 1)
      tot += 1
      for dy in range(len(xs)):
        for dx in range(len(xs)):
          py, px = yi - 3 * sigma - 1 + dy, xi - 3 * sigma - 1 + dx
          if 0 <= py < hm_h and 0 <= px < hm_w:
            hms[k, py, px] = max(hms[k, py, px], g[dy, dx])
  norm = (out.astype(np.float32) / 255.0 - MEAN) / STD
  return dict(uint8=out, image=norm, mask=mask, joints_xy=joints,
              heatmaps=hms.transpose(1, 2, 0), enc=enc)


def _ours(root, image_id, aug, s_in, s_hm, scale_type='short'):
  index = coco.load_coco_index(str(root), SPLIT)
  ex = [e for e in index.examples if e.image_id == image_id][0]
  bgr = cv2.imread(str(root / SPLIT / ex.file_name), cv2.IMREAD_COLOR)
  image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
  ignore = coco.decode_ignore_mask(ex.ignore_rle, ex.height, ex.width)
  out, mask, joints = transforms.transform_example(
      image, ignore, ex.keypoints, aug, s_in, s_hm, scale_type)
  return dict(
      uint8=out, image=np.asarray(ae_model.normalize_images(out)), mask=mask,
      joints_xy=joints,
      heatmaps=targets.generate_heatmaps(joints, s_hm, 2.0).numpy(),
      enc=targets.encode_joints(joints, s_hm, 30).numpy(),
      heatmaps_np=targets.generate_heatmaps_np(joints, s_hm, 2.0),
      enc_np=targets.encode_joints_np(joints, s_hm, 30))


def _compare(ours, ref):
  diff = np.abs(ours['uint8'].astype(int) - ref['uint8'])
  assert (diff > 0).mean() < 1e-3 and diff.max() <= 2, diff.max()
  assert (ours['mask'] != ref['mask']).mean() < 5e-3
  np.testing.assert_allclose(ours['joints_xy'], ref['joints_xy'], atol=1e-4)
  # Same integer cells (true for these parameters) -> identical targets.
  np.testing.assert_array_equal(np.trunc(ours['joints_xy'][..., :2]),
                                np.trunc(ref['joints_xy'][..., :2]))
  np.testing.assert_allclose(ours['heatmaps'], ref['heatmaps'], atol=1e-6)
  np.testing.assert_array_equal(ours['enc'], ref['enc'])
  np.testing.assert_allclose(ours['heatmaps_np'], ref['heatmaps'], atol=1e-6)
  np.testing.assert_array_equal(ours['enc_np'], ref['enc'])
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


@pytest.mark.parametrize('image_id', [785, 40083, 196141, 197388])
def test_long_rect_training_view_is_the_test_view(coco_mini_root, image_id):
  """configs/coco_mini.py trains on (448, 256) 'long' unaugmented; at test
  input_size 256, inference.resize_align warps each image with the same zoom
  and box center. The only differences: mmpose's train center is (w/2, h/2)
  and the test center is rounded (round half to even), so images with an
  odd side are shifted by 0.5 image px (<= 0.31 input px here); and an
  image whose test width is narrower than 448 (196141: 384) sees the
  central columns of the training view."""
  from ae_jax import inference  # pylint: disable=g-import-not-at-top
  from ae_jax.data import affine  # pylint: disable=g-import-not-at-top
  index = coco.load_coco_index(str(coco_mini_root), SPLIT)
  ex = [e for e in index.examples if e.image_id == image_id][0]
  h, w = ex.height, ex.width
  mat_train, _ = transforms.affine_matrices(
      h, w, transforms.AugParams(), (448, 256), (112, 64), 'long')
  (tw, th), t_center, t_scale = inference.get_multi_scale_size(
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
  test_view = inference.resize_align(image, 256, 1.0, 1.0)
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


@pytest.mark.parametrize('mode', ['eager', 'map'])
def test_sample_augmentation_ranges(mode):
  def draw(seed):
    return tf.stack(transforms.sample_augmentation(
        seed, 30.0, (0.75, 1.5), 0.5))
  seeds = tf.stack([tf.zeros([256], tf.int64), tf.range(256, dtype=tf.int64)],
                   1)
  if mode == 'eager':
    got = np.stack([draw(s).numpy() for s in seeds])
  else:
    got = np.stack(list(
        tf.data.Dataset.from_tensor_slices(seeds).map(draw).as_numpy_iterator()))
  rot, scale, udx, udy, flip = got.T
  assert np.abs(rot).max() <= 30 and rot.std() > 10
  assert scale.min() >= 0.75 and scale.max() <= 1.5
  assert 0 <= udx.min() and udy.max() < 1
  assert set(np.unique(flip)) == {0.0, 1.0} and 0.3 < flip.mean() < 0.7
  again = tf.stack(transforms.sample_augmentation(seeds[7], 30.0, (0.75, 1.5),
                                                  0.5)).numpy()
  np.testing.assert_array_equal(again, got[7])  # stateless: same seed, same


def test_shift_matches_randint_range():
  # mmpose: randint(-40 * 640 * 1.2 / 200, 40 * 640 * 1.2 / 200) = [-153, 153)
  assert transforms.translation_range(640, 1.2, 40) == (-153, 153)
  shifts = [transforms.shift_from_uniform(u, 640, 1.2, 40)
            for u in np.linspace(0, 1, 1000, endpoint=False)]
  assert min(shifts) == -153 and max(shifts) == 152
  assert transforms.shift_from_uniform(0.5, 640, 1.2, 0) == 0

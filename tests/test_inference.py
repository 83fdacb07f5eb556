"""Inference: resize-align sizes, torch-equal bilinear, flip/multi-scale maps.

References are built in the test: sizes from mmpose's rule
(BottomUpGetImgSize: short side to size, long side rounded up to 64) worked
out by hand, maps from the raw model outputs with numpy flips and torch's
interpolate.
"""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ae_jax.infer import decode
from ae_jax.infer import predict
from ae_jax import keypoints
from ae_jax.data import affine
from ae_jax.models import ae_model
from tests.conftest import random_variables
from tests.references import host_grouping

torch = pytest.importorskip('torch')


@pytest.fixture(scope='module')
def tiny():
  model = ae_model.AEModel(widen_factor=0.25, num_deconv_filters=(16, 16, 16))
  return model, random_variables(model)


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
  got, center, s = predict.get_multi_scale_size(*hw, size, scale,
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
  out = predict.resize_align(image, 128, 1.0, 1.0)
  (w, h), center, scale = predict.get_multi_scale_size(90, 130, 128, 1, 1)
  ref = cv2.warpAffine(image, affine.get_affine_transform(
      center, scale, 0, (w, h)), (w, h), flags=cv2.INTER_LINEAR)
  assert out.shape == (128, 192, 3)
  np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize('src,dst', [
    ((8, 12), (32, 48)),  # x4: model output -> input size
    ((16, 22), (32, 44)),  # x2
    ((8, 11), (64, 88)),  # x8 (scale 0.5 -> base)
    ((7, 10), (20, 33)),  # uneven ratios
])
def test_resize_matches_torch_bilinear(src, dst):
  rng = np.random.default_rng(1)
  maps = rng.normal(size=src + (5,)).astype(np.float32)
  ours = np.asarray(predict.resize_bilinear(jnp.asarray(maps), *dst))
  ref = torch.nn.functional.interpolate(
      torch.from_numpy(maps).permute(2, 0, 1)[None], size=dst,
      mode='bilinear', align_corners=False)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def _reference_maps(model, variables, images, scales, flip, base_hw):
  """mmpose forward_test order with raw outputs, numpy flips, torch resize."""
  def resize(x):  # [h, w, C] -> base size
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]
    t = torch.nn.functional.interpolate(t, size=base_hw, mode='bilinear',
                                        align_corners=False)
    return t[0].permute(1, 2, 0).numpy()

  heat_list, tags = [], None
  apply = jax.jit(model.apply)
  for s, image in zip(scales, images):
    x = (image.astype(np.float32) / 255 - keypoints.IMAGENET_MEAN) / (
        keypoints.IMAGENET_STD)
    out = np.asarray(apply(variables, x[None]))[0]
    heat, tag = resize(out[..., :K]), resize(out[..., K:])
    tag_list = [tag]
    if flip:
      out_f = np.asarray(apply(variables, x[None, :, ::-1].copy()))[0]
      out_f = out_f[:, ::-1]
      heat_f = resize(out_f[..., :K][..., keypoints.FLIP_INDEX])
      tag_list.append(resize(out_f[..., K:][..., keypoints.FLIP_INDEX]))
      heat = (heat + heat_f) / 2
    heat_list.append(heat)
    if s == 1 or len(scales) == 1:
      tags = np.stack(tag_list, -1)
  heat = sum(heat_list) / len(heat_list)
  return heat.transpose(2, 0, 1), tags.transpose(2, 0, 1, 3)


K = keypoints.NUM_JOINTS


@pytest.mark.parametrize('scales,flip', [
    ((2.0, 1.0, 0.5), True),  # the paper's multi-scale flip test
    ((1.0,), False),
])
def test_maps_match_reference(tiny, scales, flip):
  model, variables = tiny
  rng = np.random.default_rng(2)
  image = rng.integers(0, 255, (70, 100, 3), np.uint8)
  predictor = predict.Predictor(model, variables, input_size=64,
                                  scales=scales, flip=flip)
  (heat, tags), center, scale = predictor.maps(image)
  min_scale = min(scales)
  (bw, bh), _, _ = predict.get_multi_scale_size(70, 100, 64, 1, min_scale)
  images = [predict.resize_align(image, 64, s, min_scale)
            for s in predictor.scales]
  ref_heat, ref_tags = _reference_maps(model, variables, images,
                                       predictor.scales, flip, (bh, bw))
  assert heat.shape == (K, bh, bw)
  assert tags.shape == (K, bh, bw, 2 if flip else 1)
  np.testing.assert_allclose(np.asarray(heat), ref_heat, atol=2e-5)
  np.testing.assert_allclose(np.asarray(tags), ref_tags, atol=2e-5)
  np.testing.assert_array_equal(center, [50, 35])
  assert scale[1] == 70 / 200


def test_predictor_returns_people_in_image_coordinates(tiny):
  model, variables = tiny
  rng = np.random.default_rng(3)
  image = rng.integers(0, 255, (60, 90, 3), np.uint8)
  # A zero threshold makes the random model produce people.
  params = decode.GroupingParams(detection_threshold=0.0)
  predictor = predict.Predictor(model, variables, input_size=64,
                                  grouping=params)
  poses, scores = predictor(image)
  assert poses.shape[1:] == (K, 3) and poses.shape[0] == scores.shape[0] > 0
  (heat, tags), center, scale = predictor.maps(image)
  grid = host_grouping.group_poses(np.asarray(heat), np.asarray(tags),
                                  params)
  np.testing.assert_array_equal(scores, grid.scores)
  # x in image px = x_grid * (image region width / map width) + offset.
  region_w = scale[0] * 200
  expected_x = grid.coords[..., 0] * region_w / heat.shape[2] + center[0] - (
      region_w / 2)
  np.testing.assert_allclose(poses[..., 0], expected_x, rtol=1e-5)


def test_multi_scale_needs_scale_one(tiny):
  model, variables = tiny
  with pytest.raises(ValueError, match='scale 1'):
    predict.Predictor(model, variables, scales=(2.0, 0.5))


def test_config_test_group_unpacks_into_predictor(tiny):
  """Predictor(**config.test): every key lands, normalised, grouping nested."""
  from configs import default  # pylint: disable=g-import-not-at-top
  model, variables = tiny
  test = default.get_config().test
  test.scales = [0.5, 2, 1]  # a list of ints, as a flag may give
  test.grouping.detection_threshold = 0.3
  test.grouping.refine = False
  predictor = predict.Predictor(model, variables, **test)
  assert predictor.scales == (2.0, 1.0, 0.5)
  assert all(isinstance(s, float) for s in predictor.scales)
  assert predictor.input_size == 512 and predictor.flip is True
  assert predictor.grouping == decode.GroupingParams(
      detection_threshold=0.3, refine=False)


@pytest.mark.parametrize('kwargs,match', [
    (dict(grouping={'detection_treshold': 0.1}), 'detection_treshold'),
    (dict(scales=(1.0, 0.0)), 'positive'),
    (dict(scales=()), 'positive'),
    (dict(input_size=0), 'input_size'),
])
def test_bad_test_settings_are_named(tiny, kwargs, match):
  model, variables = tiny
  with pytest.raises(ValueError, match=match):
    predict.Predictor(model, variables, **kwargs)


def test_predict_stream_batches_equal_per_image_full_maps(tiny):
  """Batched, sharded, overlapped stream == full-map grouping per image."""
  model, variables = tiny
  rng = np.random.default_rng(5)
  shapes = [(60, 90), (90, 60), (60, 90)]
  images = [rng.integers(0, 255, s + (3,), np.uint8) for s in shapes]
  params = decode.GroupingParams(detection_threshold=0.0)
  predictor = predict.Predictor(model, variables, input_size=64,
                                  scales=(1.0, 0.5), grouping=params)
  assert predictor.batch_size == jax.local_device_count()
  got = {k: (p, s) for k, p, s in predictor.predict_stream(enumerate(images))}
  assert sorted(got) == list(range(len(images)))
  for i, image in enumerate(images):
    (heat, tags), center, scale = predictor.maps(image)
    want = host_grouping.group_poses(np.asarray(heat), np.asarray(tags),
                                     params).to_image(
                                         center, scale,
                                         (heat.shape[2], heat.shape[1]))
    assert len(want) > 0
    np.testing.assert_allclose(got[i][0], want.keypoints, rtol=1e-6)
    np.testing.assert_array_equal(got[i][1], want.scores)
  stats = predictor.stats
  assert stats['images'] == len(images)
  assert 0 < stats['bytes_to_host'] <= stats['full_map_bytes']


def test_batch_size_must_divide_over_devices(tiny):
  model, variables = tiny
  with pytest.raises(ValueError, match='local devices'):
    predict.Predictor(model, variables,
                        batch_size=jax.local_device_count() + 1)

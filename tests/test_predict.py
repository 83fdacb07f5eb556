"""predict: torch-equal bilinear, flip/multi-scale maps, the driver's
batches against per-image full-map grouping, the options' checks.

References are built in the test: maps from the raw model outputs with
numpy flips and torch's interpolate, people from the host full-map grouping
(tests/references/host_grouping.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ae_jax import keypoints
from ae_jax.data import eval_input
from ae_jax.infer import decode
from ae_jax.infer import predict
from ae_jax.models import ae_model
from tests.conftest import random_variables
from tests.references import host_grouping

torch = pytest.importorskip('torch')


@pytest.fixture(scope='module')
def tiny():
  model = ae_model.AEModel(widen_factor=0.25, num_deconv_filters=(16, 16, 16))
  return model, random_variables(model)


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


def _maps(model, variables, options, image):
  """predict_batch's maps of one image: heat, tags, its ScaledInputs."""
  x = eval_input.resize_inputs(image, options.input_size, options.scales)
  out = predict.predict_batch(variables, tuple(i[None] for i in x.images),
                              model=model, options=options,
                              base_hw=x.base_hw)
  return out.heat[0], out.tags[0], x


K = keypoints.NUM_JOINTS


@pytest.mark.parametrize('scales,flip', [
    ((2.0, 1.0, 0.5), True),  # the paper's multi-scale flip test
    ((1.0,), False),
])
def test_maps_match_reference(tiny, scales, flip):
  model, variables = tiny
  rng = np.random.default_rng(2)
  image = rng.integers(0, 255, (70, 100, 3), np.uint8)
  options = predict.PredictOptions(input_size=64, scales=scales, flip=flip)
  heat, tags, x = _maps(model, variables, options, image)
  center, scale = x.center, x.scale
  min_scale = min(scales)
  (bw, bh), _, _ = eval_input.get_multi_scale_size(70, 100, 64, 1, min_scale)
  images = [eval_input.resize_align(image, 64, s, min_scale)
            for s in options.scales]
  assert all(np.array_equal(a, b) for a, b in zip(images, x.images))
  ref_heat, ref_tags = _reference_maps(model, variables, images,
                                       options.scales, flip, (bh, bw))
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
  options = predict.PredictOptions(input_size=64, grouping=params)
  predictor = predict.Predictor(model, variables, options)
  poses = predictor(image)
  assert isinstance(poses, decode.Poses)
  assert poses.keypoints.shape[1:] == (K, 3) and len(poses) > 0
  assert poses.scores.shape == (len(poses),)
  heat, tags, x = _maps(model, variables, options, image)
  grid = host_grouping.group_poses(np.asarray(heat), np.asarray(tags),
                                   params)
  np.testing.assert_array_equal(poses.scores, grid.scores)
  # x in image px = x_grid * (image region width / map width) + offset.
  region_w = x.scale[0] * 200
  expected_x = grid.coords[..., 0] * region_w / heat.shape[2] + (
      x.center[0] - region_w / 2)
  np.testing.assert_allclose(poses.coords[..., 0], expected_x, rtol=1e-5)


def test_multi_scale_needs_scale_one():
  with pytest.raises(ValueError, match='scale 1'):
    predict.PredictOptions(scales=(2.0, 0.5))


def test_config_test_group_unpacks_into_options():
  """PredictOptions(**config.test): every key lands, normalised, grouping
  nested."""
  from configs import default  # pylint: disable=g-import-not-at-top
  test = default.get_config().test
  test.scales = [0.5, 2, 1]  # a list of ints, as a flag may give
  test.grouping.detection_threshold = 0.3
  test.grouping.refine = False
  options = predict.PredictOptions(**test)
  assert options.scales == (2.0, 1.0, 0.5)
  assert all(isinstance(s, float) for s in options.scales)
  assert options.input_size == 512 and options.flip is True
  assert options.grouping == decode.GroupingParams(
      detection_threshold=0.3, refine=False)
  assert options.flip_index == keypoints.COCO.flip_index
  hash(options)  # a static argument of the jitted predict_batch


@pytest.mark.parametrize('kwargs,match', [
    (dict(grouping={'detection_treshold': 0.1}), 'detection_treshold'),
    (dict(grouping={'detection_threshold': -0.1}), 'detection_threshold'),
    (dict(grouping={'nms_kernel': 4}), 'nms_kernel must be odd'),
    (dict(scales=(1.0, 0.0)), 'positive'),
    (dict(scales=()), 'positive'),
    (dict(input_size=0), 'input_size'),
])
def test_bad_test_settings_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    predict.PredictOptions(**kwargs)


def test_flip_index_must_fit_the_model(tiny):
  model, variables = tiny
  with pytest.raises(ValueError, match='flip_index has 5 joints'):
    predict.Predictor(model, variables, predict.PredictOptions(
        flip_index=(0, 2, 1, 4, 3)))


def test_predict_stream_batches_equal_per_image_full_maps(tiny):
  """Batched, sharded, overlapped stream == full-map grouping per image."""
  model, variables = tiny
  rng = np.random.default_rng(5)
  shapes = [(60, 90), (90, 60), (60, 90)]
  images = [rng.integers(0, 255, s + (3,), np.uint8) for s in shapes]
  params = decode.GroupingParams(detection_threshold=0.0)
  options = predict.PredictOptions(input_size=64, scales=(1.0, 0.5),
                                   grouping=params)
  predictor = predict.Predictor(model, variables, options)
  assert predictor.batch_size == jax.local_device_count()
  got = {p.key: p for p in predictor.stream(enumerate(images))}
  assert sorted(got) == list(range(len(images)))
  for i, image in enumerate(images):
    heat, tags, x = _maps(model, variables, options, image)
    want = host_grouping.group_poses(np.asarray(heat), np.asarray(tags),
                                     params).to_image(
                                         x.center, x.scale,
                                         (heat.shape[2], heat.shape[1]))
    assert len(want) > 0
    np.testing.assert_allclose(got[i].poses.keypoints, want.keypoints,
                               rtol=1e-6)
    np.testing.assert_array_equal(got[i].poses.scores, want.scores)
    # Device->host: the candidates (and refine's answers), not the maps.
    assert 0 < got[i].bytes_to_host <= got[i].full_map_bytes
    assert got[i].full_map_bytes == heat.nbytes + tags.nbytes


def test_batch_size_must_divide_over_devices(tiny):
  model, variables = tiny
  with pytest.raises(ValueError, match='local devices'):
    predict.Predictor(model, variables,
                      batch_size=jax.local_device_count() + 1)

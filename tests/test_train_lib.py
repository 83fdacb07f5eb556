"""Train library: schedule, state, step, and the loop on mini COCO.

`SyntheticDataset` makes batches that follow the data contract
(image/heatmaps/mask/joints), deterministic from (seed, step); the loop
tests that need exact control (resume, NaN) use it, see
test_checkpoints.py.
"""

import functools
import math

import numpy as np
import pytest

import jax
import optax

from ae_jax import sharding
from ae_jax import train_lib
from ae_jax.data import transforms
from ae_jax.models.ae_model import AEModel
from ae_jax.models.ae_model import normalize_images
from configs import tiny

K, M = 17, 30


@pytest.fixture(autouse=True, scope='module')
def compile_cache(tmp_path_factory):
  """One persistent XLA cache per test session: the train-step programs of
  test_train_lib/test_sharding/test_checkpoints repeat (small_config)."""
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update('jax_compilation_cache_dir',
                    str(tmp_path_factory.getbasetemp() / 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  yield
  jax.config.update('jax_compilation_cache_dir', old[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', old[1])


def small_config(num_steps=2, ckpt_every=100, log_every=1):
  """configs/tiny.py narrowed further (64 px) for multi-run loop tests."""
  config = tiny.get_config()
  config.model.num_deconv_filters = (16, 16, 16)
  config.data.input_size, config.data.heatmap_size = 64, 16
  config.data.augment = False
  config.train.num_steps = num_steps
  config.train.checkpoint_every_steps = ckpt_every
  config.train.log_every_steps = log_every
  config.train.eval_at_end = False
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 2
  config.optim.shard_opt_state = True  # exercised on the 8-device mesh
  return config


def small_model_and_lr():
  """small_config's model and schedule (4 mini COCO / synthetic examples
  at batch 8: 1 step per epoch), so that the single-step tests compile the
  same programs as train_and_evaluate on small_config."""
  config = small_config()
  o = config.optim
  return AEModel(**config.model), train_lib.make_lr_schedule(
      o.lr, 1, o.warmup_steps, o.warmup_ratio, o.decay_epochs,
      o.decay_factor)


def synthetic_batch(seed, step, batch, input_size, heatmap_size,
                    nan=False):
  """One contract-conforming batch from (seed, step): a few people/image.

  Sizes are an int (square) or (w, h), as config.data.input_size.
  """
  rng = np.random.default_rng([seed, step])
  in_w, in_h = transforms.as_wh(input_size)
  w, h = transforms.as_wh(heatmap_size)
  image = rng.normal(size=(batch, in_h, in_w, 3))
  heatmaps = np.zeros((batch, h, w, K), np.float32)
  joints = np.zeros((batch, M, K, 2), np.int32)
  yy, xx = np.mgrid[:h, :w]
  for b in range(batch):
    for p in range(rng.integers(0, 4)):
      xy = rng.integers(0, (w, h), size=(K, 2))
      vis = rng.uniform(size=K) > 0.3
      joints[b, p, :, 0] = np.arange(K) * h * w + xy[:, 1] * w + xy[:, 0]
      joints[b, p, :, 1] = vis
      for k in np.nonzero(vis)[0]:
        g = np.exp(-((xx - xy[k, 0])**2 + (yy - xy[k, 1])**2) / 8.0)
        heatmaps[b, :, :, k] = np.maximum(heatmaps[b, :, :, k], g)
  mask = np.ones((batch, h, w), np.float32)
  mask[:, : h // 4, : h // 4] = 0.0  # a crowd region
  if nan:
    image[0, 0, 0, 0] = np.nan
  return {'image': image.astype(np.float32), 'heatmaps': heatmaps,
          'mask': mask, 'joints': joints}


class SyntheticDataset:
  """Stands in for pipeline.make_train_dataset (same iteration contract)."""

  def __init__(self, config, start_step, num_examples=4, hook=None):
    self.num_examples = num_examples
    self._config, self._start, self._hook = config, start_step, hook

  def __iter__(self):
    c, step = self._config, self._start
    while True:
      if self._hook:
        self._hook(step)
      yield synthetic_batch(c.seed, step, c.train.global_batch_size,
                            c.data.input_size, c.data.heatmap_size,
                            nan=step in getattr(self, 'nan_steps', ()))
      step += 1


def mmcv_lr(i, base, spe, warmup, ratio, epochs, gamma):
  """mmcv StepLrUpdaterHook + linear warmup, written from its docs."""
  epoch = i // spe
  regular = base * gamma**sum(epoch >= e for e in epochs)
  if i >= warmup:
    return regular
  return regular * (1 - (1 - i / warmup) * (1 - ratio))


def test_lr_schedule_matches_mmcv_formula():
  spe = 7  # e.g. 1337 images at batch 192
  fn = train_lib.make_lr_schedule(1.5e-3, spe, 500, 0.001, (200, 260), 0.1)
  for i in [0, 1, 250, 499, 500, 501, 200 * spe - 1, 200 * spe,
            260 * spe - 1, 260 * spe, 300 * spe]:
    want = mmcv_lr(i, 1.5e-3, spe, 500, 0.001, (200, 260), 0.1)
    np.testing.assert_allclose(float(fn(i)), want, rtol=1e-5, err_msg=i)


def test_lr_schedule_warmup_spans_a_decay():
  # Warmup longer than the first decay: mmcv multiplies the decayed lr.
  fn = train_lib.make_lr_schedule(1.0, 2, 10, 0.1, (2, 4), 0.5)
  for i in range(14):
    np.testing.assert_allclose(
        float(fn(i)), mmcv_lr(i, 1.0, 2, 10, 0.1, (2, 4), 0.5), rtol=1e-6)


def test_steps_and_lr_scaling():
  assert train_lib.steps_per_epoch(149813, 192) == math.ceil(149813 / 192)
  assert train_lib.steps_per_epoch(4, 8) == 1
  assert train_lib.scaled_lr(1.5e-3, 96, 192, True) == pytest.approx(7.5e-4)
  assert train_lib.scaled_lr(1.5e-3, 96, 192, False) == 1.5e-3


@pytest.fixture(scope='module')
def tiny_setup():
  config = small_config()
  model, lr_fn = small_model_and_lr()
  mesh = sharding.make_mesh(1)
  state, shardings = train_lib.create_train_state(
      jax.random.key(0), model, optax.adam(lr_fn), 64, mesh)
  step = train_lib.make_train_step(mesh, shardings, model=model,
                                   lr_fn=lr_fn)
  return config, mesh, state, step


def test_train_step_metrics_and_loss_decrease(tiny_setup):
  config, mesh, state, step = tiny_setup
  state = jax.tree_util.tree_map(lambda x: x.copy(), state)  # donated
  batch = sharding.make_global_batch(
      synthetic_batch(0, 0, 8, 64, 16), mesh)
  rng = jax.random.key(1)
  history = []
  for _ in range(6):
    state, metrics = step(state, batch, rng)
    history.append(jax.device_get(metrics))
  assert set(history[0]) == {'heatmap_loss', 'push_loss', 'pull_loss',
                             'total_loss', 'lr', 'grad_norm', 'param_norm'}
  assert int(state.step) == 6
  assert history[0]['lr'] == pytest.approx(3e-3 * 0.001)  # warmup start
  assert history[2]['lr'] == pytest.approx(3e-3)
  for m in history:
    assert m['total_loss'] == pytest.approx(
        m['heatmap_loss'] + m['push_loss'] + m['pull_loss'], rel=1e-5)
  assert history[-1]['total_loss'] < history[0]['total_loss']
  # BN running statistics are updated by the step.
  assert not np.allclose(
      jax.device_get(state.batch_stats['backbone']['conv1']['bn']['mean']),
      0.0)


def test_create_train_state_is_placed(tiny_setup):
  _, mesh, state, _ = tiny_setup
  leaf = jax.tree_util.tree_leaves(state.params)[0]
  assert leaf.sharding.is_fully_replicated
  assert leaf.dtype == np.float32


def test_rectangular_input_state_and_step_shapes():
  """input_size (W, H): the state initialises from an [1, H, W, 3] input and
  the train step traces on a [b, H, W, 3] / [b, h, w, K] batch (shapes
  only: jax.eval_shape, no compile of the step)."""
  model, lr_fn = small_model_and_lr()
  mesh = sharding.make_mesh(1)
  state, shardings = train_lib.create_train_state(
      jax.random.key(0), model, optax.adam(lr_fn), (96, 64), mesh)
  batch = synthetic_batch(0, 0, 8, (96, 64), (24, 16))
  assert batch['image'].shape == (8, 64, 96, 3)
  assert batch['heatmaps'].shape == (8, 16, 24, K)
  assert batch['joints'][..., 0].max() < K * 16 * 24
  step = train_lib.make_train_step(mesh, shardings, model=model, lr_fn=lr_fn)
  new_state, metrics = jax.eval_shape(step, state, batch, jax.random.key(1))
  assert metrics['total_loss'].shape == ()
  assert jax.tree_util.tree_structure(new_state.params) == (
      jax.tree_util.tree_structure(state.params))
  out = jax.eval_shape(
      functools.partial(model.apply, train=False),
      {'params': state.params, 'batch_stats': state.batch_stats},
      batch['image'])
  assert out.shape == (8, 16, 24, 2 * K)  # the maps the targets index


def test_load_backbone_replaces_only_backbone(tiny_setup):
  _, _, state, _ = tiny_setup
  ones = jax.tree_util.tree_map(np.ones_like,
                                jax.device_get(state.params['backbone']))
  new = train_lib.load_backbone(
      state, {'params': {'backbone': ones},
              'batch_stats': jax.device_get(state.batch_stats)})
  assert np.all(jax.device_get(new.params['backbone']['conv1']['conv']
                               ['kernel']) == 1.0)
  np.testing.assert_array_equal(
      jax.device_get(new.params['keypoint_head']['final_layer']['kernel']),
      jax.device_get(state.params['keypoint_head']['final_layer']['kernel']))
  bad = {'params': {'backbone': {'conv1': {}}}, 'batch_stats': {}}
  with pytest.raises(Exception, match='does not match'):
    train_lib.load_backbone(state, bad, 'bad.ckpt')


def test_mini_coco_loss_decreases(coco_mini_root, tmp_path):
  pytest.importorskip('ae_jax.data.pipeline')
  config = small_config(num_steps=6)
  config.data.coco_root = str(coco_mini_root)
  summary = train_lib.train_and_evaluate(config, str(tmp_path))
  losses = [h['total_loss'] for h in summary['history']]
  assert len(losses) == 6
  assert losses[-1] < losses[0]


def test_normalize_images_on_device_equals_host_normalisation():
  """uint8 batches are normalised in the step as mmpose does on the host."""
  image = np.random.default_rng(0).integers(0, 256, (2, 8, 12, 3),
                                            dtype=np.uint8)
  got = np.asarray(jax.jit(normalize_images)(image))
  # mmpose NormalizeTensor in float32 numpy.
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  want = (image.astype(np.float32) / np.float32(255.0) - mean) / std
  # XLA may turn the divisions into reciprocal multiplies: 1-2 ulp.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  floats = want.astype(np.float32)
  assert normalize_images(floats) is floats  # already normalised

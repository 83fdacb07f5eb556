"""TrainState: the lr schedule against mmcv's formula, init, backbone load."""

import math

import numpy as np
import pytest

import jax
import optax

from ae_jax import checkpoints
from ae_jax import sharding
from ae_jax import train_state
from tests.conftest import small_model_and_lr

pytestmark = pytest.mark.usefixtures('compile_cache')


def mmcv_lr(i, base, spe, warmup, ratio, epochs, gamma):
  """mmcv StepLrUpdaterHook + linear warmup, written from its docs."""
  epoch = i // spe
  regular = base * gamma**sum(epoch >= e for e in epochs)
  if i >= warmup:
    return regular
  return regular * (1 - (1 - i / warmup) * (1 - ratio))


def test_lr_schedule_matches_mmcv_formula():
  spe = 7  # e.g. 1337 images at batch 192
  fn = train_state.make_lr_schedule(1.5e-3, spe, 500, 0.001, (200, 260), 0.1)
  for i in [0, 1, 250, 499, 500, 501, 200 * spe - 1, 200 * spe,
            260 * spe - 1, 260 * spe, 300 * spe]:
    want = mmcv_lr(i, 1.5e-3, spe, 500, 0.001, (200, 260), 0.1)
    np.testing.assert_allclose(float(fn(i)), want, rtol=1e-5, err_msg=i)


def test_lr_schedule_warmup_spans_a_decay():
  # Warmup longer than the first decay: mmcv multiplies the decayed lr.
  fn = train_state.make_lr_schedule(1.0, 2, 10, 0.1, (2, 4), 0.5)
  for i in range(14):
    np.testing.assert_allclose(
        float(fn(i)), mmcv_lr(i, 1.0, 2, 10, 0.1, (2, 4), 0.5), rtol=1e-6)


def test_lr_schedule_without_warmup():
  fn = train_state.make_lr_schedule(2.0, 3, 0, 0.001, (1,), 0.1)
  assert [float(fn(i)) for i in (0, 2, 3, 9)] == pytest.approx(
      [2.0, 2.0, 0.2, 0.2])


def test_steps_and_lr_scaling():
  assert train_state.steps_per_epoch(149813, 192) == math.ceil(149813 / 192)
  assert train_state.steps_per_epoch(4, 8) == 1
  assert train_state.scaled_lr(1.5e-3, 96, 192, True) == pytest.approx(7.5e-4)
  assert train_state.scaled_lr(1.5e-3, 96, 192, False) == 1.5e-3


@pytest.fixture(scope='module')
def state():
  model, lr_fn = small_model_and_lr()
  state, _ = train_state.create_train_state(
      jax.random.key(0), model, optax.adam(lr_fn), 64, sharding.make_mesh(1))
  return state


def test_create_train_state_is_placed_and_initialised(state):
  assert int(state.step) == 0
  for leaf in jax.tree_util.tree_leaves(state):
    assert leaf.sharding.is_fully_replicated
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params)} == {
      np.dtype(np.float32)}
  bn = jax.device_get(state.batch_stats['backbone']['conv1']['bn'])
  np.testing.assert_array_equal(bn['mean'], 0.0)  # PyTorch's initial stats
  np.testing.assert_array_equal(bn['var'], 1.0)
  mu = jax.device_get(state.opt_state[0].mu)
  assert all(np.all(m == 0) for m in jax.tree_util.tree_leaves(mu))


def test_create_train_state_shards_moments_on_eight_devices():
  model, lr_fn = small_model_and_lr()
  placed, shardings = train_state.create_train_state(
      jax.random.key(0), model, optax.adam(lr_fn), 64, sharding.make_mesh(),
      shard_opt_state=True)
  mu = placed.opt_state[0].mu['keypoint_head']['final_layer']['kernel']
  assert mu.sharding == shardings.opt_state[0].mu['keypoint_head'][
      'final_layer']['kernel']
  assert mu.addressable_shards[0].data.size == mu.size // 8
  assert placed.params['keypoint_head']['final_layer'][
      'kernel'].sharding.is_fully_replicated


def test_load_backbone_replaces_only_backbone(state):
  ones = jax.tree_util.tree_map(np.ones_like,
                                jax.device_get(state.params['backbone']))
  new = train_state.load_backbone(
      state, {'params': {'backbone': ones},
              'batch_stats': jax.device_get(state.batch_stats)})
  assert np.all(jax.device_get(new.params['backbone']['conv1']['conv']
                               ['kernel']) == 1.0)
  np.testing.assert_array_equal(
      jax.device_get(new.params['keypoint_head']['final_layer']['kernel']),
      jax.device_get(state.params['keypoint_head']['final_layer']['kernel']))
  bad = {'params': {'backbone': {'conv1': {}}}, 'batch_stats': {}}
  with pytest.raises(checkpoints.CheckpointError, match='does not match'):
    train_state.load_backbone(state, bad, 'bad.ckpt')

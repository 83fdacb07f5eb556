"""The train step: metrics, the Adam update, BatchNorm statistics, shapes.

Expected values come from computations written here (mmcv's lr formula,
a numpy convolution, Adam's first-step rule), not from our own outputs.
"""

import functools

import numpy as np
import pytest

import jax
import optax

from ae_jax import sharding
from ae_jax.train import state as train_state
from ae_jax.train import step as train_step
from ae_jax.models.ae_model import normalize_images
from tests.conftest import K
from tests.conftest import small_model_and_lr
from tests.conftest import synthetic_batch

pytestmark = pytest.mark.usefixtures('compile_cache')

LR, WARMUP, RATIO = 3e-3, 2, 0.001  # small_config's optim


def conv3x3_stride2(x, kernel):
  """PyTorch Conv2d(k=3, stride=2, padding=1, bias=False), float64 NHWC."""
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
  out = 0.0
  for i in range(3):
    for j in range(3):
      out = out + xp[:, i:i + 2 * ho:2, j:j + 2 * wo:2] @ kernel[i, j]
  return out


@pytest.fixture(scope='module')
def setup():
  model, lr_fn = small_model_and_lr()
  mesh = sharding.make_mesh(1)
  state, shardings = train_state.create_train_state(
      jax.random.key(0), model, optax.adam(lr_fn), 64, mesh)
  step = train_step.make_train_step(mesh, shardings, model=model,
                                    lr_fn=lr_fn)
  return mesh, state, step


def test_first_step_metrics_adam_update_and_bn_statistics(setup):
  mesh, state, step = setup
  before = jax.device_get(state)  # host copy: the step donates the state
  state = jax.tree_util.tree_map(lambda x: x.copy(), state)
  host = synthetic_batch(0, 0, 8, 64, 16)
  state, metrics = step(state, sharding.make_global_batch(host, mesh),
                        jax.random.key(1))
  metrics, after = jax.device_get((metrics, state))
  assert set(metrics) == {'heatmap_loss', 'push_loss', 'pull_loss',
                          'total_loss', 'lr', 'grad_norm', 'param_norm'}
  assert int(after.step) == 1
  assert metrics['lr'] == pytest.approx(LR * RATIO, rel=1e-6)  # mmcv, i=0
  assert metrics['total_loss'] == pytest.approx(
      metrics['heatmap_loss'] + metrics['push_loss'] + metrics['pull_loss'],
      rel=1e-6)
  # Adam's first step from zero moments: mu = 0.1 g, and the update is
  # -lr0 * g / (|g| + eps) with bias correction (torch Adam defaults).
  leaves = lambda t: [np.asarray(x, np.float64)
                      for x in jax.tree_util.tree_leaves(t)]
  grads = [m / 0.1 for m in leaves(after.opt_state[0].mu)]
  np.testing.assert_allclose(
      metrics['grad_norm'], np.sqrt(sum((g**2).sum() for g in grads)),
      rtol=1e-5)
  for p0, p1, g in zip(leaves(before.params), leaves(after.params), grads):
    want = p0 - metrics['lr'] * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(p1, want, rtol=0,
                               atol=2e-7 * np.abs(p0).max() + 1e-3 * LR)
  np.testing.assert_allclose(
      metrics['param_norm'],
      np.sqrt(sum((p**2).sum() for p in leaves(after.params))), rtol=1e-5)
  # BN running statistics of conv1 (PyTorch momentum 0.1, biased batch
  # variance as flax): from the numpy conv of the (already normalised)
  # float32 input with the initial kernel.
  y = conv3x3_stride2(host['image'],
                      before.params['backbone']['conv1']['conv']['kernel'])
  bn = after.batch_stats['backbone']['conv1']['bn']
  np.testing.assert_allclose(bn['mean'], 0.1 * y.mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(bn['var'], 0.9 + 0.1 * y.var((0, 1, 2)),
                             rtol=1e-5)


def test_lr_follows_warmup_and_loss_decreases(setup):
  mesh, state, step = setup
  state = jax.tree_util.tree_map(lambda x: x.copy(), state)  # donated
  batch = sharding.make_global_batch(synthetic_batch(0, 0, 8, 64, 16), mesh)
  history = []
  for _ in range(6):
    state, metrics = step(state, batch, jax.random.key(1))
    history.append(jax.device_get(metrics))
  assert int(state.step) == 6
  # mmcv warmup over 2 iterations: ratio, (1 + ratio) / 2, then 1.
  assert [float(m['lr']) for m in history[:3]] == pytest.approx(
      [LR * RATIO, LR * (1 + RATIO) / 2, LR], rel=1e-6)
  assert history[-1]['total_loss'] < 0.9 * history[0]['total_loss']


def test_rectangular_input_state_and_step_shapes():
  """input_size (W, H): the state initialises from an [1, H, W, 3] input and
  the train step traces on a [b, H, W, 3] / [b, h, w, K] batch (shapes
  only: jax.eval_shape, no compile of the step)."""
  model, lr_fn = small_model_and_lr()
  mesh = sharding.make_mesh(1)
  state, shardings = train_state.create_train_state(
      jax.random.key(0), model, optax.adam(lr_fn), (96, 64), mesh)
  batch = synthetic_batch(0, 0, 8, (96, 64), (24, 16))
  assert batch['image'].shape == (8, 64, 96, 3)
  assert batch['heatmaps'].shape == (8, 16, 24, K)
  assert batch['joints'][..., 0].max() < K * 16 * 24
  step = train_step.make_train_step(mesh, shardings, model=model,
                                    lr_fn=lr_fn)
  new_state, metrics = jax.eval_shape(step, state, batch, jax.random.key(1))
  assert metrics['total_loss'].shape == ()
  assert jax.tree_util.tree_structure(new_state.params) == (
      jax.tree_util.tree_structure(state.params))
  out = jax.eval_shape(
      functools.partial(model.apply, train=False),
      {'params': state.params, 'batch_stats': state.batch_stats},
      batch['image'])
  assert out.shape == (8, 16, 24, 2 * K)  # the maps the targets index


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


# ------------------------------------------- BatchNorm statistics variants


@functools.lru_cache(maxsize=None)
def _model_lr_tx():
  """One model / schedule / optimizer: compiled steps are tied to them."""
  model, lr_fn = small_model_and_lr()
  return model, lr_fn, optax.adam(lr_fn)


def _init(mesh, shard_opt_state=False):
  model, _, tx = _model_lr_tx()
  return train_state.create_train_state(
      jax.random.key(0), model, tx, 64, mesh, shard_opt_state=shard_opt_state)


def _make_step(mesh, shardings, bn_stats):
  model, lr_fn, _ = _model_lr_tx()
  return train_step.make_train_step(mesh, shardings, model=model,
                                    lr_fn=lr_fn, bn_stats=bn_stats)


def _one_step(step, mesh, host, shard_opt_state=False):
  """(metrics, state) after `step` from a fresh state, as host values."""
  state, _ = _init(mesh, shard_opt_state)
  state, metrics = step(state, sharding.make_global_batch(host, mesh),
                        jax.random.key(1))
  return jax.device_get((metrics, state))


def _leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope='module')
def eight_device_steps():
  """The compiled 8-device steps, 'global' and 'per_device' (Adam moments
  sharded as in test_sharding, so 'global' is its program)."""
  mesh = sharding.make_mesh(8)
  state, shardings = _init(mesh, shard_opt_state=True)
  batch = sharding.make_global_batch(synthetic_batch(3, 0, 8, 64, 16), mesh)
  return mesh, {
      bn: _make_step(mesh, shardings, bn).lower(
          state, batch, jax.random.key(1)).compile()
      for bn in train_step.BN_STATS}


def test_per_device_on_one_device_equals_global():
  mesh = sharding.make_mesh(1)
  _, shardings = _init(mesh)
  host = synthetic_batch(3, 0, 8, 64, 16)
  (mg, sg), (mp, sp) = (_one_step(_make_step(mesh, shardings, bn), mesh, host)
                        for bn in ('global', 'per_device'))
  for name in mg:
    np.testing.assert_allclose(mp[name], mg[name], rtol=1e-5, err_msg=name)
  for tree in ('params', 'batch_stats'):
    for a, b in zip(_leaves(getattr(sg, tree)), _leaves(getattr(sp, tree))):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="bn_stats must be 'global' or"):
    train_step.make_train_step(mesh, None, bn_stats='sync')


def test_per_device_on_eight_devices_is_eight_independent_shards(
    eight_device_steps):
  """8 devices x 1 example with per-device BatchNorm == the 1-device step
  run on each example alone, averaged: loss parts, the Adam first moment
  (0.1 x gradient after one step) and the running BN statistics."""
  mesh8, compiled = eight_device_steps
  host = synthetic_batch(3, 0, 8, 64, 16)
  m8, s8 = _one_step(compiled['per_device'], mesh8, host, True)
  mesh1 = sharding.make_mesh(1)
  step1 = _make_step(mesh1, _init(mesh1)[1], 'global')  # on 1 example
  shards = [_one_step(step1, mesh1, {k: v[i:i + 1] for k, v in host.items()})
            for i in range(8)]
  for name in ('heatmap_loss', 'push_loss', 'pull_loss', 'total_loss'):
    np.testing.assert_allclose(
        m8[name], np.mean([m[name] for m, _ in shards]), rtol=1e-5,
        err_msg=name)
  ref_mu = [np.mean(x, axis=0) for x in zip(
      *[_leaves(s.opt_state[0].mu) for _, s in shards])]
  gmax = max(np.abs(g).max() for g in ref_mu)
  for a, b in zip(ref_mu, _leaves(s8.opt_state[0].mu)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * gmax)
  ref_bn = [np.mean(x, axis=0) for x in zip(
      *[_leaves(s.batch_stats) for _, s in shards])]
  for a, b in zip(ref_bn, _leaves(s8.batch_stats)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  # Not the global-statistics step. At conv1 (same input in both) the
  # global variance is the mean of the per-example variances plus the
  # variance of the per-example means: >= per-device; deeper layers see
  # other activations and differ either way.
  _, sg = _one_step(compiled['global'], mesh8, host, True)
  g1 = sg.batch_stats['backbone']['conv1']['bn']['var']
  p1 = s8.batch_stats['backbone']['conv1']['bn']['var']
  assert np.all(g1 - p1 > -1e-6)
  assert max(np.abs(g - p).max() for g, p in zip(
      _leaves(sg.batch_stats), _leaves(s8.batch_stats))) > 1e-3


def test_all_reduces_of_the_eight_device_step(eight_device_steps):
  """Measured on this 8-device CPU step: 'global' has one all-reduce per
  BatchNorm layer forward (mean, variance) and one backward, plus the
  gradient's (2 x 55 + 1 = 111); 'per_device' only XLA's combined pmean
  of gradients, loss parts and statistics (2 tuple all-reduces)."""
  _, compiled = eight_device_steps
  stats = {bn: sharding.all_reduce_stats(c.as_text())
           for bn, c in compiled.items()}
  model, _, _ = _model_lr_tx()
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             np.zeros((1, 64, 64, 3), np.float32))
  num_bn = len(jax.tree_util.tree_leaves(variables['batch_stats'])) // 2
  param_bytes = 4 * sum(x.size for x in jax.tree_util.tree_leaves(
      variables['params']))
  (n_global, b_global), (n_dev, b_dev) = stats['global'], stats['per_device']
  assert num_bn == 55
  assert n_global >= 2 * num_bn  # 111 measured
  assert 1 <= n_dev <= 3  # 2 measured
  # Both reduce the whole gradient (the bulk of the bytes).
  assert b_dev >= param_bytes and b_global >= param_bytes

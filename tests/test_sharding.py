"""Mesh/sharding helpers, and 8 simulated devices == 1 device."""

import numpy as np
import pytest

import jax
import optax
from jax.sharding import PartitionSpec as P

from ae_jax import sharding
from ae_jax.train import state as train_state
from ae_jax.train import step as train_step
from tests.conftest import small_model_and_lr
from tests.conftest import synthetic_batch

pytestmark = pytest.mark.usefixtures('compile_cache')


def test_mesh_and_batch_placement():
  assert jax.device_count() == 8  # conftest's simulated CPU devices
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.size == 8
  host = synthetic_batch(0, 0, 8, 32, 8)
  batch = sharding.make_global_batch(host, mesh)
  assert batch['image'].shape == (8, 32, 32, 3)
  assert len(batch['image'].addressable_shards) == 8
  assert batch['image'].addressable_shards[0].data.shape == (1, 32, 32, 3)
  np.testing.assert_array_equal(np.asarray(batch['joints']), host['joints'])
  with pytest.raises(ValueError, match='multiple of the 8 local devices'):
    sharding.make_global_batch(synthetic_batch(0, 0, 6, 32, 8), mesh)


def test_opt_state_sharding_splits_moments():
  mesh = sharding.make_mesh()
  assert sharding._moment_sharding(mesh, (3, 16)).spec == P(None, 'data')
  assert sharding._moment_sharding(mesh, (5,)).is_fully_replicated


def test_eight_devices_match_one_device():
  """Same global batch on meshes of 1 and 8 devices: same step.

  BatchNorm statistics span the global batch under jit, so the sharded
  step is the same computation up to reduction order. The 8-device run
  also shards Adam's moments (config.optim.shard_opt_state). Tolerances:
  Adam's first update is ~lr * sign(g), so parameters whose gradient is
  float noise (e.g. the bias of a conv followed by another BN, exactly 0
  in real arithmetic) may move by +-lr differently; gradients are
  compared at the scale of the largest gradient, params to <= lr.
  """
  model, lr_fn = small_model_and_lr()
  batches = [synthetic_batch(3, s, 8, 64, 16) for s in range(2)]
  results = []
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    state, shardings = train_state.create_train_state(
        jax.random.key(0), model, optax.adam(lr_fn), 64, mesh,
        shard_opt_state=n > 1)
    step = train_step.make_train_step(mesh, shardings, model=model,
                                      lr_fn=lr_fn)
    state, metrics0 = step(state, sharding.make_global_batch(batches[0],
                                                             mesh),
                           jax.random.key(1))
    if n > 1:
      mu = state.opt_state[0].mu['keypoint_head']['final_layer']['kernel']
      assert not mu.sharding.is_fully_replicated
      assert mu.addressable_shards[0].data.size == mu.size // 8
    after_one = jax.device_get(state)
    _, metrics1 = step(state, sharding.make_global_batch(batches[1], mesh),
                       jax.random.key(1))
    results.append((jax.device_get(metrics0), after_one,
                    float(metrics1['total_loss'])))
  (m1, s1, loss1), (m8, s8, loss8) = results
  for name in m1:
    np.testing.assert_allclose(m8[name], m1[name], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-4)
  # First moments are 0.1 * gradient after one step.
  mu1 = jax.tree_util.tree_leaves(s1.opt_state[0].mu)
  mu8 = jax.tree_util.tree_leaves(s8.opt_state[0].mu)
  gmax = max(float(np.abs(g).max()) for g in mu1)
  for a, b in zip(mu1, mu8):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-3 * gmax)
  lr0 = float(m1['lr'])
  p1 = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(
      s1.params)])
  p8 = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(
      s8.params)])
  assert np.abs(p8 - p1).max() <= 2 * lr0 + 1e-6
  close = np.abs(p8 - p1) <= 1e-6 + 1e-4 * np.abs(p1)
  assert close.mean() > 0.99
  for a, b in zip(jax.tree_util.tree_leaves(s1.batch_stats),
                  jax.tree_util.tree_leaves(s8.batch_stats)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_prefetch_to_mesh_keeps_order_reads_two_ahead_and_closes():
  mesh = sharding.make_mesh()
  hosts = [synthetic_batch(0, s, 8, 32, 8) for s in range(5)]
  log = {'read': 0, 'closed': False}

  def source():
    try:
      for h in hosts:
        log['read'] += 1
        yield h
    finally:
      log['closed'] = True

  it = sharding.prefetch_to_mesh(source(), mesh, size=2)
  got = [next(it)]
  assert log['read'] == 2  # batch 1 already handed to the devices
  got += list(it)  # to the end: StopIteration, no batch lost
  assert len(got) == len(hosts)
  for g, h in zip(got, hosts):
    assert g['image'].sharding == sharding.batch_sharding(mesh)
    for name in h:
      np.testing.assert_array_equal(np.asarray(g[name]), h[name])
  with pytest.raises(StopIteration):
    next(it)
  # Closing mid-stream closes the source (a generator: its finally runs).
  log['read'] = 0
  with sharding.prefetch_to_mesh(source(), mesh) as it:
    next(it)
  assert log['closed'] and log['read'] == 2
  with pytest.raises(StopIteration):
    next(it)
  with pytest.raises(ValueError, match='prefetch size must be >= 1'):
    sharding.prefetch_to_mesh(source(), mesh, size=0)


def test_all_reduce_stats_reads_hlo_text():
  hlo = '\n'.join([
      '  %a = f32[8]{0} all-reduce(f32[8]{0} %x), to_apply=%add',
      '  %b = (f32[2,3]{1,0}, bf16[4]{0}) all-reduce(%y, %z), to_apply=%add',
      '  %c = f32[16]{0} all-reduce-start(f32[16]{0} %w), to_apply=%add',
      '  %d = f32[16]{0} all-reduce-done(f32[16]{0} %c)',
      '  %e = f32[8]{0} add(f32[8]{0} %a, f32[8]{0} %a)'])
  assert sharding.all_reduce_stats(hlo) == (3, 32 + 24 + 8 + 64)

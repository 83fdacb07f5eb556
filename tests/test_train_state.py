"""TrainState: the lr schedule against mmcv's formula, init, pretrained load."""

import logging
import math

import numpy as np
import pytest

import jax
import optax

from ae_jax.train import checkpoints
from ae_jax.train import variables_checkpoint
from ae_jax import sharding
from ae_jax.train import state as train_state
from ae_jax.keypoints import NUM_JOINTS
from tests.conftest import random_variables
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


def host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def variables_of(model, seed):
  """Random variables of `model` with non-trivial BatchNorm statistics."""
  tree = random_variables(model, seed)
  rng = np.random.default_rng(seed)
  tree['batch_stats'] = jax.tree_util.tree_map(
      lambda a: (a + rng.uniform(0.1, 0.5, a.shape)).astype(np.float32),
      tree['batch_stats'])
  return tree


def assert_tree_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, host(a), host(b))


def test_load_pretrained_full_checkpoint(state):
  model, _ = small_model_and_lr()
  pretrained = variables_of(model, 1)
  new, loaded = train_state.load_pretrained(state, pretrained, 'full.ckpt')
  assert loaded.startswith('Initialised backbone and head (params and '
                           'BatchNorm statistics) from full.ckpt')
  assert_tree_equal(new.params, pretrained['params'])
  assert_tree_equal(new.batch_stats, pretrained['batch_stats'])
  assert int(new.step) == 0  # a fresh schedule and fresh Adam moments
  assert all(np.all(m == 0) for m in jax.tree_util.tree_leaves(
      host(new.opt_state)))
  leaf = new.params['keypoint_head']['final_layer']['kernel']
  assert leaf.sharding == state.params['keypoint_head']['final_layer'][
      'kernel'].sharding


def test_load_pretrained_backbone_only(state):
  model, _ = small_model_and_lr()
  full = variables_of(model, 2)
  backbone = {c: {'backbone': full[c]['backbone']} for c in full}
  new, loaded = train_state.load_pretrained(state, backbone, 'imagenet')
  assert 'backbone-only' in loaded
  assert_tree_equal(new.params['backbone'], full['params']['backbone'])
  assert_tree_equal(new.batch_stats['backbone'],
                    full['batch_stats']['backbone'])
  assert_tree_equal(new.params['keypoint_head'],
                    state.params['keypoint_head'])


def test_load_pretrained_other_joint_count_reinitialises_final_layer(
    state, caplog):
  model, _ = small_model_and_lr()
  other = variables_of(model.clone(num_joints=5), 3)
  with caplog.at_level(logging.WARNING):
    new, loaded = train_state.load_pretrained(state, other, 'k5.ckpt')
  assert 'final_layer re-initialised' in loaded
  lines = [r.getMessage() for r in caplog.records]
  assert lines == ['init checkpoint k5.ckpt: keypoint_head.final_layer '
                   're-initialised: the checkpoint has num_joints=5, '
                   'the keypoint spec (config.data.keypoints) has 17.']
  head, old = new.params['keypoint_head'], state.params['keypoint_head']
  assert_tree_equal(head['final_layer'], old['final_layer'])
  for name in ('deconv_layers_0', 'deconv_layers_7'):
    assert_tree_equal(head[name], other['params']['keypoint_head'][name])
  assert_tree_equal(new.batch_stats, other['batch_stats'])
  assert_tree_equal(new.params['backbone'], other['params']['backbone'])


def test_load_pretrained_other_head_widths_reinitialises_head(state,
                                                              caplog):
  model, _ = small_model_and_lr()
  other = variables_of(model.clone(num_deconv_filters=(8, 8, 8)), 4)
  with caplog.at_level(logging.WARNING):
    new, _ = train_state.load_pretrained(state, other, 'w8.ckpt')
  assert [r.getMessage() for r in caplog.records] == [
      'init checkpoint w8.ckpt: keypoint_head re-initialised: the checkpoint '
      'has num_deconv_filters=(8, 8, 8), config.model.num_deconv_filters '
      'has (16, 16, 16).']
  assert_tree_equal(new.params['keypoint_head'],
                    state.params['keypoint_head'])
  assert_tree_equal(new.batch_stats['keypoint_head'],
                    state.batch_stats['keypoint_head'])
  assert_tree_equal(new.params['backbone'], other['params']['backbone'])


def test_load_pretrained_other_width_names_widen_factor(state):
  model, _ = small_model_and_lr()
  other = random_variables(model.clone(widen_factor=0.5))
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'init checkpoint w05: its backbone does not fit '
                     r'the model \(checkpoint widen_factor=0.5, '
                     r'config.model.widen_factor=0.25\)'):
    train_state.load_pretrained(state, other, 'w05')


def test_load_pretrained_from_a_train_workdir(state, tmp_path):
  """An ae_jax workdir at step 7: its weights load, the step does not."""
  model, _ = small_model_and_lr()
  pretrained = variables_of(model, 5)
  trained = state.replace(step=7, params=pretrained['params'],
                          batch_stats=pretrained['batch_stats'])
  with checkpoints.TrainCheckpoints(tmp_path, async_save=False) as ckpts:
    ckpts.save(7, trained, {'step': 7, 'data_position': 7, 'seed': 0,
                            'global_batch_size': 8})
  new, _ = train_state.load_pretrained(
      state, checkpoints.restore_variables(tmp_path), str(tmp_path))
  assert int(new.step) == 0
  assert_tree_equal(new.params, pretrained['params'])
  assert_tree_equal(new.batch_stats, pretrained['batch_stats'])


def test_finetune_first_step_loss_equals_torch_reference(tmp_path,
                                                         monkeypatch):
  """init_checkpoint = a converted random mmpose model: step 1's loss is the
  torch model's (BatchNorm in train mode, as mmpose trains) under the
  independent torch loss, on the same batch (image and targets)."""
  torch = pytest.importorskip('torch')
  # pylint: disable=g-import-not-at-top
  from ae_jax import convert
  from ae_jax.train import loop
  from tests.conftest import small_config
  from tests.conftest import synthetic_batch
  from tests.conftest import use_synthetic
  from tests.references import torch_losses
  from tests.references import torch_model
  # pylint: enable=g-import-not-at-top
  config = small_config(num_steps=1)
  m = config.model
  reference = torch_model.randomize_(torch_model.AETorchModel(
      m.widen_factor, tuple(m.num_deconv_filters), NUM_JOINTS), seed=8)
  pth = tmp_path / 'mmpose_random.pth'
  torch_model.save_mmpose_checkpoint(str(pth), reference)
  # What convert_torch_weights.py does (its CLI is tested in test_convert*).
  result = convert.convert_checkpoint(
      str(pth), widen_factor=m.widen_factor,
      num_deconv_filters=tuple(m.num_deconv_filters),
      num_joints=NUM_JOINTS)
  variables_checkpoint.save_variables(tmp_path / 'converted', result.variables)

  use_synthetic(monkeypatch)
  config.train.init_checkpoint = str(tmp_path / 'converted')
  summary = loop.train_and_evaluate(config, tmp_path / 'workdir')
  assert summary['start_step'] == 0
  got = summary['history'][0]  # step 1 alone (log_every_steps 1)

  d = config.data
  batch = synthetic_batch(config.seed, 0, config.train.global_batch_size,
                          d.input_size, d.heatmap_size)
  as_nchw = lambda x: torch.from_numpy(np.ascontiguousarray(
      x.transpose(0, 3, 1, 2)))
  reference.train()  # BatchNorm on batch statistics
  with torch.no_grad():
    outputs = reference(as_nchw(batch['image']))
    want = torch_losses.ae_losses(
        outputs, as_nchw(batch['heatmaps']), torch.from_numpy(batch['mask']),
        torch.from_numpy(batch['joints']), num_joints=NUM_JOINTS,
        heatmap_factor=config.loss.heatmap_factor,
        push_factor=config.loss.push_factor,
        pull_factor=config.loss.pull_factor)
  print({k: (got[k], float(v)) for k, v in want.items()})
  assert float(want['push_loss']) > 0 and float(want['pull_loss']) > 0
  for name, value in want.items():
    assert got[name] == pytest.approx(float(value), rel=1e-5), name
  # The schedule starts afresh: step 0's warmup lr.
  assert got['lr'] == pytest.approx(
      config.optim.lr * config.optim.warmup_ratio, rel=1e-6)

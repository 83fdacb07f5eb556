"""Tests of the Flax AE model: shapes, parameter count, dtypes, BatchNorm
statistics, and the two layer kernels ('flax' default, opt-in 'cpu') equal.

Legend: B batch, H x W input, K=17 joints; NHWC.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ae_jax.train import losses
from ae_jax.models import ae_head
from ae_jax.models import ae_model
from ae_jax.models import cpu_kernels
from ae_jax.models import layers
from ae_jax.models import mobilenet_v2

KERNELS = ('flax', 'cpu')
TINY = dict(widen_factor=0.25, num_deconv_filters=(8, 8, 8))


def _reference_param_count(num_joints=17, head=256):
  """Parameter count of mmpose's model, computed from the spec by hand."""
  def conv_bn(cin, cout, k, groups=1):
    return cin // groups * cout * k * k + 2 * cout  # no conv bias; BN w,b
  total = conv_bn(3, 32, 3)
  cin = 32
  for t, c, n, _ in mobilenet_v2.ARCH_SETTINGS:
    for _ in range(n):
      hidden = cin * t
      if t != 1:
        total += conv_bn(cin, hidden, 1)
      total += conv_bn(hidden, hidden, 3, groups=hidden)
      total += conv_bn(hidden, c, 1)
      cin = c
  total += conv_bn(cin, 1280, 1)
  cin = 1280
  for _ in range(3):
    total += cin * head * 16 + 2 * head
    cin = head
  total += cin * 2 * num_joints + 2 * num_joints
  return total


def _assert_trees_close(got, want, rtol=1e-4):
  """Same structure; each leaf within rtol of its largest value.

  A leaf whose values are all below 1e-3 of the tree's largest (e.g. the
  gradient of a bias that the next BatchNorm all but cancels, ~1e-9 of
  noise) is compared at that floor.
  """
  assert (jax.tree_util.tree_structure(got) ==
          jax.tree_util.tree_structure(want))
  leaves = jax.tree_util.tree_leaves(want)
  floor = 1e-3 * max(float(np.max(np.abs(b))) for b in leaves) + 1e-30
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), leaves):
    scale = max(float(np.max(np.abs(b))), floor)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('kernels', KERNELS)
def test_param_count_and_tree_match_reference_architecture(kernels):
  model = ae_model.create_model({}, kernels)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  n = ae_model.count_params(variables['params'])
  print(f'AEModel parameters: {n:,}')
  assert n == _reference_param_count() == 9_574_178
  flax_tree = jax.eval_shape(lambda: ae_model.AEModel().init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert (jax.tree_util.tree_map(lambda a: a.shape, variables) ==
          jax.tree_util.tree_map(lambda a: a.shape, flax_tree))


def test_create_model_defaults_to_plain_flax_and_rejects_bad_input():
  model = ae_model.create_model({'widen_factor': 0.5})
  assert (model.conv, model.deconv, model.norm) == (
      nn.Conv, nn.ConvTranspose, layers.BatchNormAct)
  assert ae_model.create_model({}, 'cpu').conv is cpu_kernels.Conv
  assert ae_model.default_kernels('cpu') == 'cpu'
  assert ae_model.default_kernels('gpu') == ae_model.default_kernels(
      'tpu') == 'flax'
  with pytest.raises(ValueError, match="kernels must be 'flax' or 'cpu'"):
    ae_model.create_model({}, 'auto')
  with pytest.raises(ValueError, match='conv_impl was removed'):
    ae_model.create_model({'conv_impl': 'auto'})


@pytest.mark.parametrize('hw', [(512, 512), (512, 768), (320, 448)])
def test_output_shape_is_stride_4_with_34_maps(hw):
  model = ae_model.AEModel()
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *hw, 3))),
                       variables)
  assert out.shape == (2, hw[0] // 4, hw[1] // 4, 34)
  assert out.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params():
  model = ae_model.AEModel(dtype='bfloat16', widen_factor=0.25,
                           num_deconv_filters=(16, 16, 16))
  x = jnp.ones((1, 64, 64, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  dtypes = {p.dtype for p in jax.tree_util.tree_leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(model.apply, variables, x)
  assert out.dtype == jnp.float32 and out.shape == (1, 16, 16, 34)


@pytest.mark.parametrize('kernels', KERNELS)
def test_bfloat16_final_layer_computes_in_float32(kernels):
  # With bfloat16 compute the last BN + ReLU output is bfloat16; the final
  # 1x1 conv must take it to float32 and sum in float32, so heatmaps and
  # tags are not rounded to bfloat16's 8-bit mantissa.
  model = ae_model.create_model(dict(TINY, dtype='bfloat16'), kernels)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = model.init(jax.random.key(1), x)
  # Train mode: BatchNorm normalises with batch statistics, so the final
  # layer's input is O(1) (eval with the init statistics would give ~0).
  out, state = model.apply(variables, x, train=True,
                           capture_intermediates=True,
                           mutable=['intermediates', 'batch_stats'])
  head = state['intermediates']['keypoint_head']
  final_in = head['deconv_layers_7']['__call__'][-1]  # after the ReLU
  assert final_in.dtype == jnp.bfloat16  # the body does compute in bf16
  final = variables['params']['keypoint_head']['final_layer']
  # float64 reference of the 1x1 conv on the same (bf16-valued) input.
  want = (np.asarray(final_in, np.float64) @
          np.asarray(final['kernel'][0, 0], np.float64) +
          np.asarray(final['bias'], np.float64))
  scale = np.abs(want).max()
  assert out.dtype == jnp.float32
  err = np.abs(np.asarray(out, np.float64) - want).max()
  bf16_err = np.abs(np.asarray(want.astype(jnp.bfloat16), np.float64) -
                    want).max()
  print(f'final layer max error {err / scale:.1e}, bf16 rounding would be '
        f'{bf16_err / scale:.1e} (of the output scale)')
  assert err <= 1e-5 * scale
  assert bf16_err > 100 * err  # the check can tell a bf16 output
  # The whole model output is not bf16-representable either.
  rounded = np.asarray(out.astype(jnp.bfloat16).astype(jnp.float32))
  assert np.mean(rounded == np.asarray(out)) < 0.1


@pytest.mark.parametrize('kernels', KERNELS)
def test_train_mode_updates_batch_stats_with_pytorch_momentum(kernels):
  # PyTorch BatchNorm2d momentum 0.1 == Flax momentum 0.9:
  # new = 0.9 old + 0.1 batch statistic (flax's biased batch variance).
  model = ae_model.create_model(TINY, kernels)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  variables = model.init(jax.random.key(0), x)
  c = variables['batch_stats']['backbone']['conv1']['bn']['mean'].shape
  old_mean = jax.random.normal(jax.random.key(2), c)
  old_var = jax.random.uniform(jax.random.key(3), c) + 0.5
  stats = jax.tree_util.tree_map(lambda a: a, variables['batch_stats'])
  stats['backbone']['conv1']['bn'] = {'mean': old_mean, 'var': old_var}
  variables = {'params': variables['params'], 'batch_stats': stats}
  _, updates = model.apply(variables, x, train=True,
                           capture_intermediates=True,
                           mutable=['batch_stats', 'intermediates'])
  conv_out = np.asarray(updates['intermediates']['backbone']['conv1']['conv'][
      '__call__'][-1], np.float64)
  batch_mean = conv_out.mean(axis=(0, 1, 2))
  batch_var = conv_out.var(axis=(0, 1, 2))
  new = updates['batch_stats']['backbone']['conv1']['bn']
  np.testing.assert_allclose(new['mean'], 0.9 * old_mean + 0.1 * batch_mean,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new['var'], 0.9 * old_var + 0.1 * batch_var,
                             rtol=1e-5, atol=1e-6)
  # Eval mode uses the running statistics and changes nothing.
  _, frozen = model.apply(variables, x, train=False, mutable=['batch_stats'])
  _assert_trees_close(frozen['batch_stats'], variables['batch_stats'], 0)


def _depthwise(conv_def, c, stride):
  """The depthwise conv as mobilenet_v2.ConvBN builds it."""
  return conv_def(c, (3, 3), strides=(stride, stride),
                  padding=((1, 1), (1, 1)), feature_group_count=c,
                  use_bias=False)


def _value_and_grads(module, variables, x):
  """module(x) and d sum(sin(module(x))) / d (variables, x)."""
  loss = lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
  return (module.apply(variables, x),
          jax.grad(loss, argnums=(0, 1))(variables, x))


@pytest.mark.parametrize('stride', [1, 2])
def test_cpu_depthwise_equals_flax_forward_and_backward(stride):
  # cpu_kernels.Conv decomposes it into 9 taps with a hand-written VJP.
  x = jax.random.normal(jax.random.key(0), (2, 13, 10, 8))
  variables = _depthwise(nn.Conv, 8, stride).init(jax.random.key(1), x)
  assert variables['params']['kernel'].shape == (3, 3, 1, 8)
  got = _value_and_grads(_depthwise(cpu_kernels.Conv, 8, stride), variables, x)
  want = _value_and_grads(_depthwise(nn.Conv, 8, stride), variables, x)
  _assert_trees_close(got, want)


@pytest.mark.parametrize('kernel_size,stride,bias', [(1, 1, False),
                                                     (1, 1, True),
                                                     (3, 2, False),
                                                     (3, 1, True)])
def test_cpu_gemm_conv_equals_flax_forward_and_backward(kernel_size, stride,
                                                        bias):
  x = jax.random.normal(jax.random.key(0), (2, 10, 7, 5))
  p = kernel_size // 2
  kw = dict(kernel_size=(kernel_size,) * 2, strides=(stride, stride),
            padding=((p, p), (p, p)), use_bias=bias,
            bias_init=jax.nn.initializers.normal(1.))
  variables = nn.Conv(6, **kw).init(jax.random.key(1), x)
  got = _value_and_grads(cpu_kernels.Conv(6, **kw), variables, x)
  want = _value_and_grads(nn.Conv(6, **kw), variables, x)
  assert got[0].shape == want[0].shape
  _assert_trees_close(got, want)


def test_cpu_kernels_reject_what_they_do_not_implement():
  x = jnp.zeros((1, 8, 8, 4))
  with pytest.raises(ValueError, match='padding must be'):
    cpu_kernels.Conv(4, (3, 3), padding='SAME').init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='only dense or 3x3 depthwise'):
    cpu_kernels.Conv(4, (3, 3), padding=((1, 1), (1, 1)),
                     feature_group_count=2).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='only kernel 4, stride 2'):
    cpu_kernels.ConvTranspose(4, (3, 3)).init(jax.random.key(0), x)


@pytest.mark.parametrize('kernels', KERNELS)
def test_model_deconv_is_pytorch_conv_transpose_4x4_s2(kernels):
  # The deconv exactly as AEHead builds it, against the scatter form of
  # PyTorch's ConvTranspose2d(k=4, s=2, p=1), whose weight is the flipped
  # kernel: out[2i - 1 + t] += x[i] * w[t]; forward and gradients vs the
  # plain flax layer.
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
  deconv = ae_head.deconv_4x4_s2(ae_model.module_defs(kernels)['deconv'],
                                 jnp.float32)
  variables = {'params': {'kernel': jax.random.normal(jax.random.key(1),
                                                      (4, 4, 6, 3))}}
  assert jax.tree_util.tree_map(
      jnp.shape, deconv(3).init(jax.random.key(2), x)) == {
          'params': {'kernel': (4, 4, 6, 3)}}
  got = _value_and_grads(deconv(3), variables, x)
  w = np.asarray(variables['params']['kernel'])[::-1, ::-1]
  xn = np.asarray(x)
  out = np.zeros((2, 2 * 5 + 2, 2 * 7 + 2, 3))
  for i in range(5):
    for j in range(7):
      out[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4] += np.einsum(
          'bc,uvcd->buvd', xn[:, i, j], w)
  np.testing.assert_allclose(got[0], out[:, 1:-1, 1:-1], rtol=1e-4,
                             atol=1e-4)
  flax_deconv = ae_head.deconv_4x4_s2(nn.ConvTranspose, jnp.float32)
  _assert_trees_close(got, _value_and_grads(flax_deconv(3), variables, x))


@pytest.mark.parametrize('kernels', KERNELS)
@pytest.mark.parametrize('act', [None, 'relu', 'relu6'])
@pytest.mark.parametrize('train', [True, False])
def test_model_batch_norm_equals_flax_batch_norm_and_activation(kernels, act,
                                                                train):
  # The model's norm (cpu: fused, hand-written backward) with the model's
  # eps / momentum; reference: nn.BatchNorm followed by the activation,
  # differentiated by JAX. Running statistics are compared too.
  x = 3.0 * jax.random.normal(jax.random.key(0), (4, 6, 5, 7)) + 1.0
  acts = {None: lambda z: z, 'relu': nn.relu, 'relu6': nn.relu6}
  norm = mobilenet_v2.batch_norm(ae_model.module_defs(kernels)['norm'],
                                 train, jnp.float32)
  ours = norm(act=act)
  ref = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     epsilon=1e-5)
  variables = {
      'params': {'scale': jax.random.uniform(jax.random.key(1), (7,)) + 0.5,
                 'bias': jax.random.normal(jax.random.key(2), (7,))},
      'batch_stats': {'mean': jax.random.normal(jax.random.key(3), (7,)),
                      'var': jax.random.uniform(jax.random.key(4), (7,)) + .5}}
  assert (jax.tree_util.tree_structure(ours.init(jax.random.key(0), x)) ==
          jax.tree_util.tree_structure(variables))
  g = jax.random.normal(jax.random.key(5), x.shape)

  def run(module, post):
    def loss(v, x):
      y, upd = module.apply(v, x, mutable=['batch_stats'])
      return jnp.sum(post(y) * g), (post(y), upd)
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(variables, x)

  (gv, gx), (y, upd) = run(ours, lambda y: y)
  (rgv, rgx), (ry, rupd) = run(ref, acts[act])
  np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, rgx, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves((gv, upd)),
                  jax.tree_util.tree_leaves((rgv, rupd))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  if train:  # exactly 0.9 old + 0.1 batch (biased variance)
    xn = np.asarray(x, np.float64)
    old = variables['batch_stats']
    np.testing.assert_allclose(
        upd['batch_stats']['mean'],
        0.9 * old['mean'] + 0.1 * xn.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(
        upd['batch_stats']['var'],
        0.9 * old['var'] + 0.1 * xn.var(axis=(0, 1, 2)), rtol=1e-5)


def _batch(b, size, seed=0):
  """A random batch with the train step's keys (3 people per image)."""
  rng = np.random.default_rng(seed)
  h, k = size // 4, 17
  joints = np.zeros((b, 30, k, 2), np.int32)
  xy = rng.integers(0, h, size=(b, 3, k, 2))
  joints[:, :3, :, 0] = np.arange(k) * h * h + xy[..., 1] * h + xy[..., 0]
  joints[:, :3, :, 1] = rng.uniform(size=(b, 3, k)) > 0.3
  return {'image': jnp.asarray(rng.normal(size=(b, size, size, 3)),
                               jnp.float32),
          'heatmaps': jnp.asarray(rng.uniform(size=(b, h, h, k)), jnp.float32),
          'mask': jnp.ones((b, h, h), jnp.float32),
          'joints': jnp.asarray(joints)}


def _loss_fn(model, params, batch_stats, batch):
  out, upd = model.apply({'params': params, 'batch_stats': batch_stats},
                         batch['image'], train=True, mutable=['batch_stats'])
  loss = losses.compute_losses(out, batch['heatmaps'], batch['mask'],
                               batch['joints'])['total_loss']
  return loss, upd['batch_stats']


def test_kernels_agree_on_train_mode_loss_gradients_and_stats():
  batch = _batch(2, 64)
  models = {k: ae_model.create_model(TINY, k) for k in KERNELS}
  variables = models['flax'].init(jax.random.key(0), batch['image'])
  # Larger head weights than mmpose's std 0.001 init, so that the backbone
  # gradients are not ~0 and the comparison means something.
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a * 300. if 'keypoint_head' in jax.tree_util.keystr(p)
      and a.ndim == 4 else a, variables['params'])
  results = {}
  for k, model in models.items():
    # Jitted (one compile each): op by op, the gradient takes a minute.
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, m=model: _loss_fn(m, p, variables['batch_stats'], batch),
        has_aux=True))
    (loss, stats), grads = grad_fn(params)
    evals = jax.jit(model.apply)({'params': params, 'batch_stats': stats},
                                 batch['image'])
    results[k] = (loss, stats, grads, evals)
  (loss, stats, _, evals), grads = results['cpu'], results['cpu'][2]
  want = results['flax']
  _assert_trees_close((loss, stats, evals), (want[0], want[1], want[3]),
                      rtol=2e-4)
  # Gradients pass back through ~50 train-mode BatchNorms, which amplify
  # float32 rounding differences of the two summation orders (measured up
  # to ~2e-3 of a leaf's largest value at the stem).
  _assert_trees_close(grads, want[2], rtol=1e-2)


def test_default_flax_train_step_runs_and_learns():
  # A train step of the default (accelerator) path: forward in train mode,
  # the AE losses, gradients, Adam, new BatchNorm statistics; jitted.
  model = ae_model.create_model(TINY)  # kernels='flax'
  batch = _batch(2, 64, seed=1)
  variables = model.init(jax.random.key(0), batch['image'])
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, batch_stats, opt_state):
    (loss, stats), grads = jax.value_and_grad(
        lambda p: _loss_fn(model, p, batch_stats, batch), has_aux=True)(
            params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss, grads

  params, stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)
  history = []
  for _ in range(3):
    params, stats, opt_state, loss, grads = step(params, stats, opt_state)
    history.append(float(loss))
  print(f'flax-path losses: {history}')
  assert all(np.isfinite(history))
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  assert history[-1] < history[0]
  assert not np.allclose(stats['backbone']['conv1']['bn']['mean'],
                         variables['batch_stats']['backbone']['conv1']['bn'][
                             'mean'])

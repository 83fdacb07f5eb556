"""Shape, parameter-count and dtype tests for the Flax AE model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ae_jax.models import ae_model
from ae_jax.models import mobilenet_v2


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


def test_param_count_matches_reference_architecture():
  model = ae_model.AEModel()
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  n = ae_model.count_params(variables['params'])
  print(f'AEModel parameters: {n:,}')
  assert n == _reference_param_count() == 9_574_178


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
  variables = model.init(jax.random.key(0), x)
  dtypes = {p.dtype for p in jax.tree_util.tree_leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  out = model.apply(variables, x)
  assert out.dtype == jnp.float32 and out.shape == (1, 16, 16, 34)


def test_train_mode_updates_batch_stats():
  model = ae_model.AEModel(widen_factor=0.25, num_deconv_filters=(8, 8, 8))
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  variables = model.init(jax.random.key(0), x)
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  before = variables['batch_stats']['backbone']['conv1']['bn']['mean']
  after = updates['batch_stats']['backbone']['conv1']['bn']['mean']
  # Flax momentum 0.9 == PyTorch momentum 0.1: new = 0.9 old + 0.1 batch.
  assert not np.allclose(before, after)


@pytest.mark.parametrize('stride', [1, 2])
def test_decomposed_depthwise_equals_native(stride):
  from ae_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 13, 10, 8))
  native = layers.DepthwiseConv3x3(stride, impl='native')
  variables = native.init(jax.random.key(1), x)
  decomposed = layers.DepthwiseConv3x3(stride, impl='decomposed')
  np.testing.assert_allclose(decomposed.apply(variables, x),
                             native.apply(variables, x), atol=1e-5)


def test_decomposed_deconv_equals_native_and_torch_formula():
  from ae_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
  native = layers.ConvTranspose4x4S2(4, impl='native',
                                     kernel_init=jax.nn.initializers.normal(1.))
  variables = native.init(jax.random.key(1), x)
  want = native.apply(variables, x)
  got = layers.ConvTranspose4x4S2(4, impl='decomposed').apply(variables, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Direct scatter form of PyTorch's ConvTranspose2d(k=4, s=2, p=1), whose
  # weight is the flipped kernel: out[i*2 - 1 + t] += x[i] * w[t].
  w = np.asarray(variables['params']['kernel'])[::-1, ::-1]
  xn = np.asarray(x)
  out = np.zeros((2, 2 * 5 + 2, 2 * 7 + 2, 4))
  for i in range(5):
    for j in range(7):
      out[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4] += np.einsum(
          'bc,uvcd->buvd', xn[:, i, j], w)
  np.testing.assert_allclose(got, out[:, 1:-1, 1:-1], rtol=1e-4, atol=1e-4)


def test_full_model_impls_agree():
  x = jax.random.normal(jax.random.key(0), (1, 64, 96, 3))
  kw = dict(widen_factor=0.25, num_deconv_filters=(16, 16, 16))
  native = ae_model.AEModel(conv_impl='native', **kw)
  variables = native.init(jax.random.key(1), x)
  decomposed = ae_model.AEModel(conv_impl='decomposed', **kw)
  np.testing.assert_allclose(decomposed.apply(variables, x),
                             native.apply(variables, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('stride', [1, 2])
def test_decomposed_depthwise_gradients_equal_native(stride):
  # The decomposed depthwise has a hand-written VJP (layers.py).
  from ae_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 9, 10, 8))
  variables = layers.DepthwiseConv3x3(stride, impl='native').init(
      jax.random.key(1), x)

  def grads(impl):
    module = layers.DepthwiseConv3x3(stride, impl=impl)
    y = module.apply(variables, x)
    g = jax.random.normal(jax.random.key(2), y.shape)
    loss = lambda v, x: jnp.sum(module.apply(v, x) * g)
    return jax.grad(loss, argnums=(0, 1))(variables, x)

  got, want = grads('decomposed'), grads('native')
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[0]['params']['kernel'],
                             want[0]['params']['kernel'], rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize('kernel_size,stride,bias', [(1, 1, False),
                                                     (1, 1, True),
                                                     (3, 2, False),
                                                     (3, 1, True)])
def test_gemm_conv_equals_native_forward_and_backward(kernel_size, stride,
                                                      bias):
  from ae_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 10, 7, 5))
  kw = dict(kernel_size=kernel_size, stride=stride, use_bias=bias,
            bias_init=jax.nn.initializers.normal(1.))
  variables = layers.Conv(6, impl='native', **kw).init(jax.random.key(1), x)

  def value_and_grads(impl):
    module = layers.Conv(6, impl=impl, **kw)
    loss = lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
    return (module.apply(variables, x),
            jax.grad(loss, argnums=(0, 1))(variables, x))

  (y1, g1), (y0, g0) = value_and_grads('decomposed'), value_and_grads(
      'native')
  assert y1.shape == y0.shape
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_decomposed_deconv_gradients_equal_native():
  from ae_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
  init = jax.nn.initializers.normal(1.)
  variables = layers.ConvTranspose4x4S2(4, impl='native',
                                        kernel_init=init).init(
                                            jax.random.key(1), x)

  def grads(impl):
    module = layers.ConvTranspose4x4S2(4, impl=impl)
    loss = lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
    return jax.grad(loss, argnums=(0, 1))(variables, x)

  for a, b in zip(jax.tree_util.tree_leaves(grads('decomposed')),
                  jax.tree_util.tree_leaves(grads('native'))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('act', [None, 'relu', 'relu6'])
@pytest.mark.parametrize('train', [True, False])
def test_fused_batch_norm_equals_flax_batch_norm_and_activation(act, train):
  # layers.BatchNorm has a hand-written backward; flax's BatchNorm followed
  # by the activation, differentiated by JAX, is the reference.
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from ae_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = 3.0 * jax.random.normal(jax.random.key(0), (4, 6, 5, 7)) + 1.0
  acts = {None: lambda z: z, 'relu': nn.relu, 'relu6': nn.relu6}
  kw = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5)
  ours = layers.BatchNorm(act=act, **kw)
  ref = nn.BatchNorm(**kw)
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

"""Opt-in XLA:CPU kernels: the model's layers with fast CPU gradients.

XLA:CPU lowers the backward pass of a grouped (depthwise) convolution and of
a transposed convolution (an lhs-dilated convolution) to slow generic loops:
on 2 cores one 16->32 px deconv gradient took 0.64 s natively and 0.038 s
as four stride-1 convolutions (bench/RESULTS.md). The modules here are
drop-in module defs for AEModel (`MODULE_DEFS`, chosen with
`ae_model.create_model(config.model, kernels='cpu')`). They take the same
arguments and keep the same variables as the plain flax layers they
replace (so checkpoints and conversion do not care), and compute the same
sums (tests/test_models.py):
  Conv           nn.Conv twin: 3x3 depthwise (feature_group_count = in) as
                 9 shifted multiply-adds; dense convs (1x1, the 3x3 stem) as
                 im2col + one GEMM, since XLA:CPU runs dot_general and its
                 transposes as tuned GEMMs but convolution gradients as slow
                 generic convolutions (head gradient 2.6x faster at batch 8
                 512x512, bench/RESULTS_train.md);
  ConvTranspose  nn.ConvTranspose twin for the 4x4 / stride 2 deconv: one
                 GEMM over 2x2 windows whose 4 sub-pixel phases are
                 interleaved by depth-to-space;
  BatchNormAct   layers.BatchNormAct twin (nn.BatchNorm + ReLU / ReLU6) with
                 a two-pass hand-written backward.
`COMPILER_OPTIONS` are the XLA:CPU options for the jax.jit of a CPU train
step (memory-optimised scheduling). Nothing here looks at the backend: the
entry point chooses these kernels for the machine that runs the program.
On GPU / TPU use the default plain flax layers (ae_jax/models/layers.py).

Layout NHWC; kernels HWIO.
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp
from jax import lax

# XLA's default CPU scheduler orders the train step for concurrency and
# keeps far more activations alive: its temp buffer was 7.4 GB at batch 8
# 512x512 vs 2.8 GB memory-optimised. XLA:CPU maps that buffer fresh on
# every call, so the extra pages cost ~1.1M page faults and ~5 s of kernel
# time per step (train step 8.0 -> 5.5 s, bench/RESULTS_train.md). Pass as
# `jax.jit(..., compiler_options=COMPILER_OPTIONS)` on CPU only.
COMPILER_OPTIONS = {
    'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


def compiler_options():
  """A fresh copy of COMPILER_OPTIONS (for a CPU jax.jit / compile)."""
  return dict(COMPILER_OPTIONS)


def _pair(value, name: str):
  """An int or a sequence of two equal ints -> that int; else ValueError."""
  if isinstance(value, int):
    return value
  value = tuple(value)
  if len(value) != 2 or value[0] != value[1]:
    raise ValueError(f'cpu_kernels: {name} must be square, got {value}')
  return int(value[0])


def _symmetric_padding(padding, k: int) -> int:
  """Padding given as ((p, p), (p, p)) with p = k // 2, or 'SAME' for k=1."""
  if padding == 'SAME' and k == 1:
    return 0
  pads = tuple(tuple(p) for p in padding) if not isinstance(padding,
                                                           str) else ()
  if pads != ((k // 2, k // 2),) * 2:
    raise ValueError(f'cpu_kernels: padding must be (({k // 2}, {k // 2}),) '
                     f'* 2 for kernel {k}, got {padding!r}')
  return k // 2


class Conv(nn.Module):
  """nn.Conv twin (same 'kernel' [k, k, in / groups, out] / 'bias' params).

  Supports what the model uses: square kernels, PyTorch-style symmetric
  padding k // 2, and either dense (feature_group_count 1) or 3x3
  depthwise (feature_group_count = in = features) convolutions.
  """
  features: int
  kernel_size: Sequence[int] = (1, 1)
  strides: Any = 1
  padding: Any = ((0, 0), (0, 0))
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Optional[Any] = None
  kernel_init: Any = nn.initializers.lecun_normal()  # nn.Conv default
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = _pair(self.kernel_size, 'kernel_size')
    s = _pair(self.strides, 'strides')
    pad = _symmetric_padding(self.padding, k)
    c = x.shape[-1]
    groups = self.feature_group_count
    if groups not in (1, c) or (groups == c > 1 and
                                (k != 3 or self.features != c)):
      raise ValueError('cpu_kernels.Conv: only dense or 3x3 depthwise '
                       f'(groups = in = out) convs, got groups {groups}, '
                       f'kernel {k}, {c} -> {self.features} channels')
    kernel = self.param('kernel', self.kernel_init,
                        (k, k, c // groups, self.features), jnp.float32)
    bias = (self.param('bias', self.bias_init, (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    if groups == c > 1:
      y = _depthwise3x3(x, kernel, s)
    else:
      h_out = (x.shape[1] + 2 * pad - k) // s + 1
      w_out = (x.shape[2] + 2 * pad - k) // s + 1
      xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
      y = _dot(_im2col(xp, k, s, h_out, w_out),
               kernel.reshape(-1, self.features))
    return y + bias if bias is not None else y


class ConvTranspose(nn.Module):
  """nn.ConvTranspose twin for PyTorch ConvTranspose2d(4, 2, padding 1).

  Only kernel (4, 4), strides (2, 2), padding ((2, 2), (2, 2)), no bias,
  transpose_kernel False: the model's deconv. The kernel [4, 4, in, out] is
  the spatially flipped PyTorch weight. Output [B, 2H, 2W, out] from input
  [B, H, W, in].
  """
  features: int
  kernel_size: Sequence[int] = (4, 4)
  strides: Any = (2, 2)
  padding: Any = ((2, 2), (2, 2))
  use_bias: bool = False
  transpose_kernel: bool = False
  dtype: Optional[Any] = None
  kernel_init: Any = nn.initializers.lecun_normal()  # nn.ConvTranspose's

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    pads = (tuple(tuple(p) for p in self.padding)
            if not isinstance(self.padding, str) else self.padding)
    if (_pair(self.kernel_size, 'kernel_size') != 4 or
        _pair(self.strides, 'strides') != 2 or pads != ((2, 2), (2, 2)) or
        self.use_bias or self.transpose_kernel):
      raise ValueError(
          'cpu_kernels.ConvTranspose: only kernel 4, stride 2, padding '
          '((2, 2), (2, 2)), no bias, transpose_kernel False (PyTorch '
          'ConvTranspose2d(4, 2, padding 1))')
    kernel = self.param('kernel', self.kernel_init,
                        (4, 4, x.shape[-1], self.features), jnp.float32)
    x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
    return _subpixel_deconv(x, kernel)


def _depthwise_taps(x: jnp.ndarray, stride: int, h_out: int, w_out: int):
  """The 9 shifted (strided) views of x padded by 1, as (u, v, view)."""
  # Materialise the padded input once: without the barrier XLA fused its
  # producer (BN + ReLU6) into each of the 9 slices and wrote 9 tensors.
  xp = lax.optimization_barrier(
      jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
  span = lambda n: stride * (n - 1) + 1
  return [(u, v, xp[:, u:u + span(h_out):stride, v:v + span(w_out):stride])
          for u in range(3) for v in range(3)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise3x3(x: jnp.ndarray, kernel: jnp.ndarray,
                  stride: int) -> jnp.ndarray:
  """Depthwise 3x3 (padding 1) as 9 shifted multiply-adds.

  A custom VJP keeps only x as the residual: with plain autodiff XLA
  saved the 9 views (each recomputing the producer, e.g. BN + ReLU6) as
  separate full tensors; here the backward recomputes them inside its
  fusions (measured 1.7x faster per stride-1 layer).
  """
  return _depthwise3x3_fwd(x, kernel, stride)[0]


def _depthwise3x3_fwd(x, kernel, stride):
  h_out = (x.shape[1] - 1) // stride + 1
  w_out = (x.shape[2] - 1) // stride + 1
  y = None
  for u, v, tap in _depthwise_taps(x, stride, h_out, w_out):
    y = tap * kernel[u, v, 0] if y is None else y + tap * kernel[u, v, 0]
  return y, (x, kernel)


def _depthwise3x3_bwd(stride, residuals, dy):
  x, kernel = residuals
  h, w = x.shape[1], x.shape[2]
  h_out, w_out = dy.shape[1], dy.shape[2]
  # d kernel[u, v] = sum over B, H, W of view(u, v) * dy (float32 sums).
  dk = jnp.stack([jnp.sum(tap * dy, axis=(0, 1, 2), dtype=jnp.float32)
                  for _, _, tap in _depthwise_taps(x, stride, h_out, w_out)])
  dk = dk.reshape(kernel.shape).astype(kernel.dtype)
  # dx = correlation of dy (dilated by the stride, padded so that
  # dyp[m] = dy_dilated[m - 1]) with the flipped kernel:
  # dx[j] = sum_u dyp[j + 2 - u] * kernel[u].
  hi_h = h - stride * (h_out - 1)
  hi_w = w - stride * (w_out - 1)
  dyp = lax.pad(dy, jnp.zeros((), dy.dtype),
                ((0, 0, 0), (1, hi_h, stride - 1), (1, hi_w, stride - 1),
                 (0, 0, 0)))
  dyp = lax.optimization_barrier(dyp)
  dx = None
  for u in range(3):
    for v in range(3):
      t = dyp[:, 2 - u:2 - u + h, 2 - v:2 - v + w] * kernel[u, v, 0]
      dx = t if dx is None else dx + t
  return dx, dk


_depthwise3x3.defvjp(_depthwise3x3_fwd, _depthwise3x3_bwd)


def _im2col(xp: jnp.ndarray, k: int, stride: int, h_out: int,
            w_out: int) -> jnp.ndarray:
  """[B, Hp, Wp, C] (padded) -> [B, h_out, w_out, k*k*C], taps (u, v, c)."""
  span = lambda n: stride * (n - 1) + 1
  taps = [xp[:, u:u + span(h_out):stride, v:v + span(w_out):stride]
          for u in range(k) for v in range(k)]
  return taps[0] if k == 1 else jnp.concatenate(taps, axis=-1)


@jax.custom_vjp
def _dot(cols: jnp.ndarray, kernel2d: jnp.ndarray) -> jnp.ndarray:
  """[..., K] x [K, N] -> [..., N] as one GEMM (fast forward and backward).

  Its backward materialises dy once, row-major. With plain autodiff,
  XLA:CPU wrote the BatchNorm backward that produces dy transposed
  ([N, C] -> [C, N], ~1 GB/s) to feed the weight-gradient GEMM: 0.7 s of
  the 3.1 s backbone gradient at batch 8 512x512. Behind the barrier both
  GEMMs read dy as written (backbone gradient 2.7 s).
  """
  return lax.dot_general(cols, kernel2d, (((cols.ndim - 1,), (0,)), ((), ())))


def _dot_fwd(cols, kernel2d):
  return _dot(cols, kernel2d), (cols, kernel2d)


def _dot_bwd(residuals, dy):
  cols, kernel2d = residuals
  dy = lax.optimization_barrier(dy)
  n = cols.ndim - 1
  dcols = lax.dot_general(dy, kernel2d, (((n,), (1,)), ((), ())))
  dk = lax.dot_general(cols.reshape(-1, cols.shape[-1]),
                       dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ())))
  return dcols, dk


_dot.defvjp(_dot_fwd, _dot_bwd)


def _subpixel_deconv(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """ConvTranspose4x4S2 as one GEMM over 2x2 windows + depth-to-space.

  Output row 2i + a only sees kernel rows a and a + 2: even rows use input
  rows (i-1, i), odd rows (i, i+1); columns likewise. With x padded by 1,
  phase (a, b) at (i, j) is the 2x2 window at (i + a, j + b) times
  kernel[a::2, b::2], so all four phases are one [B(H+1)(W+1), 4 in] x
  [4 in, 4 out] product (windows gathered once, ~(1 + 1/H)(1 + 1/W) of the
  minimal FLOPs) whose outputs are sliced per phase and interleaved.
  """
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = _im2col(xp, 2, 1, h + 1, w + 1)  # [B, H+1, W+1, 4 in]
  # [4 (u, v, in), 4 (a, b), out]: phase (a, b) uses kernel[a + 2u, b + 2v].
  k2 = kernel.reshape(2, 2, 2, 2, c, -1)  # [u, a, v, b, in, out]
  k2 = k2.transpose(0, 2, 4, 1, 3, 5).reshape(4 * c, -1)
  q = _dot(cols, k2)  # [B, H+1, W+1, 4 * out]
  q = q.reshape(b, h + 1, w + 1, 4, -1)
  rows = []
  for a in (0, 1):
    rows.append(jnp.stack([q[:, a:a + h, bb:bb + w, 2 * a + bb]
                           for bb in (0, 1)], axis=3))  # [B, H, W, 2, out]
  y = jnp.stack(rows, axis=2)  # [B, H, 2 (a), W, 2 (b), out]
  return y.reshape(b, 2 * h, 2 * w, y.shape[-1])


class BatchNormAct(nn.Module):
  """layers.BatchNormAct twin (nn.BatchNorm + optional ReLU / ReLU6).

  Same variables as flax's BatchNorm (params 'scale', 'bias'; batch_stats
  'mean', 'var'), the same statistics (float32 E[x], E[x^2] - E[x]^2 over
  all but the channel axis; under jit with a 'data'-sharded batch they
  span the global batch) and the same running-average update. Training
  uses `_bn_act`, whose hand-written backward takes two passes over x and
  dy (one for the two channel sums, one for dx) where autodiff of
  normalise + clip took about five: BN + ReLU6 gradient 0.27 -> 0.17 s at
  [8, 256, 256, 96] on CPU (bench/RESULTS_train.md).
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.99  # nn.BatchNorm's default
  epsilon: float = 1e-5
  act: Optional[str] = None  # None | 'relu' | 'relu6'
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: jnp.ndarray,
               use_running_average: Optional[bool] = None) -> jnp.ndarray:
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    if self.act is not None and self.act not in _ACT_RANGE:
      raise ValueError(f'activation must be None, relu or relu6: {self.act}')
    dtype = self.dtype or jnp.result_type(x.dtype, jnp.float32)
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,),
                            jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    if use_running_average:
      mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
      y = (x.astype(jnp.float32) - ra_mean.value) * mul + bias
      return _activation(y, self.act).astype(dtype)
    y, mean, var = _bn_act(x, scale, bias, self.act, self.epsilon)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
      ra_var.value = m * ra_var.value + (1.0 - m) * var
    return y.astype(dtype)


# Output range (lo, hi) of each fused activation: forward clips to it, the
# backward passes the gradient only strictly inside it.
_ACT_RANGE = {'relu': (0.0, None), 'relu6': (0.0, 6.0)}


def _activation(z: jnp.ndarray, act: Optional[str]) -> jnp.ndarray:
  if act is None:
    return z
  if act not in _ACT_RANGE:
    raise ValueError(f'activation must be None, relu or relu6: {act}')
  return jnp.clip(z, *_ACT_RANGE[act])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn_act(x, scale, bias, act, epsilon):
  """act(BN(x)) with batch statistics: (y, mean, var), y float32."""
  return _bn_act_fwd(x, scale, bias, act, epsilon)[0]


def _bn_act_fwd(x, scale, bias, act, epsilon):
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axes)
  var = jnp.maximum(jnp.mean(x32 * x32, axes) - mean * mean, 0.0)
  inv = lax.rsqrt(var + epsilon)
  y = _activation((x32 - mean) * (inv * scale) + bias, act)
  return (y, mean, var), (x, mean, inv, scale, bias)


def _bn_act_bwd(act, epsilon, residuals, cotangents):
  """dx = scale * inv * (g - mean(g) - xhat * mean(g * xhat)), g = act' dy.

  The statistics outputs feed only the running averages, which are not
  differentiated: their cotangents are ignored.
  """
  del epsilon
  x, mean, inv, scale, bias = residuals
  dy = cotangents[0].astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  xhat = (x.astype(jnp.float32) - mean) * inv
  if act is not None:
    z = xhat * scale + bias
    lo, hi = _ACT_RANGE[act]
    keep = z > lo if hi is None else (z > lo) & (z < hi)
    dy = jnp.where(keep, dy, 0.0)
  dbias = jnp.sum(dy, axes)
  dscale = jnp.sum(dy * xhat, axes)
  dx = (scale * inv) * (dy - (dbias + xhat * dscale) / n)
  return dx.astype(x.dtype), dscale, dbias


_bn_act.defvjp(_bn_act_fwd, _bn_act_bwd)


# AEModel's module defs for kernels='cpu' (the defaults are layers.py's).
MODULE_DEFS = {'conv': Conv, 'deconv': ConvTranspose, 'norm': BatchNormAct}

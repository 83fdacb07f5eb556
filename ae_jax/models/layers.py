"""Convolutions whose gradients are fast on every backend.

XLA:CPU lowers the backward pass of a grouped (depthwise) convolution and of
a transposed convolution (an lhs-dilated convolution) to slow generic loops:
on 2 cores one 16->32 px deconv gradient took 0.64 s natively and 0.038 s
as four stride-1 convolutions (bench/RESULTS.md). The modules here keep the
native parameter layout (so checkpoints and conversion do not care) and
choose the formulation per backend with `impl`:
  'native': lax convolutions, best with cuDNN / TPU convolution units;
  'decomposed': depthwise as 9 shifted multiply-adds, deconv as 4
    sub-pixel (phase) convolutions interleaved by depth-to-space;
  'auto': 'decomposed' on CPU, 'native' elsewhere.
Both formulations compute the same sums (tests/test_models.py).

Layout NHWC; kernels HWIO.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DN = ('NHWC', 'HWIO', 'NHWC')


def resolve_impl(impl: str) -> str:
  """Maps 'auto' to the formulation that is fast on the default backend."""
  if impl == 'auto':
    return 'decomposed' if jax.default_backend() == 'cpu' else 'native'
  if impl not in ('native', 'decomposed'):
    raise ValueError(f'conv impl must be auto, native or decomposed: {impl}')
  return impl


class DepthwiseConv3x3(nn.Module):
  """3x3 depthwise conv, padding 1, no bias; kernel [3, 3, 1, C]."""
  stride: int = 1
  impl: str = 'auto'
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.variance_scaling(2.0, 'fan_out',
                                                      'normal')

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (3, 3, 1, c), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    s = self.stride
    if resolve_impl(self.impl) == 'native':
      return lax.conv_general_dilated(x, kernel, (s, s), ((1, 1), (1, 1)),
                                      dimension_numbers=_DN,
                                      feature_group_count=c)
    h_out = (x.shape[1] - 1) // s + 1
    w_out = (x.shape[2] - 1) // s + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = None
    for u in range(3):
      for v in range(3):
        tap = xp[:, u:u + s * (h_out - 1) + 1:s, v:v + s * (w_out - 1) + 1:s]
        y = tap * kernel[u, v, 0] if y is None else y + tap * kernel[u, v, 0]
    return y


class ConvTranspose4x4S2(nn.Module):
  """PyTorch ConvTranspose2d(kernel 4, stride 2, padding 1, no bias).

  The kernel [4, 4, in, out] is the spatially flipped PyTorch weight, i.e.
  the kernel of the equivalent stride-1 conv over the 2x dilated input
  padded by 2 (lax.conv_transpose with explicit padding). Output
  [B, 2H, 2W, out] from input [B, H, W, in].
  """
  features: int
  impl: str = 'auto'
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.001)  # mmpose normal_init

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param('kernel', self.kernel_init,
                        (4, 4, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if resolve_impl(self.impl) == 'native':
      return lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)),
                                dimension_numbers=_DN)
    # Output row 2i + a only sees kernel rows a and a + 2: even rows use
    # input rows (i-1, i), odd rows (i, i+1); columns likewise.
    pads = (((1, 0),), ((0, 1),))
    rows = []
    for a in (0, 1):
      cols = [lax.conv_general_dilated(x, kernel[a::2, b::2], (1, 1),
                                       pads[a] + pads[b],
                                       dimension_numbers=_DN)
              for b in (0, 1)]
      rows.append(jnp.stack(cols, axis=3))  # [B, H, W, 2 (b), C]
    y = jnp.stack(rows, axis=2)  # [B, H, 2 (a), W, 2 (b), C]
    b, h, _, w, _, c = y.shape
    return y.reshape(b, 2 * h, 2 * w, c)

"""MobileNetV2 backbone (mmcls/mmpose layout) in Flax linen, NHWC.

Submodule names follow mmpose's state_dict keys so that checkpoint
conversion is a name table: torch `backbone.layer2.1.conv.0.bn.weight` is
Flax `backbone/layer2_1/conv_0/bn/scale`.

Legend: B batch, H x W input size (multiple of 32), C channels.
Input [B, H, W, 3] float (ImageNet-normalised RGB); output
[B, H/32, W/32, 1280] (mmpose out_indices=(7,), the last stage only).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ae_jax.models import layers
from ae_jax.models.layers import ModuleDef

# (expand ratio t, channels c, repeats n, first stride s), mmcls arch_settings.
ARCH_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                 (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

# PyTorch BatchNorm2d defaults: eps 1e-5, momentum 0.1 (Flax keeps 1 - 0.1).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# mmcv kaiming_init: normal, fan_out, ReLU gain (BN weight 1, bias 0).
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def make_divisible(value: float, divisor: int = 8,
                   min_ratio: float = 0.9) -> int:
  """Rounds channels to a multiple of `divisor` as mmcv's make_divisible."""
  new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if new_value < min_ratio * value:
    new_value += divisor
  return new_value


def batch_norm(norm: ModuleDef, train: bool, dtype: Any) -> ModuleDef:
  """`norm` bound to PyTorch's eps / momentum and the train flag."""
  return functools.partial(norm, use_running_average=not train,
                           momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                           dtype=dtype)


class ConvBN(nn.Module):
  """mmcv ConvModule: conv (no bias) -> BN -> optional ReLU6.

  `depthwise` makes the conv a 3x3 depthwise one (groups = channels).
  `conv` and `norm` are bound module defs (see MobileNetV2).
  """
  features: int
  kernel_size: int
  conv: ModuleDef
  norm: ModuleDef
  stride: int = 1
  depthwise: bool = False
  act: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k, p = self.kernel_size, self.kernel_size // 2
    # PyTorch symmetric padding k // 2, not 'SAME'.
    x = self.conv(self.features, (k, k), strides=(self.stride, self.stride),
                  padding=((p, p), (p, p)),
                  feature_group_count=x.shape[-1] if self.depthwise else 1,
                  name='conv')(x)
    return self.norm(act='relu6' if self.act else None, name='bn')(x)


class InvertedResidual(nn.Module):
  """MobileNetV2 block: [1x1 expand] -> 3x3 depthwise -> 1x1 linear (+skip)."""
  in_channels: int
  out_channels: int
  stride: int
  expand_ratio: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    hidden = int(round(self.in_channels * self.expand_ratio))
    conv_bn = functools.partial(ConvBN, conv=self.conv, norm=self.norm)
    y, i = x, 0
    if self.expand_ratio != 1:
      y = conv_bn(hidden, 1, name='conv_0')(y)
      i = 1
    y = conv_bn(hidden, 3, stride=self.stride, depthwise=True,
                name=f'conv_{i}')(y)
    y = conv_bn(self.out_channels, 1, act=False, name=f'conv_{i + 1}')(y)
    if self.stride == 1 and self.in_channels == self.out_channels:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 feature extractor returning the stride-32 conv2 output.

  conv / norm: module defs with nn.Conv's / layers.BatchNormAct's
  arguments (plain flax by default; cpu_kernels.py has CPU twins).
  """
  widen_factor: float = 1.0
  arch_settings: Sequence[Sequence[int]] = ARCH_SETTINGS
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = layers.BatchNormAct

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                             kernel_init=KAIMING_FAN_OUT)
    norm = batch_norm(self.norm, train, self.dtype)
    conv_bn = functools.partial(ConvBN, conv=conv, norm=norm)
    in_channels = make_divisible(32 * self.widen_factor, 8)
    x = conv_bn(in_channels, 3, stride=2, name='conv1')(x)
    for i, (t, c, n, s) in enumerate(self.arch_settings):
      out_channels = make_divisible(c * self.widen_factor, 8)
      for j in range(n):
        x = InvertedResidual(in_channels, out_channels, s if j == 0 else 1, t,
                             conv=conv, norm=norm, name=f'layer{i + 1}_{j}')(x)
        in_channels = out_channels
    out_channels = (int(1280 * self.widen_factor)
                    if self.widen_factor > 1.0 else 1280)
    return conv_bn(out_channels, 1, name='conv2')(x)

"""AESimpleHead (mmpose DeconvHead): 3 x (deconv 4x4/2 -> BN -> ReLU) + 1x1.

Legend: B batch, h x w backbone map (stride 32), K=17 joints.
Input [B, h, w, C]; output [B, 8h, 8w, 2K] float32: channels [0, K) are
heatmaps, [K, 2K) are the per-joint tags (tag_per_joint, tag dim 1).
Submodule names mirror mmpose keys: `deconv_layers_{0,3,6}` are the
transposed convs, `deconv_layers_{1,4,7}` the BatchNorms, `final_layer`
the 1x1 conv.

dtype: compute dtype of the deconvs and BatchNorms. The final 1x1 conv
always computes in float32 (its input cast to float32), so that with
bfloat16 compute the heatmaps and tags are not rounded to bfloat16's
8-bit mantissa (relative steps of 0.4-0.8%).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ae_jax.models import layers
from ae_jax.models.layers import ModuleDef
from ae_jax.models.mobilenet_v2 import batch_norm


def deconv_4x4_s2(deconv: ModuleDef, dtype: Any) -> ModuleDef:
  """`deconv` bound to PyTorch's ConvTranspose2d(k=4, s=2, p=1, no bias).

  `deconv` takes nn.ConvTranspose's arguments. Padding k - 1 - p = 2 on each side of the dilated input, kernel not
  transposed: the kernel is the flipped PyTorch weight (layers.py,
  ae_jax/convert.py). mmpose normal_init(std=0.001).
  """
  return functools.partial(
      deconv, kernel_size=(4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
      use_bias=False, dtype=dtype, kernel_init=nn.initializers.normal(0.001))


class AEHead(nn.Module):
  """Deconvolution head producing K heatmaps and K tag maps at stride 4.

  deconv / conv / norm: module defs with nn.ConvTranspose's, nn.Conv's and
  layers.BatchNormAct's arguments (plain flax by default; cpu_kernels.py
  has CPU twins).
  """
  num_joints: int = 17
  num_deconv_filters: Sequence[int] = (256, 256, 256)
  dtype: Any = jnp.float32
  deconv: ModuleDef = nn.ConvTranspose
  conv: ModuleDef = nn.Conv
  norm: ModuleDef = layers.BatchNormAct

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    deconv = deconv_4x4_s2(self.deconv, self.dtype)
    norm = batch_norm(self.norm, train, self.dtype)
    for i, features in enumerate(self.num_deconv_filters):
      x = deconv(features, name=f'deconv_layers_{3 * i}')(x)
      x = norm(act='relu', name=f'deconv_layers_{3 * i + 1}')(x)
    # mmpose normal_init(std=0.001, bias=0) for the final layer; float32.
    return self.conv(2 * self.num_joints, (1, 1), padding=((0, 0), (0, 0)),
                     use_bias=True, dtype=jnp.float32,
                     kernel_init=nn.initializers.normal(0.001),
                     name='final_layer')(x.astype(jnp.float32))

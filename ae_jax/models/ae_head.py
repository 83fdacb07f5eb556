"""AESimpleHead (mmpose DeconvHead): 3 x (deconv 4x4/2 -> BN -> ReLU) + 1x1.

Legend: B batch, h x w backbone map (stride 32), K=17 joints.
Input [B, h, w, C]; output [B, 8h, 8w, 2K]: channels [0, K) are heatmaps,
[K, 2K) are the per-joint tags (tag_per_joint, tag dim 1).
Submodule names mirror mmpose keys: `deconv_layers_{0,3,6}` are the
transposed convs, `deconv_layers_{1,4,7}` the BatchNorms, `final_layer`
the 1x1 conv.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ae_jax.models.layers import Conv, ConvTranspose4x4S2
from ae_jax.models.mobilenet_v2 import batch_norm


class AEHead(nn.Module):
  """Deconvolution head producing K heatmaps and K tag maps at stride 4."""
  num_joints: int = 17
  num_deconv_filters: Sequence[int] = (256, 256, 256)
  conv_impl: str = 'auto'  # see ae_jax/models/layers.py
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    # PyTorch ConvTranspose2d(k=4, s=2, p=1); the kernel is stored flipped
    # (see ConvTranspose4x4S2 and ae_jax/convert.py).
    for i, features in enumerate(self.num_deconv_filters):
      x = ConvTranspose4x4S2(features, impl=self.conv_impl, dtype=self.dtype,
                             name=f'deconv_layers_{3 * i}')(x)
      x = batch_norm(train, self.dtype, 'relu',
                     name=f'deconv_layers_{3 * i + 1}')(x)
    # mmpose normal_init(std=0.001, bias=0) for the final layer.
    return Conv(2 * self.num_joints, 1, use_bias=True, impl=self.conv_impl,
                dtype=self.dtype, kernel_init=nn.initializers.normal(0.001),
                name='final_layer')(x)

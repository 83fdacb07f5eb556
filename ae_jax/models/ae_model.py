"""The full Associative Embedding model: MobileNetV2 backbone + AE head.

This is the only model entry point train/eval import:
`AEModel(**config.model)`.

Legend: B batch, H x W input (multiples of 32; 64 at test time),
K=17 joints. Input [B, H, W, 3] float32 ImageNet-normalised RGB.
Output [B, H/4, W/4, 2K] float32: heatmaps then tags
(use `split_outputs`).
"""

from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp

from ae_jax.keypoints import IMAGENET_MEAN, IMAGENET_STD
from ae_jax.models.ae_head import AEHead
from ae_jax.models.mobilenet_v2 import MobileNetV2

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class AEModel(nn.Module):
  """MobileNetV2 + AESimpleHead, as mmpose's mobilenetv2_coco_512x512."""
  num_joints: int = 17
  widen_factor: float = 1.0
  num_deconv_filters: Tuple[int, ...] = (256, 256, 256)
  dtype: str = 'float32'  # Compute dtype; params stay float32.
  conv_impl: str = 'auto'  # 'auto' | 'native' | 'decomposed' (layers.py)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    dtype = DTYPES[self.dtype]
    x = x.astype(dtype)
    x = MobileNetV2(widen_factor=self.widen_factor, conv_impl=self.conv_impl,
                    dtype=dtype, name='backbone')(x, train)
    x = AEHead(num_joints=self.num_joints,
               num_deconv_filters=tuple(self.num_deconv_filters),
               conv_impl=self.conv_impl, dtype=dtype,
               name='keypoint_head')(x, train)
    return x.astype(jnp.float32)


def normalize_images(images: jnp.ndarray) -> jnp.ndarray:
  """uint8 RGB [..., H, W, 3] -> ImageNet-normalised float32 model input.

  mmpose's NormalizeTensor (x / 255, minus mean, over std) in float32, run
  on device by the train step and by inference. XLA may use reciprocal
  multiplies, so it matches host float32 normalisation to 1-2 ulp (tested).
  Float input is taken as already normalised and passed through.
  """
  if images.dtype != jnp.uint8:
    return images
  x = images.astype(jnp.float32) / 255.0
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def split_outputs(outputs: jnp.ndarray, num_joints: int = 17):
  """[B, h, w, 2K] -> (heatmaps [B, h, w, K], tags [B, h, w, K])."""
  return outputs[..., :num_joints], outputs[..., num_joints:]


def count_params(params) -> int:
  """Number of scalar parameters in a params pytree (excludes BN stats)."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))

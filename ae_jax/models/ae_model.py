"""The full Associative Embedding model: MobileNetV2 backbone + AE head.

This is the only model entry point train/eval import:
`create_model(config.model, kernels)`, with `kernels` chosen once by the
entry point for the backend that runs the program:
  'flax' (default; GPU / TPU): plain flax layers (layers.py), what XLA:GPU,
         XLA:TPU and cuDNN optimise; export always builds this graph;
  'cpu'  (opt-in): cpu_kernels.py's twins with fast XLA:CPU gradients
         (decomposed depthwise, GEMM convs, sub-pixel deconv, fused
         BatchNorm); same variables, same sums (tests/test_models.py).
`default_kernels(jax.default_backend())` is that choice.

Legend: B batch, H x W input (multiples of 32; 64 at test time),
K=17 joints. Input [B, H, W, 3] float32 ImageNet-normalised RGB.
Output [B, H/4, W/4, 2K] float32: heatmaps then tags
(use `split_outputs`).

dtype 'bfloat16': the convolutions and BatchNorm outputs compute in
bfloat16 (BatchNorm statistics, the final 1x1 conv and the outputs in
float32); parameters stay float32.
"""

from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ae_jax.keypoints import IMAGENET_MEAN, IMAGENET_STD
from ae_jax.models import cpu_kernels
from ae_jax.models import layers
from ae_jax.models.ae_head import AEHead
from ae_jax.models.layers import ModuleDef
from ae_jax.models.mobilenet_v2 import MobileNetV2

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
KERNELS = {'flax': layers.MODULE_DEFS, 'cpu': cpu_kernels.MODULE_DEFS}


class AEModel(nn.Module):
  """MobileNetV2 + AESimpleHead, as mmpose's mobilenetv2_coco_512x512.

  conv / deconv / norm: module defs (`KERNELS[kernels]`); plain flax by
  default.
  """
  num_joints: int = 17
  widen_factor: float = 1.0
  num_deconv_filters: Tuple[int, ...] = (256, 256, 256)
  dtype: str = 'float32'  # Compute dtype; params stay float32.
  conv: ModuleDef = nn.Conv
  deconv: ModuleDef = nn.ConvTranspose
  norm: ModuleDef = layers.BatchNormAct

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if self.dtype not in DTYPES:
      raise ValueError(f'dtype must be float32 or bfloat16: {self.dtype!r}')
    dtype = DTYPES[self.dtype]
    x = x.astype(dtype)
    x = MobileNetV2(widen_factor=self.widen_factor, dtype=dtype,
                    conv=self.conv, norm=self.norm, name='backbone')(x, train)
    x = AEHead(num_joints=self.num_joints,
               num_deconv_filters=tuple(self.num_deconv_filters),
               dtype=dtype, deconv=self.deconv, conv=self.conv,
               norm=self.norm, name='keypoint_head')(x, train)
    return x.astype(jnp.float32)


def module_defs(kernels: str) -> Dict[str, ModuleDef]:
  """AEModel's conv / deconv / norm module defs for 'flax' or 'cpu'."""
  if kernels not in KERNELS:
    raise ValueError(f"kernels must be 'flax' or 'cpu': {kernels!r}")
  return dict(KERNELS[kernels])


def default_kernels(backend: str) -> str:
  """'cpu' for the 'cpu' backend, else 'flax' (GPU, TPU)."""
  return 'cpu' if backend == 'cpu' else 'flax'


def create_model(model_config: Mapping[str, Any],
                 kernels: str = 'flax') -> AEModel:
  """AEModel(**model_config) built with the `kernels` layers.

  Args:
    model_config: AEModel arguments (config.model): num_joints,
      widen_factor, num_deconv_filters, dtype.
    kernels: 'flax' (plain flax layers, for GPU / TPU and export) or 'cpu'
      (cpu_kernels.py, for training and running on XLA:CPU).
  """
  model_config = dict(model_config)
  if 'conv_impl' in model_config:
    raise ValueError("config.model.conv_impl was removed: choose kernels= "
                     "'flax' or 'cpu' (ae_model.default_kernels)")
  return AEModel(**model_config, **module_defs(kernels))


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
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))

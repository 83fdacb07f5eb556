"""The model's default layers: plain flax, as XLA:GPU / TPU and cuDNN like.

AEModel, MobileNetV2 and AEHead take their layer classes as module defs
(as flax examples/imagenet/models.py does); `MODULE_DEFS` are the defaults:
  conv    nn.Conv; the 3x3 depthwise convs are nn.Conv with
          feature_group_count = channels (kernel [3, 3, 1, C]);
  deconv  nn.ConvTranspose for PyTorch's ConvTranspose2d(4, 2, padding 1):
          padding k - 1 - p = 2 on each side and transpose_kernel False,
          i.e. a stride-1 conv over the 2x dilated input whose kernel
          [4, 4, in, out] is the spatially flipped PyTorch weight
          (ae_jax/convert.py flips it);
  norm    BatchNormAct: nn.BatchNorm followed by an optional ReLU / ReLU6.
ae_jax/models/cpu_kernels.py has drop-in twins with fast XLA:CPU gradients
(`ae_model.create_model(config.model, kernels='cpu')`).
"""

from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

ACTIVATIONS: Dict[Optional[str], Callable[[jnp.ndarray], jnp.ndarray]] = {
    None: lambda x: x, 'relu': nn.relu, 'relu6': nn.relu6}


class BatchNormAct(nn.BatchNorm):
  """nn.BatchNorm (same variables and statistics), then `act`.

  act: None, 'relu' or 'relu6' (a name, so that a fused twin can take the
  same argument).
  """
  act: Optional[str] = None

  def __call__(self, x: jnp.ndarray,
               use_running_average: Optional[bool] = None,
               *, mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    if self.act not in ACTIVATIONS:
      raise ValueError(f'activation must be None, relu or relu6: {self.act}')
    y = super().__call__(x, use_running_average, mask=mask)
    return ACTIVATIONS[self.act](y)


MODULE_DEFS: Dict[str, ModuleDef] = {
    'conv': nn.Conv, 'deconv': nn.ConvTranspose, 'norm': BatchNormAct}

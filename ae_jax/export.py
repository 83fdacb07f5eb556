"""Export the AE model to a TensorFlow SavedModel with jax2tf.

The SavedModel has one signature, `serving_default`, taking
images [B, H, W, 3] float32 (ImageNet-normalised RGB, H and W multiples of
32) and returning {'heatmaps': [B, H/4, W/4, K], 'tags': [B, H/4, W/4, K]}.
Batch and spatial sizes are polymorphic by default (one exported graph
serves every test-time resize); `fixed_shape` pins them instead, which some
converters (TFLite) prefer.
"""

import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax
import numpy as np

from ae_jax.models import ae_model


def make_serving_fn(model_config: Mapping[str, Any],
                    variables: Dict[str, Any]) -> Callable:
  """images [B, H, W, 3] -> {'heatmaps', 'tags'} with variables baked in.

  Always the 'flax' kernels (plain flax layers, the accelerator graph),
  whatever machine traces it: a SavedModel is served on GPU / TPU, and
  TF's converters know native convolutions.
  """
  model = ae_model.create_model(model_config, kernels='flax')
  variables = jax.tree_util.tree_map(np.asarray, variables)
  k = model.num_joints

  def forward(images):
    out = model.apply(variables, images, train=False)
    return {'heatmaps': out[..., :k], 'tags': out[..., k:]}

  return forward


def export_saved_model(model_config: Mapping[str, Any],
                       variables: Dict[str, Any], out_dir: str,
                       fixed_shape: Optional[Sequence[int]] = None) -> str:
  """Writes a SavedModel of the AE model with `variables` baked in.

  Args:
    model_config: AEModel arguments (config.model; its dtype is kept). The
      graph is built with the 'flax' kernels (`make_serving_fn`).
    variables: {'params', 'batch_stats'} (host or device arrays).
    out_dir: SavedModel directory to write (created or overwritten).
    fixed_shape: optional (B, H, W) to export a static-shape graph.

  Returns:
    out_dir.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')

  forward = make_serving_fn(model_config, variables)
  if fixed_shape is None:
    # H, W as 32 * symbol: the stride-2 convs then divide exactly.
    poly = ['(b, 32*h, 32*w, 3)']
    spec = tf.TensorSpec([None, None, None, 3], tf.float32, name='images')
  else:
    b, h, w = fixed_shape
    if h % 32 or w % 32:
      raise ValueError(f'fixed_shape H, W must be multiples of 32: {h}x{w}')
    poly = None
    spec = tf.TensorSpec([b, h, w, 3], tf.float32, name='images')
  tf_forward = jax2tf.convert(forward, polymorphic_shapes=poly,
                              with_gradient=False)
  module = tf.Module()
  module.forward = tf.function(tf_forward, autograph=False,
                               input_signature=[spec])
  tf.saved_model.save(module, os.path.abspath(out_dir),
                      signatures={'serving_default': module.forward})
  return out_dir

"""Export the AE model to a TensorFlow SavedModel with jax2tf.

The SavedModel has one signature, `serving_default`, taking
images [B, H, W, 3] float32 (ImageNet-normalised RGB, H and W multiples of
32) and returning {'heatmaps': [B, H/4, W/4, K], 'tags': [B, H/4, W/4, K]}.
Batch and spatial sizes are polymorphic by default (one exported graph
serves every test-time resize); `fixed_shape` pins them instead, which some
converters (TFLite) prefer.

With decoding (`max_people` > 0, export.py's default) the signature also
returns grouping's device half (candidates.py) on the maps resized to the
input size (bilinear, mmpose's project2image; single scale, no flip), so a
deployment runs only the small tag matching on the host:
  candidate_values [B, K, M] float32: 5x5-NMS'd heat of the top M peaks per
    joint, descending (keep those > detection_threshold);
  candidate_xy [B, K, M, 2] int32: their (x, y) on the H x W input grid;
  candidate_tags [B, K, M, 1] float32: the tags there;
  candidate_neighbors [B, K, M, 4] float32: heat at (y+1, x), (y-1, x),
    (y, x+1), (y, x-1) for the quarter-pixel adjust.
decode.decode_candidates turns them into people (with idx = y * W + x;
refine, which needs the full maps, can use `heatmaps` / `tags`, resized).

Writing is atomic: the SavedModel is built in a temporary folder beside
out_dir and renamed into place; an existing out_dir is replaced only if it
is a SavedModel (or empty).
"""

import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ae_jax import outputs
from ae_jax.infer import candidates
from ae_jax.models import ae_model


class ExportError(ValueError):
  """out_dir cannot take the SavedModel (one line)."""


def make_serving_fn(model_config: Mapping[str, Any],
                    variables: Dict[str, Any], max_people: int = 0,
                    nms_kernel: int = 5) -> Callable:
  """images [B, H, W, 3] -> {'heatmaps', 'tags'} with variables baked in.

  Always the 'flax' kernels (plain flax layers, the accelerator graph),
  whatever machine traces it: a SavedModel is served on GPU / TPU, and
  TF's converters know native convolutions. max_people > 0 adds the
  candidate_* outputs (module docstring).
  """
  model = ae_model.create_model(model_config, kernels='flax')
  variables = jax.tree_util.tree_map(np.asarray, variables)
  k = model.num_joints

  def forward(images):
    out = model.apply(variables, images, train=False)
    result = {'heatmaps': out[..., :k], 'tags': out[..., k:]}
    if max_people > 0:
      height, width = images.shape[1:3]
      maps = jax.image.resize(out, (out.shape[0], height, width,
                                    out.shape[3]), 'linear')
      cands = jax.vmap(lambda m: candidates.top_candidates(
          jnp.moveaxis(m[..., :k], -1, 0),
          jnp.moveaxis(m[..., k:], -1, 0)[..., None], max_people,
          nms_kernel, by_sort=True))(maps)
      idx = cands.idx
      result.update(
          candidate_values=cands.val,
          candidate_xy=jnp.stack([idx % width, idx // width], -1),
          candidate_tags=cands.tag,
          candidate_neighbors=cands.neighbors)
    return result

  return forward


def check_out_dir(out_dir: str) -> str:
  """Absolute out_dir after checking it can be (re)placed; see module doc."""
  out_dir = os.path.abspath(out_dir)
  if os.path.isfile(out_dir):
    raise ExportError(f'--out {out_dir} is a file')
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(
      os.path.join(out_dir, 'saved_model.pb')):
    raise ExportError(f'--out {out_dir} is a non-empty folder that is not a '
                      'SavedModel; refusing to replace it')
  parent = os.path.dirname(out_dir)
  try:
    os.makedirs(parent, exist_ok=True)
    os.rmdir(tempfile.mkdtemp(dir=parent, prefix='.probe-'))
  except OSError as e:
    raise ExportError(f'cannot write --out {out_dir}: '
                      f'{e.strerror or e}') from None
  return out_dir


def export_saved_model(model_config: Mapping[str, Any],
                       variables: Dict[str, Any], out_dir: str,
                       fixed_shape: Optional[Sequence[int]] = None,
                       max_people: int = 0, nms_kernel: int = 5) -> str:
  """Writes a SavedModel of the AE model with `variables` baked in.

  Args:
    model_config: AEModel arguments (config.model; its dtype is kept). The
      graph is built with the 'flax' kernels (`make_serving_fn`).
    variables: {'params', 'batch_stats'} (host or device arrays).
    out_dir: SavedModel directory to write (created, or replaced when it
      is a SavedModel or empty), atomically.
    fixed_shape: optional (B, H, W) to export a static-shape graph.
    max_people, nms_kernel: > 0 adds the candidate_* outputs (top
      max_people per joint after nms_kernel NMS).

  Returns:
    out_dir.

  Raises:
    ExportError: out_dir cannot be written or would destroy other data.
  """
  out_dir = check_out_dir(out_dir)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')

  forward = make_serving_fn(model_config, variables, max_people, nms_kernel)
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
  if fixed_shape is None:
    converted = tf_forward

    def tf_forward(images):  # pylint: disable=function-redefined
      # Other sizes failed deep in XLA ('Module shape refinement failed').
      hw = tf.shape(images)[1:3]
      check = tf.debugging.Assert(tf.reduce_all(hw % 32 == 0), [
          'images: height and width must be multiples of 32 (pad the '
          'bottom / right edge); got height, width =', hw])
      with tf.control_dependencies([check]):
        return converted(tf.identity(images))
  module = tf.Module()
  module.forward = tf.function(tf_forward, autograph=False,
                               input_signature=[spec])
  tmp = tempfile.mkdtemp(dir=os.path.dirname(out_dir),
                         prefix=f'.{os.path.basename(out_dir)}.tmp-')
  try:
    tf.saved_model.save(module, tmp,
                        signatures={'serving_default': module.forward})
    outputs.apply_umask(tmp)  # mkdtemp's folder is 0700
    if os.path.isdir(out_dir):
      old = tmp + '.old'
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out_dir)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return out_dir

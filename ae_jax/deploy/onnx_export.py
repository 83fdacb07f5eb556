"""Export the AE model and grouping's device half as one ONNX graph.

The graph, for images [B, H, W, 3] uint8 RGB 0-255 (NHWC; H and W
multiples of 32; batch and size dynamic), is infer/predict's single-scale
device work:
  ImageNet normalisation (ae_model.normalize_images) -> with flip test the
  mirrored images join the batch -> the AE model (its own module code with
  the ONNX layer twins of onnx_graph.py) -> the mirror's maps flipped back
  with the left/right joint swap -> every map resized to H x W (bilinear,
  half-pixel centres: torch align_corners=False) -> heatmaps of image and
  mirror averaged, their tags side by side (L = 2 with flip, else 1) ->
  candidates.top_candidates: nms_kernel max-pool NMS, the top M =
  max_people peaks per joint (ties: lower flat index first), the tags
  there and the 4 neighbours adjust reads.
Outputs (decode.Candidates' fields, then the maps refine reads):
  val [B, K, M] float32 descending; idx [B, K, M] int32 flat y * W + x;
  tag [B, K, M, L] float32; neighbors [B, K, M, 4] float32 heat at
  (y+1, x), (y-1, x), (y, x+1), (y, x-1), clipped at the border;
  heatmaps [B, K, H, W] float32; tags [B, K, H, W, L] float32.
The keypoint spec, the test settings and the input contract travel in the
model's metadata_props (predictor.METADATA_* keys, json), so
deploy/predictor.py needs nothing else.
"""

import json
import os
import tempfile
from typing import Any, Dict, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from ae_jax import keypoints
from ae_jax import outputs
from ae_jax.deploy import onnx_graph
from ae_jax.deploy import predictor
from ae_jax.models import ae_model


class ExportError(ValueError):
  """The settings or the output path do not allow an ONNX export."""


def check_test_settings(test: Mapping[str, Any]) -> None:
  """The graph is single scale with project2image; others are refused."""
  scales = tuple(float(s) for s in test.get('scales', (1.0,)))
  if scales != (1.0,):
    raise ExportError(f'the ONNX graph is single scale; config.test.scales '
                      f'is {scales} (use eval.py for multi-scale)')
  if not test.get('project2image', True):
    raise ExportError('the ONNX graph resizes the maps to the input '
                      '(config.test.project2image=True)')


def check_out_file(path: str) -> str:
  """Absolute `path` after checking a .onnx file can be written there."""
  path = os.path.abspath(path)
  if not path.endswith('.onnx'):
    raise ExportError(f'--out {path}: an ONNX file name ends in .onnx')
  if os.path.isdir(path):
    raise ExportError(f'--out {path} is a folder')
  parent = os.path.dirname(path)
  try:
    os.makedirs(parent, exist_ok=True)
    os.remove(tempfile.mkstemp(dir=parent, prefix='.probe-')[1])
  except OSError as e:
    raise ExportError(f'cannot write --out {path}: '
                      f'{e.strerror or e}') from None
  return path


def _flip_back(g: onnx_graph.Graph, out: str, flip_index: Sequence[int],
               num_joints: int) -> str:
  """Mirror's maps [B, 2K, h, w] -> flipped in W, joints swapped."""
  out = g.op('Slice', [out, g.const([-1], 's', np.int64),
                       g.const([-onnx_graph.INT64_MAX], 'e', np.int64),
                       g.const([3], 'a', np.int64),
                       g.const([-1], 'st', np.int64)])
  channels = list(flip_index) + [num_joints + j for j in flip_index]
  return g.op('Gather', [out, g.const(channels, 'swap', np.int64)], axis=1)


def _split(g: onnx_graph.Graph, x: str, sizes, axis: int):
  """ONNX Split of x into parts of `sizes` along axis."""
  return g.op('Split', [x, g.const(sizes, 'parts', np.int64)],
              num_outputs=len(sizes), axis=axis)


def _candidates(g: onnx_graph.Graph, heat: str, tag_planes: Sequence[str],
                height: str, width: str, max_people: int, nms_kernel: int):
  """candidates.top_candidates over [B, K, H, W] maps (module docstring)."""
  pad = (nms_kernel - 1) // 2
  pooled = g.op('MaxPool', [heat], kernel_shape=[nms_kernel, nms_kernel],
                strides=[1, 1], pads=[pad] * 4)
  nms = g.op('Where', [g.op('Equal', [pooled, heat]), heat,
                       g.const(np.float32(-np.inf), 'ninf')])
  flat_shape = g.const([0, 0, -1], 'flat', np.int64)
  flat = lambda x: g.op('Reshape', [x, flat_shape])
  val, idx = g.op('TopK', [flat(nms), g.const([max_people], 'm', np.int64)],
                  num_outputs=2, axis=-1, largest=1, sorted=1)
  heat_flat = flat(heat)
  unsqueeze = lambda x: g.op('Unsqueeze', [x, g.const([-1], 'ax', np.int64)])
  tag = g.op('Concat', [unsqueeze(g.op('GatherElements', [flat(t), idx],
                                       axis=2)) for t in tag_planes],
             axis=-1)
  one = g.const(np.int64(1), 'one')
  zero = g.const(np.int64(0), 'zero')
  y, x = g.op('Div', [idx, width]), g.op('Mod', [idx, width])
  last_y, last_x = g.op('Sub', [height, one]), g.op('Sub', [width, one])

  def at(yy, xx):
    index = g.op('Add', [g.op('Mul', [yy, width]), xx])
    return unsqueeze(g.op('GatherElements', [heat_flat, index], axis=2))

  neighbors = g.op('Concat', [
      at(g.op('Min', [g.op('Add', [y, one]), last_y]), x),
      at(g.op('Max', [g.op('Sub', [y, one]), zero]), x),
      at(y, g.op('Min', [g.op('Add', [x, one]), last_x])),
      at(y, g.op('Max', [g.op('Sub', [x, one]), zero]))], axis=-1)
  return val, g.op('Cast', [idx], to=onnx.TensorProto.INT32), tag, neighbors


def build_model(model_config: Mapping[str, Any], variables: Dict[str, Any], *,
                spec: keypoints.KeypointSpec, test: Mapping[str, Any],
                fixed_shape: Sequence[int] | None = None) -> onnx.ModelProto:
  """The ONNX ModelProto of the module docstring.

  Args:
    model_config: AEModel arguments (config.model with num_joints).
    variables: {'params', 'batch_stats'} (numpy or jax arrays).
    spec: the keypoint spec (flip_index; stored in the metadata).
    test: config.test (flip, grouping max_people / nms_kernel; stored).
    fixed_shape: optional (B, H, W) for a static input shape.

  Raises:
    ExportError: multi-scale or no project2image, or a bad fixed_shape.
  """
  check_test_settings(test)
  grouping = dict(test.get('grouping', {}))
  max_people = int(grouping.get('max_people', 30))
  nms_kernel = int(grouping.get('nms_kernel', 5))
  flip = bool(test.get('flip', True))
  model = ae_model.AEModel(**{**model_config, 'dtype': 'float32'},
                           **onnx_graph.MODULE_DEFS)
  num_joints = model.num_joints
  if num_joints != spec.num_joints:
    raise ExportError(f'the model has {num_joints} joints, the keypoint '
                      f'spec {spec.num_joints}')
  dims = ['batch', 'height', 'width']
  if fixed_shape is not None:
    dims = [int(v) for v in fixed_shape]
    if len(dims) != 3 or min(dims) <= 0 or dims[1] % 32 or dims[2] % 32:
      raise ExportError(f'--fixed_shape wants B,H,W with H, W multiples of '
                        f'32, got {tuple(fixed_shape)}')
  g = onnx_graph.Graph()
  shape = g.op('Shape', ['images'])
  hw = g.op('Slice', [shape, g.const([1], 's', np.int64),
                      g.const([3], 'e', np.int64)])
  height = g.op('Squeeze', [g.op('Slice', [hw, g.const([0], 's', np.int64),
                                           g.const([1], 'e', np.int64)])])
  width = g.op('Squeeze', [g.op('Slice', [hw, g.const([1], 's', np.int64),
                                          g.const([2], 'e', np.int64)])])
  x = g.op('Div', [g.op('Cast', ['images'], to=onnx.TensorProto.FLOAT),
                   g.const(np.float32(255.0), 'v255')])
  x = g.op('Div', [g.op('Sub', [x, g.const(keypoints.IMAGENET_MEAN, 'mean')]),
                   g.const(keypoints.IMAGENET_STD, 'std')])
  x = g.op('Transpose', [x], perm=[0, 3, 1, 2])
  if flip:
    mirror = g.op('Slice', [x, g.const([-1], 's', np.int64),
                            g.const([-onnx_graph.INT64_MAX], 'e', np.int64),
                            g.const([3], 'a', np.int64),
                            g.const([-1], 'st', np.int64)])
    x = g.op('Concat', [x, mirror], axis=0)
  variables = {'params': variables['params'],
               'batch_stats': variables['batch_stats']}
  out = model.apply(variables, onnx_graph.Value(g, x, 3)).name
  batch = g.op('Slice', [shape, g.const([0], 's', np.int64),
                         g.const([1], 'e', np.int64)])
  channels = g.const([2 * num_joints], 'c', np.int64)
  sizes = g.op('Concat', [batch, channels, hw], axis=0)
  resize = lambda m: g.op('Resize', [m, '', '', sizes], mode='linear',
                          coordinate_transformation_mode='half_pixel')
  if flip:
    batch_split = g.op('Concat', [batch, batch], axis=0)
    own, mirrored = g.op('Split', [out, batch_split], num_outputs=2, axis=0)
    heat, tag = _split(g, resize(own), [num_joints] * 2, 1)
    heat_f, tag_f = _split(
        g, resize(_flip_back(g, mirrored, spec.flip_index, num_joints)),
        [num_joints] * 2, 1)
    heat = g.op('Div', [g.op('Add', [heat, heat_f]),
                        g.const(np.float32(2.0), 'two')])
    tag_planes = [tag, tag_f]
  else:
    heat, tag = _split(g, resize(out), [num_joints] * 2, 1)
    tag_planes = [tag]
  outputs = list(_candidates(g, heat, tag_planes, height, width, max_people,
                             nms_kernel))
  unsqueeze = lambda t: g.op('Unsqueeze', [t, g.const([-1], 'ax', np.int64)])
  outputs += [heat, g.op('Concat', [unsqueeze(t) for t in tag_planes],
                         axis=-1)]
  for name, value in zip(predictor.OUTPUT_NAMES, outputs):  # the public names
    g.op('Identity', [value], hint=name)
    g.nodes[-1].output[0] = name
  tag_dim = len(tag_planes)
  b, h, w = dims
  f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
  out_info = [('val', f32, [b, num_joints, max_people]),
              ('idx', i32, [b, num_joints, max_people]),
              ('tag', f32, [b, num_joints, max_people, tag_dim]),
              ('neighbors', f32, [b, num_joints, max_people, 4]),
              ('heatmaps', f32, [b, num_joints, h, w]),
              ('tags', f32, [b, num_joints, h, w, tag_dim])]
  metadata = {
      predictor.METADATA_FORMAT: predictor.FORMAT_VERSION,
      predictor.METADATA_INPUT: predictor.INPUT_CONTRACT,
      predictor.METADATA_MODEL: json.dumps({k: (list(v) if isinstance(v, tuple) else v)
                                  for k, v in dict(model_config).items()}),
      predictor.METADATA_KEYPOINTS: json.dumps({
          'names': list(spec.names), 'flip_index': list(spec.flip_index),
          'skeleton': [list(p) for p in spec.skeleton],
          'sigmas': list(spec.sigmas)}),
      predictor.METADATA_TEST: json.dumps({
          'input_size': int(test.get('input_size', 512)), 'scales': [1.0],
          'flip': flip, 'project2image': True, 'grouping': grouping}),
  }
  return g.make_model(
      [helper.make_tensor_value_info('images', onnx.TensorProto.UINT8,
                                     [b, h, w, 3])],
      [helper.make_tensor_value_info(*info) for info in out_info],
      'ae_jax', metadata)


def write_model(model: onnx.ModelProto, path: str) -> str:
  """Writes `model` to path atomically (a temporary sibling renamed)."""
  path = check_out_file(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                             prefix=f'.{os.path.basename(path)}.tmp-')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(model.SerializeToString())
    outputs.apply_umask(tmp)  # mkstemp makes it 0600
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def export_onnx(model_config: Mapping[str, Any], variables: Dict[str, Any],
                path: str, *, spec: keypoints.KeypointSpec,
                test: Mapping[str, Any],
                fixed_shape: Sequence[int] | None = None) -> str:
  """build_model + write_model; returns the absolute path written."""
  check_out_file(path)
  return write_model(build_model(model_config, variables, spec=spec,
                                 test=test, fixed_shape=fixed_shape), path)

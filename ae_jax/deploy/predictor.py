"""A predictor for the exported ONNX graph without JAX, TensorFlow or torch.

onnxruntime runs the graph of deploy/onnx_export.py (model, flip, resize,
NMS / top-k candidates, maps); the rest is the same host code eval.py uses:
mmpose's resize-align (data/eval_input.resize_inputs), grouping's host half
and refine over the numpy maps (infer/decode.py, infer/refine.host_argmax)
and the map back to image pixels. Everything it needs (keypoint spec, test
settings, input contract) is read from the file's metadata_props.

This module and what it imports use no jax, flax, tensorflow or torch
(tests/test_deploy.py runs it with those imports blocked); onnxruntime
comes with the `deploy` extra.

Legend: B batch, H x W the resized input (multiples of 64 from
resize-align; the graph takes multiples of 32), K joints, M = max_people,
L tag dim (2 with flip), P people.
"""

import json
from typing import Dict, Hashable, Iterable, Iterator, Sequence, Tuple

import numpy as np

from ae_jax import keypoints
from ae_jax.data import eval_input
from ae_jax.infer import decode
from ae_jax.infer import refine

# metadata_props keys of an exported file (values: json or text).
METADATA_FORMAT = 'ae_jax.format'
METADATA_KEYPOINTS = 'ae_jax.keypoints'
METADATA_TEST = 'ae_jax.test'
METADATA_MODEL = 'ae_jax.model'
METADATA_INPUT = 'ae_jax.input'
FORMAT_VERSION = '1'
INPUT_CONTRACT = ('images [B, H, W, 3] uint8 RGB 0-255, NHWC, not '
                  'normalised (the graph does ImageNet mean/std); H and W '
                  'multiples of 32')
OUTPUT_NAMES = ('val', 'idx', 'tag', 'neighbors', 'heatmaps', 'tags')


class ModelFileError(ValueError):
  """The file is not an ae_jax ONNX export (or not readable)."""


class InputError(ValueError):
  """Images that break the graph's input contract."""


def check_images(images: np.ndarray, fixed_shape=None) -> None:
  """Raises InputError (naming INPUT_CONTRACT) unless images fit the graph.

  fixed_shape: the graph's input shape when it is static ([B, H, W, 3]).
  """
  images_ = np.asarray(images)
  problem = None
  if images_.dtype != np.uint8:
    problem = f'dtype {images_.dtype}'
  elif images_.ndim != 4 or images_.shape[-1] != 3:
    problem = f'shape {images_.shape}'
  elif images_.shape[1] % 32 or images_.shape[2] % 32:
    problem = f'size {images_.shape[1]} x {images_.shape[2]}'
  elif fixed_shape is not None and tuple(images_.shape) != tuple(fixed_shape):
    problem = (f'shape {images_.shape} (this file was exported for '
               f'{tuple(fixed_shape)})')
  if problem is not None:
    raise InputError(f'{problem} does not fit the input contract: '
                     f'{INPUT_CONTRACT}')


def read_metadata(meta: Dict[str, str], path: str):
  """(KeypointSpec, test settings dict) from an export's metadata_props."""
  if meta.get(METADATA_FORMAT) != FORMAT_VERSION:
    raise ModelFileError(
        f'{path} is not an ae_jax ONNX export (metadata {METADATA_FORMAT}='
        f'{meta.get(METADATA_FORMAT)!r}, want {FORMAT_VERSION!r}); export '
        'it with export.py --format onnx')
  try:
    kp = json.loads(meta[METADATA_KEYPOINTS])
    test = json.loads(meta[METADATA_TEST])
    spec = keypoints.KeypointSpec(
        names=tuple(kp['names']), flip_index=tuple(kp['flip_index']),
        skeleton=tuple(tuple(p) for p in kp['skeleton']),
        sigmas=tuple(kp['sigmas']))
  except (KeyError, TypeError, ValueError) as e:
    raise ModelFileError(f'{path}: unreadable ae_jax metadata ({e})') from None
  return spec, test


class OnnxPredictor:
  """Images -> people with an exported ONNX file (onnxruntime).

  The same people as eval.py's predict.Predictor for the checkpoint and
  config.test the file was exported from (single scale; tests/test_deploy.py).

  Args:
    path: the .onnx file (export.py --format onnx).
    num_threads: onnxruntime intra-op threads (default: its own choice).
    providers: onnxruntime execution providers (default CPU).

  Attributes:
    spec: the KeypointSpec stored in the file.
    test: the config.test values stored in the file (input_size, flip,
      grouping ...).
    grouping: decode.GroupingParams of test['grouping'].

  Raises:
    ModelFileError: a file that is missing, not ONNX or not ours.
  """

  def __init__(self, path: str, *, num_threads: int | None = None,
               providers: Sequence[str] = ('CPUExecutionProvider',)):
    import onnxruntime as ort  # optional: the deploy extra
    options = ort.SessionOptions()
    if num_threads:
      options.intra_op_num_threads = int(num_threads)
    options.log_severity_level = 3  # no shape-merge warnings
    try:
      self.session = ort.InferenceSession(path, options,
                                          providers=list(providers))
    except Exception as e:  # onnxruntime raises its own Fail / NoSuchFile
      raise ModelFileError(f'cannot load ONNX model {path}: '
                           f'{str(e).splitlines()[0]}') from None
    self.spec, self.test = read_metadata(
        self.session.get_modelmeta().custom_metadata_map, path)
    self.grouping = decode.grouping_params(self.test['grouping'])
    self.input_size = int(self.test['input_size'])
    shape = self.session.get_inputs()[0].shape
    self.fixed_shape = (tuple(shape) if all(isinstance(d, int) for d in shape)
                        else None)

  def run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
    """The graph's outputs (OUTPUT_NAMES) for images [B, H, W, 3] uint8.

    Raises:
      InputError: images that break the input contract.
    """
    check_images(images, self.fixed_shape)
    return dict(zip(OUTPUT_NAMES, self.session.run(
        list(OUTPUT_NAMES), {'images': np.ascontiguousarray(images)})))

  def decode_image(self, outputs: Dict[str, np.ndarray], index: int,
             inputs: eval_input.ScaledInputs) -> decode.Poses:
    """Image `index` of run()'s outputs -> Poses in image pixels."""
    heat, tags = outputs['heatmaps'][index], outputs['tags'][index]
    _, height, width = heat.shape
    cands = decode.Candidates(*(outputs[n][index] for n in OUTPUT_NAMES[:4]))
    poses = decode.decode_candidates(cands, width, self.grouping,
                                     refine.host_argmax(heat, tags))
    return poses.to_image(inputs.center, inputs.scale, (width, height))

  def predict_inputs(self, inputs: Sequence[eval_input.ScaledInputs]
                     ) -> Tuple[decode.Poses, ...]:
    """People of resized inputs of one shape, run as one batch."""
    outputs = self.run(np.stack([x.images[0] for x in inputs]))
    return tuple(self.decode_image(outputs, i, x) for i, x in enumerate(inputs))

  def stream(self, items: Iterable[Tuple[Hashable, np.ndarray]]
             ) -> Iterator[decode.Prediction]:
    """(key, [H, W, 3] uint8 RGB image) -> Predictions, in order.

    One image per run (onnxruntime on CPU gains little from batching);
    a decode.StreamFn, as draw.py and coco_eval.py take.
    """
    for key, image in items:
      x = eval_input.resize_inputs(image, self.input_size, (1.0,))
      poses, = self.predict_inputs([x])
      yield decode.Prediction(key, poses)

  def __call__(self, image: np.ndarray) -> decode.Poses:
    """People in one [H, W, 3] uint8 RGB image (image pixels)."""
    (pred,) = self.stream([(None, image)])
    return pred.poses

"""PyTorch (mmpose / mmcls) MobileNetV2 state_dict -> Flax AEModel variables.

A pure name-and-layout mapping; torch is imported lazily, only by
`load_torch_checkpoint`; the model's shapes and the config a set of tensors
implies come from ae_jax.models.shapes. Torch key
`backbone.layer2.1.conv.0.bn.weight` is Flax
`params/backbone/layer2_1/conv_0/bn/scale` (a number after a name joins it
with '_', as the Flax submodule names in ae_jax/models do).

Layouts (torch -> Flax; Flax convs run NHWC with HWIO kernels):
  Conv2d weight [O, I, kh, kw]           -> kernel [kh, kw, I, O]
  depthwise     [C, 1, 3, 3]             -> kernel [3, 3, 1, C] (same rule)
  ConvTranspose2d weight [I, O, kh, kw]  -> kernel [kh, kw, I, O] (HWIO),
      spatially flipped: the Flax kernel is that of the equivalent stride-1
      convolution over the stride-dilated input padded by k - 1 - p
      (lax.conv_transpose / nn.ConvTranspose with transpose_kernel=False),
      while PyTorch's transposed conv scatters each input pixel with the
      kernel as stored, i.e. correlates with the flipped kernel.
  BatchNorm weight/bias -> params scale/bias; running_mean/running_var ->
      batch_stats mean/var; num_batches_tracked is dropped (Flax keeps none).

Checkpoint kinds (`detect_kind`):
  'pose'      mmpose AssociativeEmbedding: `backbone.*` + `keypoint_head.*`
              -> full {'params', 'batch_stats'}.
  'imagenet'  mmcls ImageClassifier MobileNetV2 (`backbone.*` + `head.fc.*`),
              or a bare backbone state_dict (`conv1.conv.weight`, ... as
              mmcv's mmcls:// loader leaves it) -> backbone-only variables
              {'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}}.
              The 1000-class `head.*` classifier is dropped: the pose model
              has no use for it (mmpose loads the backbone only, too).

Conversion is all or nothing: every Flax leaf of the expected AEModel tree
must be filled, every torch tensor used, every shape equal; otherwise
`ConversionError` lists the missing, unexpected and mismatched keys.
"""

import dataclasses
import os
import pickle
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ae_jax.models import shapes

Variables = Dict[str, Any]
# Flax leaf address: (collection, module path..., leaf name).
FlaxPath = Tuple[str, ...]

POSE = 'pose'
IMAGENET = 'imagenet'
# mmcls classifier and neck prefixes dropped from an ImageNet checkpoint.
CLASSIFIER_PREFIXES = ('head.', 'neck.')
MAX_LISTED = 6  # keys listed per category in an error message


class ConversionError(ValueError):
  """A checkpoint that is not (exactly) the expected MobileNetV2 AE model."""

  def __init__(self, message: str, missing: Sequence[str] = (),
               unexpected: Sequence[str] = (),
               mismatched: Sequence[str] = ()):
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)
    parts = [message]
    for name, keys in (('missing', self.missing),
                       ('unexpected', self.unexpected),
                       ('shape mismatch', self.mismatched)):
      if keys:
        shown = ', '.join(keys[:MAX_LISTED])
        more = (f' ... and {len(keys) - MAX_LISTED} more'
                if len(keys) > MAX_LISTED else '')
        parts.append(f'{len(keys)} {name}: {shown}{more}')
    super().__init__('; '.join(parts))


@dataclasses.dataclass
class Conversion:
  """Result of `convert_state_dict`."""
  variables: Variables  # {'params', 'batch_stats'} of host numpy float32
  kind: str  # POSE or IMAGENET
  model_kwargs: Dict[str, Any]  # AEModel(**model_kwargs) matches variables
  num_tensors: int  # torch tensors used (num_batches_tracked excluded)
  num_params: int  # scalars in variables['params']
  dropped: List[str]  # torch keys intentionally ignored


def load_torch_checkpoint(path: str) -> Dict[str, np.ndarray]:
  """Reads a .pth file into a flat {torch key: float32 numpy array} dict.

  Accepts mmcv-style {'state_dict': ..., 'meta': ...} dicts, {'model': ...}
  dicts and bare state_dicts. Uses `torch.load(weights_only=True)`, so a file
  needing arbitrary unpickling is refused rather than executed.

  Raises:
    ConversionError: naming the file and what is wrong with it (missing,
      not a torch checkpoint, truncated/corrupt, no tensors).
  """
  import torch  # pylint: disable=g-import-not-at-top  # optional dependency

  if not os.path.isfile(path):
    raise ConversionError(f'checkpoint file not found: {path}')
  with open(path, 'rb') as f:
    head = f.read(8)
  # torch.save writes a zip archive (PyTorch >= 1.6) or a legacy pickle.
  if not (head.startswith(b'PK\x03\x04') or head.startswith(b'\x80')):
    raise ConversionError(
        f'{path} is not a PyTorch checkpoint (neither a zip archive nor a '
        f'pickle; it starts with {head!r})')
  try:
    with warnings.catch_warnings():  # e.g. 'Detected pickle protocol 4'
      warnings.simplefilter('ignore')
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types for bad files.
    raise ConversionError(_describe_load_error(path, e)) from None
  if isinstance(obj, Mapping):
    for wrapper in ('state_dict', 'model'):
      if isinstance(obj.get(wrapper), Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping):
    raise ConversionError(
        f'{path} holds a {type(obj).__name__}, not a checkpoint dict with a '
        f'state_dict')
  state_dict = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ConversionError(
          f'{path} is not a state_dict: entry {key!r} is a '
          f'{type(value).__name__}, not a tensor')
    if key.endswith('num_batches_tracked'):
      state_dict[key] = value.numpy()
    else:
      state_dict[key] = value.detach().to(torch.float32).numpy()
  if not state_dict:
    raise ConversionError(f'{path} holds an empty state_dict')
  return state_dict


def _describe_load_error(path: str, error: Exception) -> str:
  """One line saying why torch.load(weights_only=True) refused a file.

  torch 2.13 raises pickle.UnpicklingError('Weights only load failed. ...')
  for any pickle that needs more than tensors and containers; the detail
  names the refused global ('Unsupported global: GLOBAL x' for a class,
  'unsupported GLOBAL posix.system whose module posix is blocked' for a
  callable) or, for protocol-4 pickles, the opcode ('Unsupported operand
  149', STACK_GLOBAL: an import by name).
  """
  text = str(error).strip()
  if (isinstance(error, pickle.UnpicklingError) and
      text.startswith('Weights only load failed')):
    found = (re.search(r'GLOBAL (\S+)', text) or
             re.search(r'Unsupported operand (\d+)', text))
    what = f' ({found.group(0)})' if found else ''
    return (f'{path} is not a weights-only checkpoint: it pickles code or '
            f'objects{what}; refused to unpickle it '
            '(torch.load(weights_only=True) never runs them)')
  # torch's first sentence says what failed; the rest is advice.
  first_line = text.splitlines()[0].split('. ')[0] if text else ''
  return (f'cannot read {path} as a PyTorch checkpoint (truncated or '
          f'corrupt?): {type(error).__name__}: {first_line}')


def detect_kind(keys) -> str:
  """POSE or IMAGENET from the key prefixes; ConversionError otherwise."""
  keys = list(keys)
  if any(k.startswith('keypoint_head.') for k in keys):
    if not any(k.startswith('backbone.') for k in keys):
      raise ConversionError('keypoint_head.* keys but no backbone.* keys: '
                            'not an mmpose AE MobileNetV2 checkpoint')
    return POSE
  if any(k.startswith('backbone.') for k in keys):
    return IMAGENET
  if any(k.startswith('conv1.') for k in keys):
    return IMAGENET  # bare backbone state_dict
  raise ConversionError(
      'no backbone.* or keypoint_head.* keys (first keys: '
      f'{", ".join(keys[:3])}): not an mmpose pose or mmcls MobileNetV2 '
      'checkpoint')


def torch_to_flax_path(key: str, ndim: int) -> Optional[FlaxPath]:
  """Maps one torch key to its Flax leaf address; None for dropped keys.

  Args:
    key: a torch key with the `backbone.`/`keypoint_head.` prefix.
    ndim: the tensor's rank (a 4-D `weight` is a conv kernel, a 1-D one a BN
      scale).
  """
  *modules, leaf = key.split('.')
  names: List[str] = []
  for part in modules:
    if part.isdigit() and names:
      names[-1] = f'{names[-1]}_{part}'  # nn.Sequential index -> name_i
    else:
      names.append(part)
  if leaf == 'num_batches_tracked':
    return None
  if leaf == 'weight':
    return ('params', *names, 'kernel' if ndim != 1 else 'scale')
  if leaf == 'bias':
    return ('params', *names, 'bias')
  if leaf == 'running_mean':
    return ('batch_stats', *names, 'mean')
  if leaf == 'running_var':
    return ('batch_stats', *names, 'var')
  return ('params', *names, leaf)  # unknown leaf: reported as unexpected


def flax_path_to_torch(path: FlaxPath) -> str:
  """Inverse of `torch_to_flax_path` for error messages."""
  leaf = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean',
          'var': 'running_var'}.get(path[-1], path[-1])
  modules = [re.sub(r'_(\d+)$', r'.\1', name) for name in path[1:-1]]
  # conv_0 of an inverted residual is torch's `conv.0`; layer2_1 is layer2.1.
  return '.'.join(modules + [leaf])


def is_transposed_conv(path: FlaxPath) -> bool:
  """True for the head's ConvTranspose2d kernels (deconv_layers_{0,3,6})."""
  return (path[-1] == 'kernel' and len(path) >= 3 and
          path[-3] == 'keypoint_head' and path[-2].startswith('deconv_layers'))


def convert_tensor(path: FlaxPath, value: np.ndarray) -> np.ndarray:
  """Re-lays out one torch tensor for the Flax leaf at `path`."""
  if path[-1] != 'kernel' or value.ndim != 4:
    return value
  if is_transposed_conv(path):
    # [I, O, kh, kw] -> flip kh, kw -> [kh, kw, I, O].
    return np.ascontiguousarray(
        value[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))
  return np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # [O,I,kh,kw]


def torch_shape(path: FlaxPath, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The torch layout of a Flax leaf shape (for error messages)."""
  if path[-1] != 'kernel' or len(shape) != 4:
    return tuple(shape)
  kh, kw, i, o = shape
  return (i, o, kh, kw) if is_transposed_conv(path) else (o, i, kh, kw)


def flax_shape(path: FlaxPath, shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """The Flax leaf shape of a torch tensor shape (`convert_tensor`'s)."""
  if path[-1] != 'kernel' or len(shape) != 4:
    return tuple(shape)
  if is_transposed_conv(path):  # [I, O, kh, kw]
    return (shape[2], shape[3], shape[0], shape[1])
  return (shape[2], shape[3], shape[1], shape[0])  # [O, I, kh, kw]


def infer_model_kwargs(state_dict: Mapping[str, np.ndarray], kind: str,
                       widen_factor: Optional[float] = None
                       ) -> Dict[str, Any]:
  """The AEModel kwargs the tensors' shapes imply (models.shapes): for a
  pose checkpoint widen_factor, num_deconv_filters and num_joints, for an
  ImageNet one widen_factor. A given `widen_factor` is kept as is; where
  the backbone fits no width, the conversion reports what differs.
  """
  implied = shapes.implied_config({
      path: flax_shape(path, np.shape(v)) for path, v in (
          (torch_to_flax_path(k, np.ndim(v)), v)
          for k, v in state_dict.items()) if path is not None})
  kwargs: Dict[str, Any] = {}
  if kind == POSE:
    kwargs['num_deconv_filters'] = implied.get('num_deconv_filters',
                                               (256, 256, 256))
    if 'num_joints' in implied:
      kwargs['num_joints'] = implied['num_joints']
  kwargs['widen_factor'] = (widen_factor if widen_factor is not None else
                            implied.get('widen_factor', 1.0))
  return kwargs


def _map_and_check(state_dict: Mapping[str, np.ndarray],
                   model_kwargs: Mapping[str, Any],
                   backbone_only: bool) -> Tuple[Variables, int]:
  """Maps all tensors and checks them against the expected Flax tree."""
  expected = shapes.model_shapes(model_kwargs, backbone_only)
  filled: Dict[FlaxPath, np.ndarray] = {}
  seen = set()  # leaves the checkpoint has, whatever their shape
  unexpected, mismatched, used = [], [], 0
  for key, value in state_dict.items():
    path = torch_to_flax_path(key, value.ndim)
    if path is None:
      continue
    if path not in expected:
      unexpected.append(key)
      continue
    seen.add(path)
    converted = convert_tensor(path, value)
    if converted.shape != expected[path]:
      mismatched.append(
          f'{key} {list(value.shape)} vs model '
          f'{list(torch_shape(path, expected[path]))}')
      continue
    filled[path] = converted.astype(np.float32)
    used += 1
  missing = [flax_path_to_torch(p) for p in expected if p not in seen]
  if missing or unexpected or mismatched:
    raise ConversionError(
        f'checkpoint does not match AEModel({_format_kwargs(model_kwargs)})'
        f'{" backbone" if backbone_only else ""}',
        missing, unexpected, mismatched)
  variables: Variables = {'params': {}, 'batch_stats': {}}
  for path, value in filled.items():
    node = variables
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return variables, used


def _format_kwargs(kwargs: Mapping[str, Any]) -> str:
  return ', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items()))


def convert_state_dict(state_dict: Mapping[str, Any],
                       widen_factor: Optional[float] = None,
                       num_deconv_filters: Optional[Sequence[int]] = None,
                       num_joints: Optional[int] = None) -> Conversion:
  """Converts an mmpose/mmcls MobileNetV2 state_dict to Flax variables.

  Args:
    state_dict: torch key -> numpy array or torch tensor (a `module.` prefix,
      as DataParallel writes it, is stripped).
    widen_factor: AEModel widen_factor; None infers it from the weights.
    num_deconv_filters: AEModel head widths; None infers them (pose only).
    num_joints: AEModel num_joints; None infers it (pose only).

  Returns:
    A `Conversion`: full variables for a pose checkpoint, backbone-only
    variables for an ImageNet one.

  Raises:
    ConversionError: listing missing, unexpected and mismatched keys.
  """
  arrays = {}
  for key, value in state_dict.items():
    if hasattr(value, 'detach'):  # a torch tensor
      value = value.detach().cpu().numpy()
    arrays[key[len('module.'):] if key.startswith('module.') else key] = (
        np.asarray(value))
  kind = detect_kind(arrays)
  dropped = [k for k in arrays if k.endswith('num_batches_tracked')]
  if kind == IMAGENET:
    if not any(k.startswith('backbone.') for k in arrays):
      arrays = {f'backbone.{k}': v for k, v in arrays.items()}
      dropped = [f'backbone.{k}' for k in dropped]
    dropped += [k for k in arrays if k.startswith(CLASSIFIER_PREFIXES)]
    arrays = {k: v for k, v in arrays.items()
              if not k.startswith(CLASSIFIER_PREFIXES)}
  kwargs = infer_model_kwargs(arrays, kind, widen_factor)
  for name, value in (('num_deconv_filters', num_deconv_filters),
                      ('num_joints', num_joints)):
    if value is not None:
      kwargs[name] = tuple(value) if name == 'num_deconv_filters' else value
  if kind == IMAGENET:  # the head is not in the checkpoint: defaults suffice
    kwargs = {'widen_factor': kwargs['widen_factor']}
  try:
    variables, used = _map_and_check(arrays, kwargs, kind == IMAGENET)
  except ConversionError as e:
    given = (widen_factor, num_deconv_filters, num_joints) != (None,) * 3
    raise (_architecture_error(arrays, kind, kwargs, e) if given
           else e) from None
  num_params = sum(int(np.size(v)) for v in _leaves(variables['params']))
  return Conversion(variables, kind, kwargs, used, num_params, dropped)


def _architecture_error(arrays, kind: str, kwargs: Mapping[str, Any],
                        error: ConversionError) -> ConversionError:
  """`error`, or one naming the config keys the checkpoint implies.

  When the weights convert with the architecture inferred from their
  shapes, the checkpoint is another width or joint count than the config:
  the config.model values to set say more than 273 shape mismatches.
  """
  implied = infer_model_kwargs(arrays, kind)
  if kind == IMAGENET:
    implied = {'widen_factor': implied['widen_factor']}
  try:
    _map_and_check(arrays, implied, kind == IMAGENET)
  except ConversionError:
    return error  # not just another width: list what does not match
  keys = [k for k in sorted(implied) if implied[k] != kwargs.get(k)]
  if not keys:
    return error
  settings = ', '.join(shapes.describe_key(k, implied[k]) for k in keys)
  config = ', '.join(f'{k}={kwargs.get(k)!r}' for k in keys)
  first = error.mismatched[0] if error.mismatched else ''
  return ConversionError(
      f'the checkpoint is AEModel({_format_kwargs(implied)}), the config '
      f'asks for {config}: set {settings} ({len(error.mismatched)} tensors '
      f'differ, e.g. {first})')


def _leaves(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _leaves(value)
  else:
    yield tree


def convert_checkpoint(path: str, **model_kwargs) -> Conversion:
  """`load_torch_checkpoint` + `convert_state_dict` (kwargs as the latter)."""
  return convert_state_dict(load_torch_checkpoint(path), **model_kwargs)

"""A checkpoint for eval.py / demo.py / export.py: its variables, and the
model config and keypoint spec to run it with.

A checkpoint that records them (checkpoints.Record: every train step and
converted-variables checkpoint written since) is run as recorded: the
training `--config.model.*` overrides need not be repeated and no annotation
file is read for the joint names, flip pairs or skeleton. An explicit
override that contradicts the record is an error naming both values
(`--config.model.dtype` is the compute precision, not a property of the
weights: it may differ). An older checkpoint without a record runs with
what the config says, and must fit it.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional

import ml_collections

from ae_jax import keypoints
from ae_jax.data import coco
from ae_jax.models import shapes
from ae_jax.train import checkpoints

# config_flags override keys -> the KeypointSpec field each one sets.
_SPEC_KEYS = {'data.keypoints.source': 'names',
              'data.keypoints.flip_pairs': 'flip_index',
              'data.keypoints.skeleton': 'skeleton',
              'data.keypoints.sigmas': 'sigmas'}


@dataclasses.dataclass
class Loaded:
  """What `load_for_inference` returns.

  Attributes:
    variables: {'params', 'batch_stats'} host arrays.
    model_config: AEModel keyword arguments (`ae_model.create_model`).
    spec: the keypoint spec (K = model_config['num_joints']).
    step: the train step read, None for a variables checkpoint.
    recorded: whether the checkpoint described itself.
  """
  variables: Dict[str, Any]
  model_config: Dict[str, Any]
  spec: keypoints.KeypointSpec
  step: Optional[int]
  recorded: bool


def load_for_inference(ckpt: str, config: ml_collections.ConfigDict,
                       overrides: Optional[Mapping[str, Any]] = None, *,
                       coco_root: Optional[str] = None,
                       split: Optional[str] = None) -> Loaded:
  """Reads `ckpt` and settles the model config and keypoint spec.

  Args:
    ckpt: a variables checkpoint or a train workdir (its newest usable
      step).
    config: the entry point's config (its model, data groups).
    overrides: the --config.* values given on the command line
      (`config_flags.get_override_values`): those that contradict the
      checkpoint's record are errors.
    coco_root: overrides config.data.coco_root (eval.py --coco_root).
    split: the split to be scored (eval.py): its annotation file must list
      the checkpoint's joints, by name and in order.

  Raises:
    checkpoints.CheckpointError: an unreadable checkpoint, one that does
      not fit the model config, or an override contradicting it.
    keypoints.KeypointSpecError: joints that differ from the checkpoint's.
    FileNotFoundError / coco.AnnotationError: an annotation file needed
      (older checkpoints with source='annotations', or `split`).
  """
  found = checkpoints.read_checkpoint(ckpt)
  data = dict(config.data, coco_root=coco_root or config.data.coco_root)
  overrides = dict(overrides or {})
  record = found.record
  model = {**config.model, **(record.model if record else {})}
  if record:
    for key, value in record.model.items():
      given = overrides.get(f'model.{key}')
      if key in shapes.SHAPE_KEYS and given is not None and (
          _normal(given) != _normal(value)):
        raise checkpoints.CheckpointError(
            f'--config.model.{key}={_normal(given)!r} contradicts the '
            f'checkpoint {ckpt}, made with {key}={_normal(value)!r} (leave '
            'the flag out: the checkpoint records its model)')
    if 'model.dtype' in overrides:  # compute precision, not the weights'
      model['dtype'] = overrides['model.dtype']
  if record and record.spec:
    spec = record.spec
    given = [k for k in _SPEC_KEYS if k in overrides]
    if given:
      diff = keypoints.spec_difference(
          spec, coco.resolve_spec(data, 'val', split),
          [_SPEC_KEYS[k] for k in given])
      if diff:
        raise checkpoints.CheckpointError(
            f'--config.{", --config.".join(given)} contradicts the '
            f'checkpoint {ckpt}: {diff} (leave the flags out: the checkpoint '
            'records its keypoints)')
    if split:
      coco.check_spec_matches(data, split, spec, f'the checkpoint {ckpt}')
  else:
    spec = coco.resolve_spec(data, 'val', split)
    head = shapes.implied_config(shapes.shapes_of(found.tree)).get(
        'num_joints')
    if head is not None and head != spec.num_joints:
      raise keypoints.KeypointSpecError(
          f'{ckpt}: the checkpoint head predicts {head} joints, the '
          f"config's keypoints have {spec.num_joints} "
          '(config.data.keypoints)')
  model['num_joints'] = spec.num_joints
  problem = shapes.mismatch(shapes.shapes_of(found.tree),
                            shapes.model_shapes(model))
  if problem:
    raise checkpoints.CheckpointError(
        f'{ckpt} does not fit config.model: {problem}')
  return Loaded(found.tree, model, spec, found.step, record is not None)


def _normal(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value

"""AEModel's parameter shapes; which config.model a set of variables implies.

The one home of "what are the model's shapes" and "does this checkpoint fit":
the converter (torch -> flax), the train state (pretrained init), the train
checkpoints (resume) and the inference loaders all ask here.

Shapes are keyed by the flax leaf address, a tuple of names
('params' | 'batch_stats', module path..., leaf), e.g.
('params', 'backbone', 'layer7_0', 'conv_2', 'conv', 'kernel'). A model
config is a dict of AEModel keyword arguments: widen_factor,
num_deconv_filters, num_joints (the keypoint spec's K), dtype.
"""

import functools
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ae_jax.models import ae_model

Path = Tuple[str, ...]
Shapes = Dict[Path, Tuple[int, ...]]

# MobileNetV2 width multipliers tried when the last block's channels
# (320 x widen_factor, rounded to a multiple of 8) leave a choice.
KNOWN_WIDTHS = (0.25, 0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
# The keys that change parameter shapes (dtype does not).
SHAPE_KEYS = ('widen_factor', 'num_deconv_filters', 'num_joints')
_LAST_BLOCK = ('params', 'backbone', 'layer7_0', 'conv_2', 'conv', 'kernel')


def model_shapes(model_config: Mapping[str, Any],
                 backbone_only: bool = False) -> Shapes:
  """Leaf shapes of AEModel(**model_config) (jax.eval_shape, cached)."""
  key = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                     for k, v in model_config.items() if k in SHAPE_KEYS))
  shapes = _model_shapes(key)
  if backbone_only:
    return {p: s for p, s in shapes.items() if p[1] == 'backbone'}
  return dict(shapes)


@functools.lru_cache(maxsize=16)
def _model_shapes(config_key) -> Shapes:
  model = ae_model.AEModel(**dict(config_key))
  tree = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  return shapes_of(tree)


def shapes_of(tree: Any) -> Shapes:
  """{leaf address: shape} of a nested dict of arrays / shape structs /
  orbax array metadata (anything with a .shape, or np.shape of it)."""
  return {tuple(str(getattr(k, 'key', k)) for k in path):
          tuple(int(d) for d in (getattr(leaf, 'shape', None)
                                 or np.shape(leaf)))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def implied_config(shapes: Shapes) -> Dict[str, Any]:
  """The widen_factor / num_deconv_filters / num_joints of variables of
  these shapes; a key is absent where its arrays are.

  Width: the candidate (the last block's channels / 320, then
  KNOWN_WIDTHS) whose backbone shapes all match; if none does, the ratio.
  Head: the deconv kernels' widths and final_layer's 2K outputs.
  """
  config: Dict[str, Any] = {}
  head = {p[2:]: s for p, s in shapes.items()
          if p[:2] == ('params', 'keypoint_head')}
  deconvs = sorted((int(p[0].rsplit('_', 1)[1]), s[-1]) for p, s in
                   head.items() if p[0].startswith('deconv_layers_')
                   and p[-1] == 'kernel')
  if deconvs:
    config['num_deconv_filters'] = tuple(w for _, w in deconvs)
  final = head.get(('final_layer', 'kernel'), head.get(('final_layer',
                                                        'bias')))
  if final:
    config['num_joints'] = final[-1] // 2
  last = shapes.get(_LAST_BLOCK)
  if last:
    backbone = {p: s for p, s in shapes.items() if p[1:2] == ('backbone',)
                and p[0] in ('params', 'batch_stats')}
    ratio = round(last[-1] / 320, 4)
    config['widen_factor'] = ratio
    for width in dict.fromkeys((ratio,) + KNOWN_WIDTHS):
      if model_shapes({'widen_factor': width}, True) == backbone:
        config['widen_factor'] = width
        break
  return config


def differing(have: Shapes, want: Shapes, under: Path = ()) -> List[Path]:
  """Leaf addresses (sorted) whose shape differs or that only one side has;
  with `under`, only those below that module path (in either collection)."""
  paths = set(have) | set(want)
  if under:
    paths = {p for p in paths if p[1:1 + len(under)] == tuple(under)}
  return sorted(p for p in paths if have.get(p) != want.get(p))


def mismatch(have: Shapes, want: Shapes) -> Optional[str]:
  """None if the shapes agree, else one line: the first differing array,
  how many differ, and the config.model values `have` implies where they
  differ from what `want` implies, e.g. 'params/backbone/... is (8,)
  there, (16,) here (268 arrays differ); the checkpoint implies
  config.model.widen_factor=0.25'."""
  diff = differing(have, want)
  if not diff:
    return None
  first = diff[0]
  return (f'{"/".join(first)} is {have.get(first, "missing")} there, '
          f'{want.get(first, "missing")} here ({len(diff)} arrays differ)'
          + implied_hint(implied_config(have), implied_config(want)))


def implied_hint(implied: Mapping[str, Any], config: Mapping[str, Any]
                 ) -> str:
  """'; the checkpoint implies config.model.k=v, ...' for the keys whose
  implied value differs from `config`'s (num_joints named by the keypoint
  spec, where K comes from), or ''."""
  parts = [describe_key(k, implied[k]) for k in
           ('widen_factor', 'num_deconv_filters', 'num_joints')
           if k in implied and k in config and
           _normal(config[k]) != _normal(implied[k])]
  return f'; the checkpoint implies {", ".join(parts)}' if parts else ''


def describe_key(key: str, value: Any) -> str:
  """How a user sets `key`: config.model.k=v, or K joints for num_joints."""
  if key == 'num_joints':
    return f'{value} joints (config.data.keypoints)'
  return f'config.model.{key}={_normal(value)!r}'


def _normal(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value

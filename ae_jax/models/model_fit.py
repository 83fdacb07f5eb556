"""Whether checkpoint variables fit a config.model, and what they imply.

A checkpoint of another width or head is named by the config.model values
to set (`widen_factor`, `num_deconv_filters`), not only by the first of a
few hundred differing array shapes.
"""

from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

Shapes = Dict[Tuple[str, ...], Tuple[int, ...]]


def mismatch(variables: Dict[str, Any], model_kwargs: Dict[str, Any]
             ) -> Optional[str]:
  """None if `variables` have AEModel(**model_kwargs)'s shapes, else why.

  The reason names the first differing array, the count, and the
  config.model values the variables imply where the config differs.
  """
  from ae_jax import convert  # pylint: disable=g-import-not-at-top
  want = convert.expected_shapes(model_kwargs)
  have = shapes_by_name(
      dict(jax.tree_util.tree_flatten_with_path(variables)[0]))
  diff = [p for p in sorted(set(want) | set(have))
          if want.get(p) != have.get(p)]
  if not diff:
    return None
  config_model = {k: tuple(v) if isinstance(v, (list, tuple)) else v
                  for k, v in model_kwargs.items()}
  return (f'{"/".join(diff[0])} is {have.get(diff[0], "missing")} there, '
          f'{want.get(diff[0], "missing")} here ({len(diff)} arrays '
          f'differ)' + _hint(implied_model(have), config_model))


def implied_hint(flat_saved: Dict[Any, Any], flat_target: Dict[Any, Any]
                 ) -> str:
  """'; the checkpoint implies config.model.k=v, ...' for a saved and a
  wanted flattened state (path -> leaf with .shape), or ''."""
  return _hint(implied_model(shapes_by_name(flat_saved)),
               implied_model(shapes_by_name(flat_target)))


def implied_model(shapes: Shapes) -> Dict[str, Any]:
  """The AEModel widen_factor / num_deconv_filters of variables of these
  shapes (width: the last block's 320 x widen_factor channels; head: the
  deconv kernels' widths)."""
  implied = {}
  last = shapes.get(('params', 'backbone', 'layer7_0', 'conv_2', 'conv',
                     'kernel'))
  if last:
    implied['widen_factor'] = round(last[-1] / 320, 4)
  deconvs = sorted((int(p[2].rsplit('_', 1)[1]), shape[-1])
                   for p, shape in shapes.items()
                   if p[1:2] == ('keypoint_head',) and p[-1] == 'kernel'
                   and p[2].startswith('deconv_layers_'))
  if deconvs:
    implied['num_deconv_filters'] = tuple(w for _, w in deconvs)
  return implied


def shapes_by_name(flat: Dict[Any, Any]) -> Shapes:
  """{(key, ...): shape} of a flattened tree (path -> array or metadata)."""
  return {tuple(str(getattr(k, 'key', k)) for k in path):
          tuple(getattr(leaf, 'shape', None) or np.shape(leaf))
          for path, leaf in flat.items()}


def _hint(implied: Dict[str, Any], config_model: Dict[str, Any]) -> str:
  hint = ', '.join(f'config.model.{k}={v!r}' for k, v in implied.items()
                   if k in config_model and config_model[k] != v)
  return f'; the checkpoint implies {hint}' if hint else ''

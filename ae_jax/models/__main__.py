r"""Prints the parameter count of AEModel (and of the PyTorch reference).

  python -m ae_jax.models [--widen_factor=1.0] \
      [--num_deconv_filters=256,256,256] [--num_joints=17]

The PyTorch count comes from tests/torch_reference.py (an independent
implementation with mmpose's layout); it is printed when torch is installed
and the command runs from the repository root. BN running statistics are not
parameters in either count. The paper model has 9,574,178.
"""

import argparse
import sys


def count_flax_params(widen_factor: float, num_deconv_filters, num_joints):
  """Scalars in AEModel's 'params' (shapes only, nothing is computed)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top

  model = ae_model.AEModel(num_joints=num_joints, widen_factor=widen_factor,
                           num_deconv_filters=tuple(num_deconv_filters))
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  return ae_model.count_params(variables['params'])


def count_torch_params(widen_factor: float, num_deconv_filters, num_joints):
  """Parameters of the PyTorch reference, or None without torch/tests."""
  try:
    from tests import torch_reference  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  model = torch_reference.AETorchModel(widen_factor, num_deconv_filters,
                                       num_joints)
  return torch_reference.count_parameters(model)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ae_jax.models',
      description='Parameter count of AEModel and its PyTorch reference.')
  parser.add_argument('--widen_factor', type=float, default=1.0)
  parser.add_argument('--num_deconv_filters', default='256,256,256',
                      help='comma-separated head widths')
  parser.add_argument('--num_joints', type=int, default=17)
  args = parser.parse_args(argv)
  filters = tuple(int(f) for f in args.num_deconv_filters.split(','))
  spec = (args.widen_factor, filters, args.num_joints)
  flax_count = count_flax_params(*spec)
  print(f'AEModel(widen_factor={args.widen_factor}, '
        f'num_deconv_filters={filters}, num_joints={args.num_joints})')
  print(f'  flax parameters:  {flax_count:,}')
  torch_count = count_torch_params(*spec)
  if torch_count is None:
    print('  torch reference:  not available (needs torch; run from the '
          'repository root)')
    return 0
  verdict = 'equal' if torch_count == flax_count else 'DIFFERENT'
  print(f'  torch parameters: {torch_count:,} ({verdict})')
  return 0 if torch_count == flax_count else 1


if __name__ == '__main__':
  sys.exit(main())

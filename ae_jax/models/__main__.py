r"""Prints the parameter count of AEModel.

  python -m ae_jax.models [--widen_factor=1.0] \
      [--num_deconv_filters=256,256,256] [--num_joints=17]

Shapes only (jax.eval_shape), nothing is computed. BN running statistics
are not parameters. The paper model has 9,574,178; tests/test_convert.py
checks the counts equal those of an independent PyTorch implementation
with mmpose's layout.
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m ae_jax.models',
      description='Parameter count of AEModel.')
  parser.add_argument('--widen_factor', type=float, default=1.0)
  parser.add_argument('--num_deconv_filters', default='256,256,256',
                      help='comma-separated head widths')
  parser.add_argument('--num_joints', type=int, default=17)
  args = parser.parse_args(argv)
  try:
    filters = tuple(int(f) for f in args.num_deconv_filters.split(','))
  except ValueError:
    parser.error('--num_deconv_filters: comma-separated integers, got '
                 f'{args.num_deconv_filters!r}')
  count = count_flax_params(args.widen_factor, filters, args.num_joints)
  print(f'AEModel(widen_factor={args.widen_factor}, '
        f'num_deconv_filters={filters}, num_joints={args.num_joints})')
  print(f'  parameters: {count:,}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""train/program.py: the abstract inputs equal what train.py really feeds;
the compiled step's memory line (the loop asks for it once:
tests/test_train_lib.py); the TPU config's choices.

ae_jax.aot.compiler compiles `program.step_fn` on ShapeDtypeStructs; they
must be the shapes, dtypes and shardings of the live state and of the
input pipeline's batches, or the check would compile another program.
"""

import jax
import numpy as np

from ae_jax import sharding
from ae_jax.train import loop
from ae_jax.train import program as train_program
from ae_jax.train import state as train_state
from configs import tiny


def _avals(tree):
  return jax.tree_util.tree_map(
      lambda x: (tuple(x.shape), np.dtype(x.dtype), x.sharding), tree)


def test_abstract_state_is_the_state_the_loop_builds():
  config = tiny.get_config()
  config.optim.shard_opt_state = True  # moments split over 'data'
  mesh = sharding.make_mesh()
  rng = jax.random.key(0)
  program = train_program.make_train_program(
      config, mesh, num_joints=17, epoch_steps=10, kernels='cpu',
      init_rng=rng)
  state = train_state.init_on_mesh(program.init_fn, rng,
                                   program.state_shardings)
  # The loop runs (and restores) a strong int32 step.
  state = state.replace(step=sharding.put_replicated(np.int32(0), mesh))
  assert _avals(program.abstract_state) == _avals(state)
  assert not program.abstract_state.step.weak_type


def test_batch_shapes_are_the_pipeline_batches(coco_mini_root):
  config = tiny.get_config()
  config.data.coco_root = str(coco_mini_root)
  batches = iter(loop.make_dataset(config, 0))
  try:
    batch = next(batches)
  finally:
    batches.close()  # stops the input worker
  want = train_program.batch_shapes(config, 17,
                                    config.train.global_batch_size)
  assert set(batch) == set(want)
  for name, (shape, dtype) in want.items():
    assert batch[name].shape == shape and batch[name].dtype == dtype, name


def test_abstract_step_args_shard_the_batch_and_replicate_the_rng():
  config = tiny.get_config()
  mesh = sharding.make_mesh()
  program = train_program.make_train_program(
      config, mesh, num_joints=17, epoch_steps=10, kernels='cpu',
      init_rng=jax.random.key(0))
  state, batch, rng = train_program.abstract_step_args(
      program, config, 17, mesh, 16)
  assert state is program.abstract_state
  assert batch['image'].shape == (16, 128, 128, 3)
  assert batch['image'].sharding == sharding.batch_sharding(mesh)
  assert rng.sharding == sharding.replicated(mesh)
  assert jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)


def test_step_memory_against_a_reported_capacity():
  compiled = jax.jit(lambda x: x * 2).lower(np.ones(1024, np.float32)).compile()

  class Device:
    platform, device_kind = 'tpu', 'TPU v5 lite'

    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      return self.stats

  line = train_program.log_step_memory(compiled,
                                       Device({'bytes_limit': 2**34}))
  assert line.startswith('Compiled train step: ')
  assert 'GiB (arguments' in line and 'temporaries' in line
  assert line.endswith('of 16.00 GiB on TPU v5 lite (0%).')
  line = train_program.log_step_memory(compiled, Device(None))
  assert 'TPU v5 lite does not report its capacity' in line


def test_tpu_config_differs_from_the_paper_config_in_its_tpu_choices():
  from configs import coco512, coco512_tpu  # pylint: disable=g-import-not-at-top
  paper = coco512.get_config().to_dict()
  tpu = coco512_tpu.get_config().to_dict()
  changed = {(group, key) for group in paper for key in (
      paper[group] if isinstance(paper[group], dict) else [None])
             if (paper[group][key] if key else paper[group]) !=
             (tpu[group][key] if key else tpu[group])}
  assert changed == {('model', 'dtype'), ('train', 'global_batch_size'),
                     ('train', 'bn_stats'), ('optim', 'scale_lr')}
  assert tpu['train']['global_batch_size'] % 128 == 0

"""Tiny model and inputs for tests and CI (seconds per step on a CPU).

Run:
  python train.py --config configs/tiny.py --workdir /tmp/ae_tiny
"""

from configs import default


def get_config():
  """A narrow backbone and small inputs; same code paths as the full model."""
  config = default.get_config()
  config.model.widen_factor = 0.25
  config.model.num_deconv_filters = (32, 32, 32)
  config.data.coco_root = 'data/coco_mini'
  config.data.train_split = 'val2017'  # the mini COCO ships val2017 only
  config.data.input_size = 128
  config.data.heatmap_size = 32
  config.data.workers = 1  # one input process (2-core CI machines)
  config.train.global_batch_size = 8
  config.train.num_steps = 2
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 1
  config.optim.warmup_steps = 1
  config.test.input_size = 128
  return config

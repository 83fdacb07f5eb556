"""Overfit the bundled mini COCO (4 val2017 images): the README demo.

Run (2 CPU cores, a few minutes):
  python train.py --config configs/coco_mini.py --workdir /tmp/ae_mini
  python eval.py --config configs/coco_mini.py --ckpt /tmp/ae_mini \
      --coco_root data/coco_mini

Train = val (val2017 is the only split shipped). Smaller input (256, maps
64) and no augmentation so the full-width model memorises the 4 images;
the lr is higher than mmpose's and there is no decay.
"""

from configs import default


def get_config():
  """Full model at 256 px, batch 4, no augmentation, a few hundred steps."""
  config = default.get_config()
  config.data.coco_root = 'data/coco_mini'
  config.data.train_split = 'val2017'
  config.data.val_split = 'val2017'
  config.data.input_size = 256
  config.data.heatmap_size = 64
  config.data.augment = False  # memorise: no affine jitter, no flip
  config.data.shuffle_buffer = 4
  config.train.global_batch_size = 4  # one epoch = one step
  config.train.num_steps = 300
  config.train.log_every_steps = 10
  config.train.checkpoint_every_steps = 100
  config.optim.lr = 2e-3
  config.optim.warmup_steps = 20
  config.optim.decay_epochs = (100000,)  # no decay within the run
  config.test.input_size = 256
  return config

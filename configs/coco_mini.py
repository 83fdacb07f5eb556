"""Overfit the bundled mini COCO (4 val2017 images): the README demo.

Run (2 CPU cores, a few minutes):
  python train.py --config configs/coco_mini.py --workdir /tmp/ae_mini
  python eval.py --config configs/coco_mini.py --ckpt /tmp/ae_mini \
      --coco_root data/coco_mini

Train = val (val2017 is the only split shipped). Smaller input (256, maps
64), no augmentation so the full-width model memorises the 4 images; lr
higher than mmpose's, no decay. First version: 200 steps (~1.4 s/step on
2 cores, ~5 min) reach loss ~2e-6 and AP 0.31 at test.input_size 256.
Known limit: with augment=False and scale_type 'short' the training view
is the central square crop, so people outside it are never trained on.
(Tried: translation-only augmentation, AP 0.004 after 200 steps; 'long'
with test.input_size 192, AP 0.0 - the padded square does not match the
un-padded test view.)
"""

from configs import default


def get_config():
  """Full model at 256 px, batch 4, no augmentation, 200 steps."""
  config = default.get_config()
  config.data.coco_root = 'data/coco_mini'
  config.data.train_split = 'val2017'
  config.data.val_split = 'val2017'
  config.data.input_size = 256
  config.data.heatmap_size = 64
  config.data.augment = False  # memorise: no affine jitter, no flip
  config.data.shuffle_buffer = 4
  config.train.global_batch_size = 4  # one epoch = one step
  config.train.num_steps = 200
  config.train.log_every_steps = 10
  config.train.checkpoint_every_steps = 100
  config.optim.lr = 2e-3
  config.optim.warmup_steps = 20
  config.optim.decay_epochs = (100000,)  # no decay within the run
  config.test.input_size = 256
  return config

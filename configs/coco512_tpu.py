r"""COCO 512x512 on a TPU slice: bfloat16, 128 images per chip, per-chip BN.

Run (global batch = 128 x chips; here a 4-chip v5e, v4-8 or v6e 2x2):
  python train.py --config configs/coco512_tpu.py --workdir gs://bucket/ae \
      --config.data.coco_root=/data/coco --distributed
  # 16 chips (v5e:4x4, v4-32): --config.train.global_batch_size=2048
Check it first on any CPU machine (pip install -e '.[tpu]'):
  python train.py --config configs/coco512_tpu.py --workdir W \
      --aot_topology=v5e:4x4 --config.train.global_batch_size=2048

Why (the TPU compiler's own counts for this step, bench/RESULTS.md
"Compiled for TPU", libtpu 0.0.42.1): the step is bound by HBM bytes, not
FLOPs (19-56 FLOP per byte against a v5e's 241), so bytes per image decide
its speed.
  - model.dtype bfloat16: half the bytes of float32 (1.33 vs 2.60 GB per
    image at 48 per chip) and 57% of the memory; parameters, BatchNorm
    statistics, losses, the optimizer and the maps the grouping reads stay
    float32 (README "dtypes").
  - 128 images per chip: XLA:TPU stores the narrow early activations
    (16-32 channels at 256x256) with the batch as the 128-lane minor
    dimension, so a per-chip batch below 128 pads them: 1.33 GB per image
    at 48, 1.22 at 64, 0.92 at 128 (bfloat16, v5e), and the roofline from
    615 to 889 img/s per v5e chip. 13.6 of 16 GiB on a v5e (the smallest
    HBM), so every generation takes it.
  - train.bn_stats per_device: statistics over each chip's 128 images
    (mmpose uses 24 per GPU), the same for any slice size at this per-chip
    batch, and 2 all-reduces per step instead of 111 (same bytes, far fewer
    latency-bound collectives on large slices).
  - optim.scale_lr: the lr scales with global_batch_size / 192 (mmpose's
    linear rule), as the global batch here is 128 x chips, not 192.
The paper setup (global batch 192, float32, global statistics) stays
configs/coco512.py; the parity tests run it.
"""

from configs import default


def get_config():
  """default.py with the TPU choices above."""
  config = default.get_config()
  config.model.dtype = 'bfloat16'
  config.train.global_batch_size = 512  # 128 per chip on 4 chips
  config.train.bn_stats = 'per_device'
  config.optim.scale_lr = True  # lr x global_batch_size / 192
  return config

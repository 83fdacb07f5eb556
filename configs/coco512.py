"""COCO 2017 at 512x512, the published mmpose setup (= default.py).

Run:
  python train.py --config configs/coco512.py --workdir /tmp/ae_coco512 \
      --config.data.coco_root=/data/coco
  python eval.py --config configs/coco512.py --ckpt /tmp/ae_coco512 \
      --coco_root /data/coco --output results.json
"""

from configs import default


def get_config():
  return default.get_config()

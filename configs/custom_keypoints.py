"""Your own COCO-format keypoint set: names and skeleton from its file.

Run:
  python train.py --config configs/custom_keypoints.py --workdir /tmp/ae_own \
      --config.data.coco_root=/data/own
  python eval.py --config configs/custom_keypoints.py --ckpt /tmp/ae_own \
      --coco_root /data/own --split val2017
  python demo.py --config configs/custom_keypoints.py --ckpt /tmp/ae_own \
      IMAGE.jpg --out /tmp/own_demo  # keypoints from the checkpoint

coco_root holds annotations/person_keypoints_{train2017,val2017}.json and
train2017/ + val2017/ (other names: config.data.{train,val}_annotations and
_images, relative to coco_root). The person category's `keypoints` list
names the K joints and its `skeleton` (1-based) the limbs drawn; flip
pairs come from left_/right_ names (else set
config.data.keypoints.flip_pairs, 0-based), OKS sigmas are COCO's for COCO
joint names and keypoints.DEFAULT_SIGMA for others (or set
config.data.keypoints.sigmas, K values). The model's K follows.
"""

from configs import default


def get_config():
  """default.py with keypoints read from the train annotation file."""
  config = default.get_config()
  config.data.keypoints.source = 'annotations'
  return config

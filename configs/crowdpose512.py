"""CrowdPose (14 joints) at 512x512, mmpose 0.x's bottom-up CrowdPose setup.

Run:
  python train.py --config configs/crowdpose512.py --workdir /tmp/ae_crowd \
      --config.data.coco_root=/data/crowdpose
  python eval.py --config configs/crowdpose512.py --ckpt /tmp/ae_crowd \
      --coco_root /data/crowdpose --split test

coco_root as mmpose's data/crowdpose: annotations/mmpose_crowdpose_
{split}.json (mmpose's file names: train, val, trainval, test) and images/
(all splits in one folder); mmpose trains on trainval and tests on test.
Names, flip pairs and OKS sigmas are mmpose's crowdpose dataset_info
(keypoints.CROWDPOSE). Scoring here is pycocotools COCOeval with those
sigmas and the annotations' `area` (bbox w * h where absent); mmpose uses
xtcocotools' 'keypoints_crowd' (bbox areas, easy/medium/hard breakdown),
so its numbers may differ slightly.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.keypoints.source = 'crowdpose'
  # mmpose 0.x: ann_file mmpose_crowdpose_trainval.json for training and
  # mmpose_crowdpose_test.json for val/test, img_prefix images/.
  config.data.train_split = 'trainval'
  config.data.val_split = 'test'
  config.data.train_annotations = 'annotations/mmpose_crowdpose_{split}.json'
  config.data.train_images = 'images'
  config.data.val_annotations = 'annotations/mmpose_crowdpose_{split}.json'
  config.data.val_images = 'images'
  return config

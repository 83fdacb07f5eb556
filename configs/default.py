"""Default (paper) setup: mmpose mobilenetv2_coco_512x512, AE, COCO 2017.

Run:
  python train.py --config configs/default.py --workdir /tmp/ae_coco \
      --config.data.coco_root=/data/coco

Every key mirrors an mmpose 0.x config value unless noted; the mmpose key
is given in the comment.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the full COCO training/eval configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ae_model.create_model(config.model, kernels): the layer kernels are not a
  # config key; the entry point picks them for its backend
  # (ae_model.default_kernels: 'cpu' on CPU, plain 'flax' on GPU / TPU).
  # The joint count is not a model key: it comes from config.data.keypoints
  # (ae_jax.data.coco.resolve_spec), passed as create_model's num_joints.
  config.model = ml_collections.ConfigDict()
  config.model.widen_factor = 1.0  # backbone.widen_factor
  config.model.num_deconv_filters = (256, 256, 256)  # AESimpleHead default
  config.model.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16'

  config.data = ml_collections.ConfigDict()
  config.data.coco_root = 'data/coco'  # annotations/ + train2017/ + val2017/
  config.data.source = 'json'  # 'json' (pycocotools) or 'tfds' (local builder)
  config.data.tfds_data_dir = ''  # TFDS data_dir when source == 'tfds'
  config.data.train_split = 'train2017'
  config.data.val_split = 'val2017'
  # Other file names than annotations/person_keypoints_{split}.json and
  # {split}/ (paths relative to coco_root; '' = the standard ones).
  config.data.train_annotations = ''
  config.data.train_images = ''
  config.data.val_annotations = ''
  config.data.val_images = ''
  # The keypoint set (ae_jax/keypoints.py): 'coco' / 'crowdpose' built in,
  # or 'annotations' = names and skeleton from the person category of the
  # train annotation file. Empty keys take the default: flip_pairs
  # (0-based) from left_/right_ names, skeleton (1-based, as COCO) from the
  # file, sigmas COCO's per joint name else keypoints.DEFAULT_SIGMA.
  config.data.keypoints = ml_collections.ConfigDict()
  config.data.keypoints.source = 'coco'
  config.data.keypoints.flip_pairs = ()
  config.data.keypoints.skeleton = ()
  config.data.keypoints.sigmas = ()
  # int S (square, the paper setup) or (w, h) as mmpose's [w, h] lists.
  config.data.input_size = 512  # data_cfg.image_size
  # data_cfg.heatmap_size: input_size / 4 (the model's stride; checked).
  config.data.heatmap_size = 128
  config.data.sigma = 2.0  # BottomUpGenerateTarget sigma
  config.data.max_people = 30  # max_num_people
  config.data.rot_factor = 30.0  # BottomUpRandomAffine rot_factor (degrees)
  config.data.scale_factor = (0.75, 1.5)  # BottomUpRandomAffine scale_factor
  config.data.scale_type = 'short'  # BottomUpRandomAffine scale_type
  config.data.trans_factor = 40.0  # BottomUpRandomAffine trans_factor (px)
  config.data.flip_prob = 0.5  # BottomUpRandomFlip flip_prob
  config.data.augment = True  # False: no affine jitter or flip (overfit runs)
  # Input worker processes per training process (each makes whole host
  # batches; 0 = in the training process; -1 = the usable CPUs - 1, at
  # most 64). README "Input workers" says how many for a TPU host or a
  # GPU node (one process per GPU: set it).
  config.data.workers = -1

  # Loss factors: MultiLossFactory heatmaps_loss_factor, push/pull_loss_factor.
  config.loss = ml_collections.ConfigDict()
  config.loss.heatmap_factor = 1.0
  config.loss.push_factor = 0.001
  config.loss.pull_factor = 0.001

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1.5e-3  # optimizer.lr (Adam), for base_batch_size
  config.optim.base_batch_size = 192  # 24 per GPU x 8 GPUs in mmpose
  config.optim.scale_lr = False  # True: lr * global_batch / base_batch_size
  config.optim.warmup_steps = 500  # lr_config.warmup_iters
  config.optim.warmup_ratio = 0.001  # lr_config.warmup_ratio
  config.optim.decay_epochs = (200, 260)  # lr_config.step
  config.optim.decay_factor = 0.1  # mmcv step policy gamma
  config.optim.shard_opt_state = False  # shard Adam moments over 'data'

  config.train = ml_collections.ConfigDict()
  config.train.global_batch_size = 192  # samples_per_gpu 24 x 8 GPUs
  config.train.num_epochs = 300  # total_epochs
  # Unset (None): num_epochs epochs; an int >= 1 overrides it (short runs).
  config.train.num_steps = config_dict.placeholder(int)
  config.train.init_checkpoint = ''  # converted weights: full model (fine-tune) or ImageNet backbone
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 1000
  config.train.keep_checkpoints = 3
  config.train.eval_at_end = True
  # BatchNorm statistics: 'global' (over the global batch; 1 device == N
  # devices) or 'per_device' (mmpose's DDP: each device's own examples,
  # far fewer all-reduces; train_step.py, README "Scale").
  config.train.bn_stats = 'global'

  # test_cfg of the mmpose config: predict.PredictOptions(**config.test).
  config.test = ml_collections.ConfigDict()
  config.test.input_size = 512  # data_cfg.image_size (short side at scale 1)
  config.test.scales = (1.0,)  # test_scale_factor; paper multi: (2, 1, 0.5)
  config.test.flip = True  # flip_test
  config.test.project2image = True
  # HeatmapParser keys: decode.GroupingParams(**config.test.grouping).
  config.test.grouping = ml_collections.ConfigDict()
  config.test.grouping.nms_kernel = 5
  config.test.grouping.max_people = 30  # max_num_people (top-k per joint)
  config.test.grouping.detection_threshold = 0.1
  config.test.grouping.tag_threshold = 1.0
  config.test.grouping.use_detection_val = True
  config.test.grouping.ignore_too_much = False
  config.test.grouping.adjust = True
  config.test.grouping.refine = True
  return config

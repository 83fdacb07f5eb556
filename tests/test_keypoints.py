"""Keypoint specs: COCO / CrowdPose metadata and own keypoint sets.

The own set is made here from the mini COCO: 5 of COCO's joints, renamed
(so no COCO sigma applies), with their own skeleton. It trains 2 steps,
scores AP 1.0 with ground truth as predictions under its own sigmas, and
its skeleton is drawn.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import cocoeval

from ae_jax import keypoints
from ae_jax.data import coco
from ae_jax.infer import coco_eval
from ae_jax.infer import decode
from ae_jax.infer import draw
from ae_jax.models import shapes
from ae_jax.train import checkpoints
from ae_jax.train import variables_checkpoint
from ae_jax.train import inference_checkpoint
from tests.conftest import REPO_ROOT
from tests.conftest import small_config
from tests.references import host_grouping

# COCO joints kept (nose, shoulders, hips) and their new names.
_KEEP = (0, 5, 6, 11, 12)
_NAMES = ('head', 'left_arm', 'right_arm', 'left_leg', 'right_leg')
_SKELETON_1 = [[1, 2], [1, 3], [2, 4], [3, 5], [4, 5]]  # 1-based, as COCO


def _subset_dataset(dataset, keep, names, skeleton):
  """A COCO dataset dict with only the `keep` joints, renamed."""
  out = json.loads(json.dumps(dataset))
  for cat in out['categories']:
    cat['keypoints'], cat['skeleton'] = list(names), skeleton
  for ann in out['annotations']:
    kp = np.asarray(ann['keypoints'], np.float64).reshape(-1, 3)[list(keep)]
    ann['keypoints'] = kp.reshape(-1).tolist()
    ann['num_keypoints'] = int((kp[:, 2] > 0).sum())
  return out


def _write_root(root, coco_mini_root, dataset, ann_names, image_dir_names):
  os.makedirs(root / 'annotations', exist_ok=True)
  for name in ann_names:
    (root / 'annotations' / name).write_text(json.dumps(dataset))
  for name in image_dir_names:
    os.symlink(coco_mini_root / 'val2017', root / name)
  return root


def _mini_dataset(coco_mini_root):
  path = coco_mini_root / 'annotations' / 'person_keypoints_val2017.json'
  return json.loads(path.read_text())


@pytest.fixture(scope='module')
def own_root(coco_mini_root, tmp_path_factory):
  dataset = _subset_dataset(_mini_dataset(coco_mini_root), _KEEP, _NAMES,
                            _SKELETON_1)
  return _write_root(tmp_path_factory.mktemp('own'), coco_mini_root, dataset,
                     ['person_keypoints_train2017.json',
                      'person_keypoints_val2017.json'],
                     ['train2017', 'val2017'])


def _own_config(root):
  from configs import custom_keypoints  # pylint: disable=g-import-not-at-top
  config = custom_keypoints.get_config()
  small = small_config(num_steps=2)
  for group in ('model', 'train', 'optim'):
    config[group] = small[group]
  for key in ('input_size', 'heatmap_size', 'augment'):
    config.data[key] = small.data[key]
  config.test.input_size = 64
  config.test.flip = True
  config.data.coco_root = str(root)
  return config


def test_coco_spec_is_pycocotools_and_mmpose():
  params = cocoeval.Params(iouType='keypoints')
  np.testing.assert_allclose(keypoints.COCO.sigmas, params.kpt_oks_sigmas)
  assert keypoints.COCO.num_joints == 17
  # mmpose coco flip_pairs (1-based COCO order: eyes, ears, ... ankles).
  pairs = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14),
           (15, 16)]
  expected = list(range(17))
  for a, b in pairs:
    expected[a], expected[b] = b, a
  assert keypoints.COCO.flip_index == tuple(expected)
  np.testing.assert_array_equal(keypoints.FLIP_INDEX, expected)


def test_crowdpose_spec_is_mmpose():
  spec = keypoints.CROWDPOSE
  assert spec.num_joints == 14
  # mmpose crowdpose: flip_pairs [[0, 1], [2, 3], ..., [10, 11]];
  # top_head (12) and neck (13) map to themselves.
  assert spec.flip_index == (1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 12, 13)
  assert spec.sigmas[:12] == keypoints.COCO.sigmas[5:]
  assert spec.sigmas[12:] == (0.079, 0.079)


def test_spec_defaults_and_config_overrides(own_root):
  config = _own_config(own_root)
  spec = coco.resolve_spec(config.data)
  assert spec.names == _NAMES and spec.num_joints == 5
  assert spec.flip_index == (0, 2, 1, 4, 3)  # left_/right_ names
  assert spec.skeleton == tuple((a - 1, b - 1) for a, b in _SKELETON_1)
  assert spec.sigmas == (keypoints.DEFAULT_SIGMA,) * 5  # no COCO name
  config.data.keypoints.flip_pairs = ((3, 4),)
  config.data.keypoints.sigmas = (0.1, 0.2, 0.2, 0.3, 0.3)
  spec = coco.resolve_spec(config.data)
  assert spec.flip_index == (0, 1, 2, 4, 3)
  assert spec.sigmas == (0.1, 0.2, 0.2, 0.3, 0.3)
  # COCO names keep COCO's sigmas, unknown ones get the default.
  assert keypoints.default_sigmas(('nose', 'tail')) == (
      0.026, keypoints.DEFAULT_SIGMA)
  config.data.keypoints.sigmas = (0.1,)
  with pytest.raises(keypoints.KeypointSpecError, match='1 sigmas'):
    coco.resolve_spec(config.data)


def test_bad_specs_fail_in_one_line():
  with pytest.raises(keypoints.KeypointSpecError, match='pairing'):
    keypoints.KeypointSpec(('a', 'b'), (1, 1), (), (0.1, 0.1))
  with pytest.raises(keypoints.KeypointSpecError, match='outside'):
    keypoints.make_spec(('a', 'b'), skeleton=[(1, 3)],
                        one_based_skeleton=True)
  with pytest.raises(keypoints.KeypointSpecError, match='source'):
    coco.resolve_spec({'keypoints': {'source': 'horses'}})


@pytest.fixture(scope='module')
def own_run(own_root, tmp_path_factory):
  """2 training steps on the own set: (workdir, summary)."""
  from ae_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('own_run')
  summary = loop.train_and_evaluate(_own_config(own_root), str(workdir))
  return workdir, summary


def test_own_keypoints_train_two_steps(own_root, own_run, tmp_path):
  workdir, summary = own_run
  assert [h['step'] for h in summary['history']] == [1, 2]
  for h in summary['history']:
    assert np.isfinite([h['total_loss'], h['heatmap_loss'], h['push_loss'],
                        h['pull_loss'], h['lr']]).all()
  assert json.loads((workdir / 'summary.json').read_text())['history'] == (
      summary['history'])
  found = checkpoints.read_checkpoint(str(workdir))
  assert shapes.implied_config(shapes.shapes_of(found.tree))[
      'num_joints'] == 5
  # The checkpoint records the model and the keypoints it was trained on.
  assert found.record.spec == coco.resolve_spec(_own_config(own_root).data)
  assert found.record.model['num_joints'] == 5
  # Without that record (an older checkpoint), the config's keypoints must
  # have the head's joint count.
  unrecorded = tmp_path / 'unrecorded'
  variables_checkpoint.save_variables(unrecorded, found.tree)
  config = _own_config(own_root)
  assert inference_checkpoint.load_for_inference(
      str(unrecorded), config).spec.num_joints == 5
  config.data.keypoints.source = 'coco'
  with pytest.raises(keypoints.KeypointSpecError,
                     match='head predicts 5 joints.*have 17'):
    inference_checkpoint.load_for_inference(str(unrecorded), config)


def test_recorded_checkpoint_needs_no_config_and_refuses_contradictions(
    own_root, own_run, coco_mini_root, tmp_path):
  """eval/demo/export's loader: the recorded model and keypoints win over
  the config file; a flag that contradicts them, or an annotation file
  listing the joints in another order, is one error naming both."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()  # 1.0 wide, 256 filters, COCO keypoints
  loaded = inference_checkpoint.load_for_inference(str(own_run[0]), config)
  assert loaded.spec.names == _NAMES and loaded.recorded
  assert loaded.model_config['widen_factor'] == 0.25
  assert tuple(loaded.model_config['num_deconv_filters']) == (16, 16, 16)
  assert loaded.step == 2
  loaded = inference_checkpoint.load_for_inference(
      str(own_run[0]), config, {'model.dtype': 'bfloat16',
                                'model.widen_factor': 0.25})
  assert loaded.model_config['dtype'] == 'bfloat16'  # compute precision
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'--config.model.widen_factor=0.5 contradicts the '
                     r'checkpoint .*, made with widen_factor=0.25'):
    inference_checkpoint.load_for_inference(
        str(own_run[0]), config, {'model.widen_factor': 0.5})
  config = _own_config(own_root)
  config.data.keypoints.sigmas = (0.1,) * 5
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'--config.data.keypoints.sigmas contradicts the '
                     r'checkpoint .*: sigmas \(0.067, .*\) there, \(0.1, .*\) '
                     'here'):
    inference_checkpoint.load_for_inference(
        str(own_run[0]), config, {'data.keypoints.sigmas': (0.1,) * 5})
  # The val file of another root lists the same joints in another order.
  order = (0, 2, 1, 3, 4)
  dataset = _subset_dataset(_mini_dataset(coco_mini_root),
                            [_KEEP[i] for i in order],
                            [_NAMES[i] for i in order], _SKELETON_1)
  swapped = _write_root(tmp_path / 'swapped', coco_mini_root, dataset,
                        ['person_keypoints_val2017.json'], ['val2017'])
  with pytest.raises(keypoints.KeypointSpecError,
                     match=r"person_keypoints_val2017.json does not list the "
                     r"joints of the checkpoint .*: joint 1 is 'right_arm' "
                     r"there, 'left_arm' in the checkpoint"):
    inference_checkpoint.load_for_inference(
        str(own_run[0]), _own_config(own_root), coco_root=str(swapped),
        split='val2017')


def test_demo_draws_own_keypoints_without_their_annotations(own_run,
                                                            coco_mini_root,
                                                            tmp_path):
  """The own-keypoint checkpoint draws a photo with its recorded skeleton:
  no annotation file (coco_root unset), no --config.model overrides."""
  image = coco_mini_root / 'val2017' / '000000000785.jpg'
  proc = subprocess.run(
      [sys.executable, 'demo.py', '--config', 'configs/custom_keypoints.py',
       '--ckpt', str(own_run[0]), '--out', str(tmp_path / 'demo'),
       '--config.test.input_size=64', str(image)], cwd=REPO_ROOT,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  poses = json.loads((tmp_path / 'demo' / 'poses.json').read_text())
  assert all(len(p['keypoints']) == 5 for e in poses for p in e['people'])
  assert (tmp_path / 'demo' / '000000000785.png').exists()


def test_own_checkpoint_evaluates_and_draws(own_root, own_run, tmp_path):
  """The trained 5-joint model through eval and drawing (flip test on)."""
  from ae_jax.infer import predict  # pylint: disable=g-import-not-at-top
  from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top
  config = _own_config(own_root)
  spec = coco.resolve_spec(config.data, 'val')
  model = ae_model.create_model(
      {**config.model, 'num_joints': spec.num_joints}, 'cpu')
  predictor = predict.Predictor(
      model, checkpoints.restore_variables(str(own_run[0])),
      predict.PredictOptions(**config.test, flip_index=spec.flip_index))
  metrics, info = coco_eval.evaluate(predictor.stream, str(own_root),
                                     'val2017', sigmas=spec.sigmas,
                                     max_images=1)
  assert info['num_images'] == 1 and 0.0 <= metrics['AP'] <= 1.0
  image = str(own_root / 'val2017' / '000000000785.jpg')
  _, failed = draw.annotate_images(predictor.stream, [image], str(tmp_path),
                                   person_threshold=-1.0,
                                   skeleton=spec.skeleton)
  assert not failed
  with pytest.raises(ValueError, match='flip_index has 17 joints'):
    predict.Predictor(model, predictor.variables,
                      predict.PredictOptions(**config.test))


def test_eval_cli_refuses_other_joint_count(own_run):
  proc = subprocess.run(
      [sys.executable, 'eval.py', '--config', 'configs/tiny.py', '--ckpt',
       str(own_run[0])], cwd=REPO_ROOT, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'head predicts 5 joints' in last
  assert 'Traceback' not in proc.stderr


def _ground_truth_predictor(coco_api):
  """A predictor's stream giving each image's ground truth (score 1)."""
  by_size = {}
  for image_id, info in coco_api.imgs.items():
    anns = [a for a in coco_api.imgToAnns[image_id]
            if not a['iscrowd'] and a['num_keypoints'] > 0]
    poses = np.asarray([a['keypoints'] for a in anns], np.float32)
    poses = poses.reshape(len(anns), -1, 3)
    poses[..., 2] = 1.0
    by_size[(info['height'], info['width'])] = (
        host_grouping.poses_from_keypoints(poses, np.ones(len(anns))))

  def stream(items):
    for key, image in items:
      yield decode.Prediction(key, by_size[image.shape[:2]])
  return stream


def test_own_keypoints_ground_truth_scores_ap_one(own_root, tmp_path):
  spec = coco.resolve_spec(_own_config(own_root).data)
  gt = coco.load_coco(str(own_root), 'val2017', num_joints=5)
  sizes = {(i['height'], i['width']) for i in gt.imgs.values()}
  assert len(sizes) == len(gt.imgs)  # the predictor keys on the size
  metrics, info = coco_eval.evaluate(
      _ground_truth_predictor(gt), str(own_root), 'val2017',
      sigmas=spec.sigmas, output_path=str(tmp_path / 'r.json'))
  assert info['num_images'] == 4 and not info['skipped']
  assert metrics['AP'] == pytest.approx(1.0)
  assert metrics['AR'] == pytest.approx(1.0)
  results = json.loads((tmp_path / 'r.json').read_text())
  assert {len(r['keypoints']) for r in results} == {15}


def test_own_skeleton_is_drawn(own_root, tmp_path):
  spec = coco.resolve_spec(_own_config(own_root).data)
  canvas = np.zeros((100, 100, 3), np.uint8)
  # head, left/right arm, left/right leg as a little figure.
  pose = np.array([[[50, 10, 1], [30, 40, 1], [70, 40, 1], [40, 90, 1],
                    [60, 90, 1]]], np.float32)
  out = draw.draw_poses(canvas, host_grouping.poses_from_keypoints(
      pose, np.ones(1)),
                        skeleton=spec.skeleton)
  on_limb = [(50 + 30) // 2, (10 + 40) // 2]  # head - left_arm
  off_limb = [(30 + 70) // 2, 40]  # left_arm - right_arm: not a limb
  assert out[on_limb[1], on_limb[0]].any()
  assert not out[off_limb[1], off_limb[0]].any()
  gt = coco.load_coco(str(own_root), 'val2017', num_joints=5)
  paths = [str(own_root / 'val2017' / i['file_name'])
           for i in gt.imgs.values()][:1]
  _, failed = draw.annotate_images(_ground_truth_predictor(gt), paths,
                                   str(tmp_path), skeleton=spec.skeleton)
  assert not failed and len(os.listdir(tmp_path)) == 1


def test_coco_config_refuses_other_keypoints(own_root):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data.coco_root = str(own_root)
  spec = coco.resolve_spec(config.data)  # 'coco': 17 joints
  with pytest.raises(coco.AnnotationError,
                     match='person_keypoints_train2017.json.*5 joints.*17'):
    coco.load_coco_index(str(own_root), 'train2017',
                         num_joints=spec.num_joints)


def _crowdpose_dataset(coco_mini_root):
  """The mini COCO in CrowdPose's joint layout (14 joints)."""
  dataset = _mini_dataset(coco_mini_root)
  for ann in dataset['annotations']:
    kp = np.asarray(ann['keypoints'], np.float64).reshape(17, 3)
    neck = (kp[5] + kp[6]) / 2 if kp[5, 2] and kp[6, 2] else np.zeros(3)
    ann['keypoints'] = np.concatenate(
        [kp[5:], kp[:1], neck[None]]).reshape(-1).tolist()
    ann['num_keypoints'] = int((np.asarray(ann['keypoints'])[2::3] > 0).sum())
  for cat in dataset['categories']:
    cat['keypoints'] = list(keypoints.CROWDPOSE_NAMES)
    cat['skeleton'] = []
  return dataset


def test_crowdpose_format_loads_with_14_joints(coco_mini_root, tmp_path):
  from ae_jax.train import loop  # pylint: disable=g-import-not-at-top
  from configs import crowdpose512  # pylint: disable=g-import-not-at-top
  root = _write_root(tmp_path, coco_mini_root,
                     _crowdpose_dataset(coco_mini_root),
                     ['mmpose_crowdpose_trainval.json',
                      'mmpose_crowdpose_test.json'], ['images'])
  config = crowdpose512.get_config()
  config.data.coco_root = str(root)
  config.data.input_size, config.data.heatmap_size = 64, 16
  config.train.global_batch_size = 2
  spec = coco.resolve_spec(config.data)
  assert spec is keypoints.CROWDPOSE
  batches = iter(loop.make_dataset(config, 0, spec))
  try:
    batch = next(batches)
  finally:
    batches.close()  # stops the input worker
  assert batch['keypoints'].shape == (2, 30, 14, 3)
  assert (batch['keypoints'][..., 2] > 0).any()
  gt = coco.load_coco(str(root), 'test', config.data.val_annotations, 14)
  assert len(gt.imgs) == 4

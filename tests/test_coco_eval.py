"""COCO scoring: ground truth as predictions gives AP 1, json format, skips."""

import json
import shutil

import numpy as np
import pytest

from ae_jax.data import coco as coco_data
from ae_jax.infer import coco_eval
from ae_jax.infer import decode
from tests.references import host_grouping


def _gt_people(coco):
  """{image_id: decode.Poses} (scores 1) from labelled persons."""
  out = {}
  for image_id in sorted(coco.getImgIds()):
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
    poses = [np.array(a['keypoints'], np.float32).reshape(17, 3)
             for a in anns if a['num_keypoints'] > 0]
    poses = np.stack(poses) if poses else np.zeros((0, 17, 3), np.float32)
    out[image_id] = host_grouping.poses_from_keypoints(
        poses, np.ones(len(poses), np.float32))
  return out


def test_ground_truth_as_predictions_scores_one(coco_mini_root):
  coco = coco_data.load_coco(str(coco_mini_root), 'val2017')
  results = []
  for image_id, poses in _gt_people(coco).items():
    results += coco_eval.poses_to_results(image_id, poses)
  assert len(results) >= 4
  metrics = coco_eval.score_results(coco, results, verbose=False)
  for name in ('AP', 'AP50', 'AP75', 'AR', 'AR50'):
    assert metrics[name] == pytest.approx(1.0), name


def test_result_format_is_mmpose_json():
  poses = np.array([[[10, 20, 0.5]] * 16 + [[30, 5, 0.25]]], np.float32)
  (res,) = coco_eval.poses_to_results(
      785, host_grouping.poses_from_keypoints(poses, np.array([0.7])))
  assert res['image_id'] == 785 and res['category_id'] == 1
  assert len(res['keypoints']) == 51
  # The third value is the joint's heatmap score, not a visibility flag.
  assert res['keypoints'][2] == 0.5 and res['keypoints'][50] == 0.25
  assert res['score'] == pytest.approx(0.7)
  assert res['bbox'] == [10.0, 5.0, 20.0, 15.0]
  json.dumps(res)  # plain python types


def test_no_results_gives_zeros(coco_mini_root):
  coco = coco_data.load_coco(str(coco_mini_root), 'val2017')
  metrics = coco_eval.score_results(coco, [], verbose=False)
  assert set(metrics) == set(coco_eval.METRIC_NAMES)
  assert all(v == 0 for v in metrics.values())


def test_evaluate_reports_missing_image_by_name(coco_mini_root, tmp_path):
  root = tmp_path / 'coco'
  shutil.copytree(coco_mini_root, root)
  (root / 'val2017' / '000000040083.jpg').unlink()
  (root / 'val2017' / '000000196141.jpg').write_bytes(b'not a jpeg')
  (root / 'val2017' / '000000000785.jpg').write_bytes(b'')  # zero bytes
  coco = coco_data.load_coco(str(root), 'val2017')
  gt = _gt_people(coco)
  sizes = {(im['height'], im['width']): i for i, im in coco.imgs.items()}

  def stream(items):  # ground truth of the image with this size
    for key, image in items:
      yield decode.Prediction(key, gt[sizes[image.shape[:2]]])

  out = tmp_path / 'results.json'
  metrics, info = coco_eval.evaluate(stream, str(root), output_path=str(out))
  assert [name for name, _ in info['skipped']] == [
      '000000000785.jpg', '000000040083.jpg', '000000196141.jpg']
  assert 'cannot decode' in info['skipped'][0][1]
  assert '(0 bytes)' in info['skipped'][0][1]
  assert 'cannot read' in info['skipped'][1][1]
  assert 'cannot decode' in info['skipped'][2][1]
  assert info['num_images'] == 1
  assert 'bytes_to_host' not in info  # the predictions reported none
  written = json.loads(out.read_text())
  assert {r['image_id'] for r in written} <= {197388}
  # People of the skipped images count as missed.
  assert 0 < metrics['AR'] < 1

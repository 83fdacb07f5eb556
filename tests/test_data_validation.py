"""Bad data gets one line naming the file (and annotation id), up front.

Malformed annotation json, a keypoint list of the wrong length, a missing
coco_root, and image files whose size is not the annotation's: skipped by
name and counted, in training and in evaluation.
"""

import itertools
import json
import os
import shutil
import subprocess
import sys

import cv2
import pytest

from ae_jax.data import coco
from ae_jax.data import eval_input
from ae_jax.data import pipeline
from tests.conftest import REPO_ROOT

ANN = 'person_keypoints_val2017.json'


def _mini(coco_mini_root):
  return json.loads((coco_mini_root / 'annotations' / ANN).read_text())


def _root_with(tmp_path, coco_mini_root, text):
  """A COCO root with the mini images and `text` as its val annotations."""
  (tmp_path / 'annotations').mkdir()
  (tmp_path / 'annotations' / ANN).write_text(text)
  shutil.copytree(coco_mini_root / 'val2017', tmp_path / 'val2017')
  return tmp_path


def _one_line_error(exc_type, root, match):
  with pytest.raises(exc_type, match=match) as info:
    coco.load_coco_index(str(root), 'val2017', num_joints=17)
  message = str(info.value)
  assert '\n' not in message and ANN in message
  return message


@pytest.mark.parametrize('text, match', [
    ('{"images": [{"id": 1, ', 'not valid json'),  # truncated
    ('', 'not valid json'),  # empty
    ('[]', 'not a COCO annotation file'),
])
def test_malformed_json(coco_mini_root, tmp_path, text, match):
  root = _root_with(tmp_path, coco_mini_root, text)
  _one_line_error(coco.AnnotationError, root, match)


@pytest.mark.parametrize('where, key', [
    ('annotations', 'keypoints'), ('annotations', 'iscrowd'),
    ('annotations', 'num_keypoints'), ('images', 'height'),
    # pycocotools keeps the last of two annotations with one id but counts
    # it twice for its image (perfect predictions scored AP 0.921).
    ('annotations', 'id twice'), ('images', 'id twice')])
def test_missing_keys_and_repeated_ids_name_the_id(coco_mini_root, tmp_path,
                                                   where, key):
  dataset = _mini(coco_mini_root)
  item = dataset[where][1]
  if key == 'id twice':
    item['id'] = dataset[where][0]['id']
    problem = 'is listed twice'
  else:
    del item[key]
    problem = f'has no {key}'
  root = _root_with(tmp_path, coco_mini_root, json.dumps(dataset))
  kind = 'annotation' if where == 'annotations' else 'image'
  _one_line_error(coco.AnnotationError, root,
                  f'{kind} id {item["id"]} {problem}')


def test_wrong_keypoint_count_names_the_annotation(coco_mini_root, tmp_path):
  dataset = _mini(coco_mini_root)
  ann = dataset['annotations'][2]
  ann['keypoints'] = ann['keypoints'][:16 * 3]
  root = _root_with(tmp_path, coco_mini_root, json.dumps(dataset))
  _one_line_error(coco.AnnotationError, root,
                  f'annotation id {ann["id"]}: 48 keypoint values, its '
                  'category lists 17 keypoints')


def test_missing_coco_root_is_one_line(tmp_path):
  missing = str(tmp_path / 'nowhere')
  for load in (lambda: coco.load_coco_index(missing, 'train2017'),
               lambda: eval_input.EvalImages(missing, 'val2017'),
               lambda: coco.resolve_spec({
                   'coco_root': missing, 'train_split': 'train2017',
                   'keypoints': {'source': 'annotations'}})):
    with pytest.raises(FileNotFoundError,
                       match='COCO root not found: .*nowhere'):
      load()


def test_configured_paths(coco_mini_root, tmp_path):
  (tmp_path / 'labels').mkdir()
  shutil.copy(coco_mini_root / 'annotations' / ANN,
              tmp_path / 'labels' / 'mine_val.json')
  os.symlink(coco_mini_root / 'val2017', tmp_path / 'pictures')
  assert coco.split_paths(str(tmp_path), 'val', 'labels/mine_{split}.json',
                          'pictures') == (
                              str(tmp_path / 'labels' / 'mine_val.json'),
                              str(tmp_path / 'pictures'))
  index = coco.load_coco_index(str(tmp_path), 'val',
                               'labels/mine_{split}.json', 'pictures')
  standard = coco.load_coco_index(str(coco_mini_root), 'val2017')
  assert [e.image_id for e in index.examples] == [
      e.image_id for e in standard.examples]
  assert os.path.isfile(index.image_path(0))


def _resize_one(root, name, size=(10, 10)):
  path = root / 'val2017' / name
  image = cv2.imread(str(path))
  cv2.imwrite(str(path), cv2.resize(image, size))


def test_wrongly_sized_image_is_skipped_and_counted(coco_mini_root, tmp_path):
  root = _root_with(tmp_path, coco_mini_root,
                    (coco_mini_root / 'annotations' / ANN).read_text())
  index = coco.load_coco_index(str(root), 'val2017')
  bad = index.examples[0].file_name
  _resize_one(root, bad)
  ds = pipeline.make_train_dataset(
      str(root), 'val2017', input_size=64, heatmap_size=16, max_people=30,
      rot_factor=0.0, scale_factor=(1.0, 1.0), scale_type='short',
      trans_factor=0.0, flip_prob=0.0, augment=False, global_batch_size=2,
      seed=0, process_index=0, process_count=1, workers=0)
  batches = list(itertools.islice(iter(ds), 1))  # one epoch: 2 images
  assert ds.skips.files == {bad: coco.SIZE_MISMATCH}
  assert ds.skipped[coco.SIZE_MISMATCH] >= 1
  # The replacement's own annotations came along: people in both slots.
  assert (batches[0]['keypoints'][..., 2] > 0).any(axis=(1, 2)).all()
  images = eval_input.EvalImages(str(root), 'val2017')
  assert [e.file_name for e in images] and len(images.skipped) == 1
  name, reason = images.skipped[0]
  assert name == bad and reason.startswith(coco.SIZE_MISMATCH)
  assert '10x10 file' in reason


def test_train_cli_bad_annotations_one_line(coco_mini_root, tmp_path):
  dataset = _mini(coco_mini_root)
  del dataset['annotations'][0]['iscrowd']
  root = tmp_path / 'root'
  root.mkdir()
  _root_with(root, coco_mini_root, json.dumps(dataset))
  proc = subprocess.run(
      [sys.executable, 'train.py', '--config', 'configs/tiny.py',
       '--workdir', str(tmp_path / 'work'),
       f'--config.data.coco_root={root}'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and ANN in last
  assert f'annotation id {dataset["annotations"][0]["id"]} has no iscrowd' \
      in last
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.count('error: ') == 1


def test_crowd_only_split_is_one_line(coco_mini_root, tmp_path):
  dataset = _mini(coco_mini_root)
  for a in dataset['annotations']:
    a.update(iscrowd=1, num_keypoints=0, keypoints=[0] * 51)
  root = _root_with(tmp_path, coco_mini_root, json.dumps(dataset))
  _one_line_error(coco.AnnotationError, root,
                  r'no training image with people \(4 crowd_only; crowd '
                  'annotations and people without keypoints are masked')


def test_unreadable_images_are_found_when_the_index_loads(coco_mini_root,
                                                          tmp_path):
  """Every image a placeholder (zero bytes): one line at set-up, not a TF
  traceback from inside the input pipeline."""
  root = _root_with(tmp_path, coco_mini_root,
                    (coco_mini_root / 'annotations' / ANN).read_text())
  for f in (root / 'val2017').iterdir():
    f.write_bytes(b'')
  with pytest.raises(coco.ImageError) as info:
    coco.load_coco_index(str(root), 'val2017')
  assert str(info.value) == (
      f'4 of 4 images tried in {root / "val2017"} could not be read (cannot '
      'decode image 000000000785.jpg (0 bytes), ...); check '
      'config.data.coco_root and the image folder')
  shutil.copy(coco_mini_root / 'val2017' / '000000197388.jpg',
              root / 'val2017')  # one readable image is enough
  assert len(coco.load_coco_index(str(root), 'val2017')) == 4

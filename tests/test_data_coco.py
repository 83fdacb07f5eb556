"""COCO index: mmpose's image filtering, kept people and ignore masks."""

import json
import shutil

import numpy as np
import pytest

from ae_jax.data import coco
from tests.references import mmpose_pipeline


def test_mini_coco_index(coco_mini_root):
  index = coco.load_coco_index(str(coco_mini_root), 'val2017')
  data = json.loads((coco_mini_root / 'annotations' /
                     'person_keypoints_val2017.json').read_text())
  assert [e.image_id for e in index.examples] == [785, 40083, 196141, 197388]
  assert index.skipped == {}
  for ex in index.examples:
    anns = [a for a in data['annotations'] if a['image_id'] == ex.image_id]
    kept = [a for a in anns if a['iscrowd'] == 0 or a['num_keypoints'] > 0]
    assert ex.keypoints.shape == (len(kept), 17, 3)
    np.testing.assert_array_equal(
        ex.keypoints, np.array([a['keypoints'] for a in kept],
                               np.float32).reshape(-1, 17, 3))
    ignore = coco.decode_ignore_mask(ex.ignore_rle, ex.height, ex.width)
    np.testing.assert_array_equal(ignore == 0,
                                  mmpose_pipeline.valid_mask(
                                      anns, ex.height, ex.width))
  # The two images with a no-keypoint person carry an ignore region.
  with_ignore = [e.image_id for e in index.examples if e.ignore_rle]
  assert with_ignore == [40083, 196141]


def test_filtering_no_people_and_crowd_only(coco_mini_root, tmp_path):
  root = tmp_path / 'coco'
  shutil.copytree(coco_mini_root, root)
  ann_file = root / 'annotations' / 'person_keypoints_val2017.json'
  data = json.loads(ann_file.read_text())
  # 785 becomes crowd-only (its one person turned into a crowd region).
  for a in data['annotations']:
    if a['image_id'] == 785:
      a.update(iscrowd=1, num_keypoints=0, keypoints=[0] * 51)
  # 197388 loses its annotations: no people.
  data['annotations'] = [a for a in data['annotations']
                         if a['image_id'] != 197388]
  ann_file.write_text(json.dumps(data))
  index = coco.load_coco_index(str(root), 'val2017')
  assert [e.image_id for e in index.examples] == [40083, 196141]
  assert index.skipped == {coco.CROWD_ONLY: [785], coco.NO_PEOPLE: [197388]}


def test_missing_files_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match='person_keypoints_train2017'):
    coco.load_coco_index(str(tmp_path), 'train2017')
  (tmp_path / 'annotations').mkdir()
  (tmp_path / 'annotations' / 'person_keypoints_train2017.json').write_text(
      '{}')
  with pytest.raises(FileNotFoundError, match='image folder'):
    coco.load_coco_index(str(tmp_path), 'train2017')


def test_split_paths(tmp_path):
  assert coco.split_paths('/data/coco', 'val2017') == (
      '/data/coco/annotations/person_keypoints_val2017.json',
      '/data/coco/val2017')


def test_decode_image_rgb_and_errors(tmp_path):
  """One decoder for train and eval: RGB; missing, empty and undecodable
  files raise ImageError naming the file, with the skip reason."""
  import cv2  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'red.png'
  bgr = np.zeros((4, 5, 3), np.uint8)
  bgr[..., 2] = 255  # red in cv2's BGR order
  cv2.imwrite(str(path), bgr)
  for source in (str(path), path.read_bytes()):
    rgb = coco.decode_image(source)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == 255).all() and (rgb[..., 1:] == 0).all()
  (tmp_path / 'empty.jpg').write_bytes(b'')
  (tmp_path / 'bad.jpg').write_bytes(b'not a jpeg')
  for name, reason, text in [('nothere.jpg', coco.MISSING, 'cannot read'),
                             ('empty.jpg', coco.CORRUPT, '0 bytes'),
                             ('bad.jpg', coco.CORRUPT, 'cannot decode')]:
    with pytest.raises(coco.ImageError, match=name) as e:
      coco.decode_image(str(tmp_path / name))
    assert e.value.reason == reason and text in str(e.value)
  with pytest.raises(coco.ImageError, match='x.jpg') as e:
    coco.decode_image(b'', 'x.jpg')
  assert e.value.reason == coco.CORRUPT


@pytest.fixture(scope='module')
def tfds_dir(coco_mini_root, tmp_path_factory):
  """The TFDS builder prepared once on the mini COCO (a few seconds)."""
  pytest.importorskip('tensorflow_datasets')
  from ae_jax.data import tfds_coco  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp('tfds')
  tfds_coco.build(str(coco_mini_root), str(data_dir))
  return data_dir


def test_tfds_examples_equal_json(coco_mini_root, tfds_dir):
  from ae_jax.data import tfds_coco  # pylint: disable=g-import-not-at-top
  source, _ = tfds_coco.load_source(str(coco_mini_root), 'val2017',
                                    str(tfds_dir))
  index = coco.load_coco_index(str(coco_mini_root), 'val2017')
  assert len(source) == len(index)
  for i, want in enumerate(index.examples):
    got = source.examples[i]
    assert (got.image_id, got.file_name, got.height, got.width) == (
        want.image_id, want.file_name, want.height, want.width)
    np.testing.assert_array_equal(got.keypoints, want.keypoints)
    np.testing.assert_array_equal(
        coco.decode_ignore_mask(got.ignore_rle, got.height, got.width),
        coco.decode_ignore_mask(want.ignore_rle, want.height, want.width))
    with open(index.image_path(i), 'rb') as f:
      assert source.image(i) == f.read()  # raw bytes, not re-encoded


def test_tfds_pipeline_equals_json(coco_mini_root, tfds_dir):
  from ae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  kw = dict(input_size=64, heatmap_size=16, max_people=30,
            rot_factor=30.0, scale_factor=(0.75, 1.5), scale_type='short',
            trans_factor=40.0, flip_prob=0.5, augment=True,
            global_batch_size=4, seed=3, process_index=0, process_count=1,
            tfds_data_dir=str(tfds_dir))
  batches = []
  for source, workers in (('json', 0), ('tfds', 1)):  # TFDS in a worker
    it = iter(pipeline.make_train_dataset(
        str(coco_mini_root), 'val2017', source=source, workers=workers,
        **kw))
    batches.append(next(it))
    it.close()
  for key in batches[0]:
    np.testing.assert_array_equal(batches[0][key], batches[1][key])

"""Train pipeline: contract, determinism, resume, host sharding, bad files.

Parallel maps (num_parallel_calls > 1, AUTOTUNE) must give the serial
stream bit for bit, and resume within it.
"""

import itertools
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from ae_jax.data import coco
from ae_jax.data import pipeline
from ae_jax.data import transforms

SMALL = dict(input_size=64, heatmap_size=16, max_people=30,
             rot_factor=30.0, scale_factor=(0.75, 1.5), scale_type='short',
             trans_factor=40.0, flip_prob=0.5, augment=True)


def _make(root, **kw):
  args = dict(SMALL, global_batch_size=3, seed=7, process_index=0,
              process_count=1)
  args.update(kw)
  return pipeline.make_train_dataset(str(root), 'val2017', **args)


def _take(ds, n):
  return list(itertools.islice(iter(ds), n))


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_contract_and_same_seed_same_batches(coco_mini_root):
  ds = _make(coco_mini_root)
  assert ds.num_examples == 4
  first = _take(ds, 3)
  b = first[0]
  assert sorted(b) == ['image', 'keypoints', 'mask']
  assert b['image'].shape == (3, 64, 64, 3) and b['image'].dtype == np.uint8
  assert b['mask'].shape == (3, 16, 16) and b['mask'].dtype == np.uint8
  assert set(np.unique(b['mask'])) <= {0, 1}
  kp = b['keypoints']
  assert kp.shape == (3, 30, 17, 3) and kp.dtype == np.float32
  assert (kp[..., 2] > 0).any() and (kp[:, 5:] == 0).all()  # <= 5 people
  _assert_same(first, _take(_make(coco_mini_root), 3))
  other = _take(_make(coco_mini_root, seed=8), 1)[0]
  assert not np.array_equal(other['image'], b['image'])


def test_resume_at_start_step(coco_mini_root):
  # 3 per batch over 4 images: batches straddle epoch boundaries.
  full = _take(_make(coco_mini_root), 5)
  _assert_same(full[3:], _take(_make(coco_mini_root, start_step=3), 2))


@pytest.mark.parametrize('calls', [2, 3, -1])
def test_parallel_map_gives_the_serial_batches(coco_mini_root, calls):
  """N-way (and AUTOTUNE) parallel loading: the serial stream, bit for bit,
  from the start and resumed mid-stream (batches straddle epochs)."""
  serial = _take(_make(coco_mini_root, num_parallel_calls=1), 6)
  _assert_same(serial, _take(_make(coco_mini_root,
                                   num_parallel_calls=calls), 6))
  _assert_same(serial[4:], _take(_make(coco_mini_root, start_step=4,
                                       num_parallel_calls=calls), 2))


def test_hosts_split_the_global_batch(coco_mini_root):
  whole = _take(_make(coco_mini_root, global_batch_size=4), 2)
  parts = [_take(_make(coco_mini_root, global_batch_size=4, process_index=p,
                       process_count=2), 2) for p in range(2)]
  for step in range(2):
    for key in whole[step]:
      np.testing.assert_array_equal(
          whole[step][key],
          np.concatenate([parts[0][step][key], parts[1][step][key]]))


def _expected_unaugmented(root, size, hm_size, scale_type='short'):
  """Per image id: the fixed-parameter transform (checked in its own test)."""
  index = coco.load_coco_index(str(root), 'val2017')
  in_wh, hm_wh = transforms.train_sizes(size, hm_size)
  out = {}
  for i, ex in enumerate(index.examples):
    try:
      image = coco.decode_image(index.image_path(i))
    except coco.ImageError:  # a file the test broke
      continue
    img, mask, joints = transforms.transform_example(
        image, coco.decode_ignore_mask(ex.ignore_rle, ex.height, ex.width),
        ex.keypoints, transforms.AugParams(), in_wh, hm_wh, scale_type)
    out[ex.image_id] = dict(
        image=img, mask=mask,
        keypoints=np.pad(joints, ((0, 30 - len(joints)), (0, 0), (0, 0))))
  return out


def _match(batch, expected):
  """Image id of each example in the batch (exact match of every field)."""
  ids = []
  for i in range(batch['image'].shape[0]):
    hits = [k for k, e in expected.items()
            if all(np.array_equal(batch[f][i], e[f]) for f in e)]
    assert len(hits) == 1, f'example {i} matches {hits}'
    ids.append(hits[0])
  return ids


def test_full_size_unaugmented_is_the_fixed_transform(coco_mini_root):
  """512/128, augment off: each example is exactly one mini COCO image."""
  ds = _make(coco_mini_root, input_size=512, heatmap_size=128, augment=False,
             global_batch_size=4)
  expected = _expected_unaugmented(coco_mini_root, 512, 128)
  ids = _match(_take(ds, 1)[0], expected)
  assert sorted(ids) == [785, 40083, 196141, 197388]  # one epoch, permuted


def test_rectangular_unaugmented_batch(coco_mini_root):
  """(w, h) sizes (configs/coco_mini.py at 1/4): [b, H, W, 3] images,
  [b, h, w, ...] targets, each example the fixed 'long' transform."""
  ds = _make(coco_mini_root, input_size=(112, 64), heatmap_size=(28, 16),
             scale_type='long', augment=False, global_batch_size=4)
  b = _take(ds, 1)[0]
  assert b['image'].shape == (4, 64, 112, 3)
  assert b['mask'].shape == (4, 16, 28)
  assert b['keypoints'].shape == (4, 30, 17, 3)
  expected = _expected_unaugmented(coco_mini_root, (112, 64), (28, 16),
                                   'long')
  assert sorted(_match(b, expected)) == [785, 40083, 196141, 197388]


def test_bad_images_are_replaced_and_counted(coco_mini_root, tmp_path):
  root = tmp_path / 'coco'
  shutil.copytree(coco_mini_root, root)
  ann_file = root / 'annotations' / 'person_keypoints_val2017.json'
  data = json.loads(ann_file.read_text())
  for a in data['annotations']:  # 785: crowd-only, dropped from the index
    if a['image_id'] == 785:
      a.update(iscrowd=1, num_keypoints=0, keypoints=[0] * 51)
  ann_file.write_text(json.dumps(data))
  (root / 'val2017' / '000000040083.jpg').write_bytes(b'not a jpeg')
  (root / 'val2017' / '000000196141.jpg').unlink()
  ds = _make(root, augment=False, global_batch_size=3)
  assert ds.num_examples == 3
  batches = _take(ds, 2)
  expected = _expected_unaugmented(root, 64, 16)
  # Only 197388 is readable: every example is it, with its own targets.
  assert list(expected) == [197388]
  for b in batches:
    assert _match(b, expected) == [197388] * 3
  skipped = ds.skipped
  assert skipped[coco.CROWD_ONLY] == 1
  assert skipped[coco.CORRUPT] >= 1 and skipped[coco.MISSING] >= 1
  assert set(ds.skips.files) == {'000000040083.jpg', '000000196141.jpg'}


def test_config_errors_are_caught_at_the_call(coco_mini_root):
  """Every argument is named: an unknown key (e.g. a removed config key) or
  a heatmap size that is not the input / 4 fails before any work."""
  with pytest.raises(TypeError, match='shuffle_buffer'):
    _make(coco_mini_root, shuffle_buffer=16)
  with pytest.raises(ValueError, match='heatmap_size'):
    _make(coco_mini_root, input_size=512, heatmap_size=100)


def test_unreadable_dataset_fails_clearly(coco_mini_root, tmp_path):
  root = tmp_path / 'coco'
  shutil.copytree(coco_mini_root, root)
  for f in (root / 'val2017').iterdir():
    f.write_bytes(b'')
  with pytest.raises(Exception, match='could not be read'):
    _take(_make(root), 1)


@pytest.mark.parametrize('mode', ['eager', 'map'])
def test_sample_augmentation_ranges(mode):
  def draw(seed):
    return tf.stack(pipeline.sample_augmentation(
        seed, 30.0, (0.75, 1.5), 0.5))
  seeds = tf.stack([tf.zeros([256], tf.int64), tf.range(256, dtype=tf.int64)],
                   1)
  if mode == 'eager':
    got = np.stack([draw(s).numpy() for s in seeds])
  else:
    ds = tf.data.Dataset.from_tensor_slices(seeds).map(draw)
    got = np.stack(list(ds.as_numpy_iterator()))
  rot, scale, udx, udy, flip = got.T
  assert np.abs(rot).max() <= 30 and rot.std() > 10
  assert scale.min() >= 0.75 and scale.max() <= 1.5
  assert 0 <= udx.min() and udy.max() < 1
  assert set(np.unique(flip)) == {0.0, 1.0} and 0.3 < flip.mean() < 0.7
  again = tf.stack(pipeline.sample_augmentation(seeds[7], 30.0, (0.75, 1.5),
                                                  0.5)).numpy()
  np.testing.assert_array_equal(again, got[7])  # stateless: same seed, same

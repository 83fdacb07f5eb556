"""Train pipeline: contract, determinism, resume, host sharding, bad files.

Worker processes (config.data.workers > 0) must give the in-process
stream bit for bit, and resume within it; the stream is the one the
earlier tf.data pipeline drew with TF's stateless ops.
"""

import collections
import itertools
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from ae_jax.data import coco
from ae_jax.data import example_loader
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
  it = iter(ds)
  try:
    return list(itertools.islice(it, n))
  finally:
    it.close()  # stops the workers


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


@pytest.mark.parametrize('workers', [1, 3])
def test_workers_give_the_in_process_batches(coco_mini_root, workers):
  """N worker processes: the in-process stream, bit for bit, from the start
  and resumed mid-stream (batches straddle epochs)."""
  serial = _take(_make(coco_mini_root, workers=0), 6)
  _assert_same(serial, _take(_make(coco_mini_root, workers=workers), 6))
  _assert_same(serial[4:], _take(_make(coco_mini_root, start_step=4,
                                       workers=workers), 2))


def _tf_stream(seed, positions, num, rot_factor=30.0, scale_factor=(0.75,
                                                                     1.5),
               flip_prob=0.5):
  """The earlier tf.data pipeline's draws, with TF's ops: the permutation
  of each epoch and the (rot, scale, u_dx, u_dy, flip) of each position."""
  epochs = sorted({int(g) // num for g in positions})
  perms = {e: tf.random.experimental.stateless_shuffle(
      tf.range(num, dtype=tf.int64),
      seed=tf.random.experimental.stateless_fold_in(
          tf.constant([seed, 0x5EED], tf.int64), tf.constant(e, tf.int64))
  ).numpy() for e in epochs}
  draws = []
  for g in positions:
    u = tf.random.stateless_uniform([5], seed=(
        tf.random.experimental.stateless_fold_in(
            tf.constant([seed, 0xA06], tf.int64), tf.constant(g, tf.int64))))
    lo, hi = scale_factor
    draws.append(tf.stack([(u[0] * 2.0 - 1.0) * rot_factor,
                           u[1] * (hi - lo) + lo, u[2], u[3],
                           tf.cast(u[4] < flip_prob, tf.float32)]).numpy())
  return perms, np.stack(draws)


def test_the_stream_is_the_tf_pipelines(coco_mini_root):
  """Same (seed, position) -> same permutation and draws as TF's ops gave,
  bit for bit, and so the same batches: each example is its permuted
  image under those draws (ExampleLoader, checked against mmpose in
  test_data_transforms)."""
  positions = np.concatenate([np.arange(6), np.arange(6, 400, 37)])
  perms, want = _tf_stream(11, positions, 4)
  got = pipeline.sample_augmentation(11, positions, 30.0, (0.75, 1.5), 0.5)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  for e, perm in perms.items():
    np.testing.assert_array_equal(pipeline.epoch_permutation(11, e, 4), perm)
  index = coco.load_coco_index(str(coco_mini_root), 'val2017')
  load = example_loader.make_loader(
      coco.ExampleSource(index.examples, index.image_dir), input_wh=(64, 64),
      heatmap_wh=(16, 16), scale_type='short', trans_factor=40.0,
      max_people=30)
  batches = _take(_make(coco_mini_root, seed=11, global_batch_size=3), 2)
  for g in range(6):
    b = batches[g // 3]
    example = load(perms[g // 4][g % 4], want[g],
                   example_loader.SkipCounter())
    for key, value in zip(('image', 'mask', 'keypoints'), example):
      np.testing.assert_array_equal(b[key][g % 3], value)


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


@pytest.mark.parametrize('workers', [0, 2])
def test_bad_images_are_replaced_and_counted(coco_mini_root, tmp_path,
                                             workers):
  """In-process and from the workers' reports: the same replacements."""
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
  ds = _make(root, augment=False, global_batch_size=3, workers=workers)
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
  # Counted for the batches handed out, exactly: per example, the
  # unreadable images tried before 197388 in index order (wrapping).
  order = [e.file_name for e in coco.load_coco_index(
      str(root), 'val2017').examples]
  perms = [pipeline.epoch_permutation(7, e, 3) for e in range(2)]
  tried = collections.Counter()
  for g in range(6):
    i = int(perms[g // 3][g % 3])
    while order[i] != '000000197388.jpg':
      tried[order[i]] += 1
      i = (i + 1) % 3
  assert skipped[coco.CORRUPT] == tried['000000040083.jpg']
  assert skipped[coco.MISSING] == tried['000000196141.jpg']


def test_config_errors_are_caught_at_the_call(coco_mini_root):
  """Every argument is named: an unknown key (e.g. a removed config key) or
  a heatmap size that is not the input / 4 fails before any work."""
  with pytest.raises(TypeError, match='shuffle_buffer'):
    _make(coco_mini_root, shuffle_buffer=16)
  with pytest.raises(ValueError, match='heatmap_size'):
    _make(coco_mini_root, input_size=512, heatmap_size=100)
  with pytest.raises(ValueError, match='config.data.workers = -2'):
    _make(coco_mini_root, workers=-2)


@pytest.mark.parametrize('workers', [0, 1])
def test_unreadable_dataset_fails_clearly(coco_mini_root, tmp_path,
                                          workers):
  """In a worker too: its exception reaches the training process as is.

  The images go bad after the index was built (its check that some images
  read is coco.check_some_readable, test_data_validation), so the error
  comes from the batch maker.
  """
  root = tmp_path / 'coco'
  shutil.copytree(coco_mini_root, root)
  batches = _make(root, workers=workers)
  for f in (root / 'val2017').iterdir():
    f.write_bytes(b'')
  with pytest.raises(example_loader.InputDataError,
                     match='could not be read'):
    _take(batches, 1)


def test_sample_augmentation_ranges():
  got = pipeline.sample_augmentation(0, np.arange(256), 30.0, (0.75, 1.5),
                                     0.5)
  assert got.shape == (256, 5) and got.dtype == np.float32
  rot, scale, udx, udy, flip = got.T
  assert np.abs(rot).max() <= 30 and rot.std() > 10
  assert scale.min() >= 0.75 and scale.max() <= 1.5
  assert 0 <= udx.min() and udy.max() < 1
  assert set(np.unique(flip)) == {0.0, 1.0} and 0.3 < flip.mean() < 0.7
  again = pipeline.sample_augmentation(0, [7], 30.0, (0.75, 1.5), 0.5)
  np.testing.assert_array_equal(again[0], got[7])  # stateless: same g, same
  other = pipeline.sample_augmentation(1, [7], 30.0, (0.75, 1.5), 0.5)
  assert not np.array_equal(other[0], got[7])
  np.testing.assert_array_equal(  # augment off: the identity
      pipeline.sample_augmentation(0, [3, 4], 30.0, (0.75, 1.5), 0.5,
                                   augment=False),
      [[0, 1, .5, .5, 0]] * 2)


def test_compact_examples_are_the_index(coco_mini_root):
  """The workers' flat copy of the index gives back every example."""
  index = coco.load_coco_index(str(coco_mini_root), 'val2017')
  compact = example_loader.CompactExamples(index.examples)
  assert len(compact) == len(index.examples) == 4
  with_rle = 0
  for want, got in zip(index.examples, (compact[i] for i in range(4))):
    assert (got.image_id, got.file_name, got.height, got.width) == (
        want.image_id, want.file_name, want.height, want.width)
    np.testing.assert_array_equal(got.keypoints, want.keypoints)
    assert got.keypoints.dtype == want.keypoints.dtype
    assert (got.ignore_rle is None) == (want.ignore_rle is None)
    if want.ignore_rle is not None:
      with_rle += 1
      assert got.ignore_rle == want.ignore_rle
      np.testing.assert_array_equal(
          coco.decode_ignore_mask(got.ignore_rle, got.height, got.width),
          coco.decode_ignore_mask(want.ignore_rle, want.height, want.width))
  assert with_rle  # the mini COCO has ignore regions


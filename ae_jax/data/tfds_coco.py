"""TFDS builder for a local COCO person-keypoints folder (no download).

Build once (COCO root as manual_dir):
  builder = CocoKeypoints(data_dir='/data/tfds')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir='/data/coco'))
or let `make_train_dataset(..., source='tfds', tfds_data_dir=...)` build it
on first use. Records are ArrayRecord, so the pipeline's worker processes
read them by index (random access, without TensorFlow) exactly like the
json source; each record holds the same
CocoExample the json path builds (coco.py) plus the raw image file bytes,
stored as-is (no re-encoding), so both sources give identical batches.

Features per example: image_id int64, file_name str, height/width int32,
keypoints [P, K, 3] float32, ignore_counts (compressed COCO RLE string of
the ignore union, '' if none), image (raw file bytes).
"""

import inspect
import os
import threading

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from ae_jax.data import coco as coco_lib
from ae_jax.keypoints import NUM_JOINTS

_SPLITS = ('train2017', 'val2017')


class CocoKeypoints(tfds.core.GeneratorBasedBuilder):
  """COCO person keypoints for AE training, from a local COCO root."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'mmpose BottomUpCocoDataset train examples.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Point manual_dir at a COCO root with annotations/'
      'person_keypoints_{split}.json and {split}/*.jpg.')

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS's default probes `importlib_resources`, which is not a dependency
    # here (ModuleNotFoundError); this module's file is the answer anyway.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image_id': tfds.features.Scalar(np.int64),
            'file_name': tfds.features.Text(),
            'height': tfds.features.Scalar(np.int32),
            'width': tfds.features.Scalar(np.int32),
            'keypoints': tfds.features.Tensor(
                shape=(None, NUM_JOINTS, 3), dtype=np.float32),
            'ignore_counts': tfds.features.Text(),
            'image': tfds.features.Tensor(shape=(), dtype=np.object_),
        }),
        supervised_keys=None,
        # Keep COCO image-id order so record i is json example i.
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    splits = [s for s in _SPLITS
              if os.path.isfile(coco_lib.split_paths(root, s)[0])]
    if not splits:
      raise FileNotFoundError(
          f'No annotations/person_keypoints_{{train,val}}2017.json in {root}')
    return {s: self._generate_examples(str(root), s) for s in splits}

  def _generate_examples(self, root: str, split: str):
    index = coco_lib.load_coco_index(root, split)
    for reason, ids in index.skipped.items():
      logging.info('tfds COCO %s: skipped %d images (%s).', split, len(ids),
                   reason)
    for i, ex in enumerate(index.examples):
      try:
        with open(index.image_path(i), 'rb') as f:
          data = f.read()
      except OSError:
        data = b''  # counted as missing by the pipeline when read
      counts = ex.ignore_rle['counts'] if ex.ignore_rle else b''
      yield ex.image_id, {
          'image_id': ex.image_id, 'file_name': ex.file_name,
          'height': ex.height, 'width': ex.width, 'keypoints': ex.keypoints,
          'ignore_counts': counts.decode() if counts else '', 'image': data}


def record_to_example(record) -> tuple[coco_lib.CocoExample, bytes]:
  """Decoded TFDS record -> (CocoExample, raw image bytes)."""
  height, width = int(record['height']), int(record['width'])
  counts = record['ignore_counts']
  counts = counts if isinstance(counts, bytes) else str(counts).encode()
  rle = {'size': [height, width], 'counts': counts} if counts else None
  name = record['file_name']
  name = name.decode() if isinstance(name, bytes) else str(name)
  ex = coco_lib.CocoExample(
      int(record['image_id']), name, height, width,
      np.asarray(record['keypoints'], np.float32).reshape(-1, NUM_JOINTS, 3),
      rle)
  return ex, bytes(record['image'])


class _Records:
  """Lazy random access: examples[i] and image(i) share one record read.

  Picklable (the train input's worker processes get a copy): TFDS's data
  source pickles as its dataset info and reopens the files.
  """

  def __init__(self, source):
    self._source = source
    self._local = threading.local()

  def __getstate__(self):
    return {'source': self._source}

  def __setstate__(self, state):
    self.__init__(state['source'])

  def get(self, i: int):
    cached = getattr(self._local, 'item', None)
    if cached is None or cached[0] != i:
      cached = (i, record_to_example(self._source[i]))
      self._local.item = cached
    return cached[1]

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> coco_lib.CocoExample:
    return self.get(i)[0]

  def image_bytes(self, i: int) -> bytes:
    return self.get(i)[1]


def build(coco_root: str, data_dir: str) -> CocoKeypoints:
  """Prepares (if needed) and returns the builder."""
  builder = CocoKeypoints(data_dir=data_dir or None, file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=coco_root))
  return builder


def load_source(coco_root: str, split: str, data_dir: str):
  """coco.ExampleSource over the TFDS records for the pipeline.

  Returns:
    (ExampleSource, skipped-in-index dict; empty: the builder logged it).
  """
  records = _Records(build(coco_root, data_dir).as_data_source(split=split))
  source = coco_lib.ExampleSource(records, image_bytes=records.image_bytes)
  return source, {}

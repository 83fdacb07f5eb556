"""The ONNX export and the JAX-free predictor against the JAX path.

The model is configs/tiny.py's architecture with mmcv's Kaiming init,
BatchNorm statistics set to the batch statistics of mini COCO crops and a
final layer of 100 x mmpose's init scale, so that its maps have peaks and
tags of a trained model's scale (mmpose's init gives maps ~1e-5, where
nobody is found; N(0, 0.2) weights give maps so ill-conditioned that
float32 rounding alone regroups people).
References are computed here: infer/predict (jitted JAX, the kernels
eval.py uses on this backend) on the same variables and images.
"""

import json
import os
import subprocess
import sys
import textwrap

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ae_jax import keypoints
from ae_jax.data import coco
from ae_jax.data import eval_input
from ae_jax.deploy import onnx_export
from ae_jax.deploy import predictor as deploy_predictor
from ae_jax.infer import predict
from ae_jax.models import ae_model
from ae_jax.train import variables_checkpoint
from tests.conftest import BLOCK_IMPORTS
from tests.conftest import COCO_MINI
from tests.conftest import REPO_ROOT
from tests.references import pose_agreement

pytest.importorskip('onnxruntime')

MODEL = {'widen_factor': 0.25, 'num_deconv_filters': (32, 32, 32),
         'num_joints': 17}
IMAGES = sorted(str(p) for p in (COCO_MINI / 'val2017').glob('*.jpg'))
TEST = {'input_size': 128, 'scales': (1.0,), 'project2image': True,
        'grouping': {'nms_kernel': 5, 'max_people': 30,
                     'detection_threshold': 0.1, 'tag_threshold': 1.0,
                     'use_detection_val': True, 'ignore_too_much': False,
                     'adjust': True, 'refine': True}}


def _lively_variables():
  """Kaiming-init variables, BatchNorm calibrated, O(1) heatmaps and tags."""
  model = ae_model.create_model(MODEL)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))
  rng = np.random.default_rng(0)

  def init(path, leaf):  # mmcv kaiming_init (fan_out), BN weight 1, bias 0
    name = jax.tree_util.keystr(path)
    if 'final_layer' in name and 'kernel' in name:  # 100 x mmpose's std
      return (rng.normal(size=leaf.shape) * 0.1).astype(np.float32)
    if 'kernel' in name:
      fan_out = np.prod(leaf.shape[:2]) * leaf.shape[-1]
      return (rng.normal(size=leaf.shape) * np.sqrt(2 / fan_out)).astype(
          np.float32)
    return np.full(leaf.shape, 'scale' in name or 'var' in name, np.float32)

  variables = jax.tree_util.tree_map_with_path(init, shapes)
  crops = np.stack([coco.decode_image(p)[:128, :128] for p in IMAGES])
  _, new = model.apply(variables, ae_model.normalize_images(crops),
                       train=True, mutable=['batch_stats'])  # eager: no compile
  # One train step from mean 0 / var 1 with momentum 0.9: undo the average
  # to get the batch's own statistics.
  def batch_stat(path, value):
    value = np.asarray(value)
    if 'var' in jax.tree_util.keystr(path):
      return (value - 0.9) / 0.1
    return value / 0.1

  return {'params': variables['params'], 'batch_stats': jax.tree_util.tree_map_with_path(
      batch_stat, new['batch_stats'])}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(variables, {flip: exported .onnx path})."""
  variables = _lively_variables()
  out = tmp_path_factory.mktemp('onnx')
  paths = {}
  for flip in (False, True):
    paths[flip] = onnx_export.export_onnx(
        MODEL, variables, str(out / f'flip{int(flip)}.onnx'),
        spec=keypoints.COCO, test={**TEST, 'flip': flip})
  return variables, paths


def _jax_predictor(variables, flip):
  model = ae_model.create_model(
      MODEL, ae_model.default_kernels(jax.default_backend()))
  return predict.Predictor(model, variables, predict.PredictOptions(
      **TEST, flip=flip, flip_index=keypoints.COCO.flip_index))


def test_graph_outputs_equal_predict_batch(tiny):
  variables, paths = tiny
  onnx_predictor = deploy_predictor.OnnxPredictor(paths[True])
  options = predict.PredictOptions(**TEST, flip=True)
  model = ae_model.create_model(MODEL)  # the flax layers the graph mirrors
  x = eval_input.resize_inputs(coco.decode_image(IMAGES[0]), 128, (1.0,))
  got = onnx_predictor.run(x.images[0][None])
  want = predict.predict_batch(variables, (x.images[0][None],), model=model,
                               options=options, base_hw=x.base_hw)
  heat, tags = np.asarray(want.heat), np.asarray(want.tags)
  assert got['heatmaps'].shape == heat.shape == (1, 17) + x.base_hw
  assert got['tags'].shape == tags.shape == (1, 17) + x.base_hw + (2,)
  scale = np.abs(heat).max()
  assert scale > 0.3  # the maps have peaks above the detection threshold
  np.testing.assert_allclose(got['heatmaps'], heat, atol=1e-4 * scale)
  np.testing.assert_allclose(got['tags'], tags,
                             atol=1e-4 * np.abs(tags).max())
  cands = jax.tree_util.tree_map(np.asarray, want.candidates)
  np.testing.assert_allclose(got['val'], cands.val, atol=1e-4 * scale)
  # Near-equal peaks may swap places: every index holds its value.
  flat_heat = got['heatmaps'].reshape(1, 17, -1)
  np.testing.assert_array_equal(
      np.take_along_axis(flat_heat, got['idx'].astype(np.int64), 2),
      got['val'])
  assert (got['idx'] == cands.idx).mean() > 0.95
  same = got['idx'] == cands.idx
  np.testing.assert_allclose(got['tag'][same], cands.tag[same],
                             atol=1e-4 * np.abs(tags).max())
  np.testing.assert_allclose(got['neighbors'][same], cands.neighbors[same],
                             atol=1e-4 * scale)


@pytest.mark.parametrize('flip', [False, True])
def test_people_equal_the_jax_path_on_mini_coco(tiny, flip):
  variables, paths = tiny
  items = [(p, coco.decode_image(p)) for p in IMAGES]
  want = {r.key: r.poses for r in _jax_predictor(variables, flip).stream(
      items)}
  got = {r.key: r.poses for r in deploy_predictor.OnnxPredictor(
      paths[flip]).stream(items)}
  assert sorted(got) == sorted(want) == IMAGES
  agree = total = 0
  for path in IMAGES:
    assert len(want[path]) > 10  # many people: grouping has work to do
    ok, n = pose_agreement.agreement(got[path], want[path])
    agree, total = agree + ok, total + n
  assert agree >= 0.99 * total, (agree, total)


def test_contract_and_metadata(tiny):
  _, paths = tiny
  onnx_predictor = deploy_predictor.OnnxPredictor(paths[True])
  assert onnx_predictor.spec == keypoints.COCO
  assert onnx_predictor.test['flip'] is True
  assert onnx_predictor.test['input_size'] == 128
  assert onnx_predictor.grouping.max_people == 30
  good = np.zeros((1, 64, 96, 3), np.uint8)
  assert onnx_predictor.run(good)['heatmaps'].shape == (1, 17, 64, 96)
  for bad in [good.astype(np.float32), np.zeros((1, 100, 96, 3), np.uint8),
              np.zeros((1, 64, 96, 4), np.uint8), good[0]]:
    with pytest.raises(deploy_predictor.InputError, match='uint8 RGB 0-255'):
      onnx_predictor.run(bad)


def test_export_refuses_what_the_graph_cannot_hold(tmp_path):
  with pytest.raises(onnx_export.ExportError, match='single scale'):
    onnx_export.check_test_settings({'scales': (2.0, 1.0, 0.5)})
  with pytest.raises(onnx_export.ExportError, match='project2image'):
    onnx_export.check_test_settings({'project2image': False})
  with pytest.raises(onnx_export.ExportError, match='ends in .onnx'):
    onnx_export.check_out_file(str(tmp_path / 'model.pb'))
  (tmp_path / 'dir.onnx').mkdir()
  with pytest.raises(onnx_export.ExportError, match='is a folder'):
    onnx_export.check_out_file(str(tmp_path / 'dir.onnx'))
  with pytest.raises(deploy_predictor.ModelFileError, match='cannot load'):
    deploy_predictor.OnnxPredictor(str(tmp_path / 'missing.onnx'))


# Runs demo.py --model with jax, flax, tensorflow and torch unimportable.
_BLOCKED_DEMO = BLOCK_IMPORTS + textwrap.dedent('''
    import runpy
    sys.argv = ['demo.py'] + sys.argv[1:]
    try:
      runpy.run_path('demo.py', run_name='__main__')
    finally:
      loaded = sorted({m.split('.')[0] for m in sys.modules} &
                      set(BLOCKED))
      print('BLOCKED_LOADED', loaded)
''')


def test_demo_runs_the_onnx_model_without_jax(tiny, tmp_path):
  _, paths = tiny
  video = str(tmp_path / 'walk.mp4')
  frame = cv2.imread(IMAGES[1])
  writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*'mp4v'), 5.0,
                           (frame.shape[1], frame.shape[0]))
  for _ in range(2):
    writer.write(frame)
  writer.release()
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-c', _BLOCKED_DEMO, '--model', paths[False],
       '--out', str(out), IMAGES[0], IMAGES[1], video],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'PYTHONPATH': str(REPO_ROOT)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'BLOCKED_LOADED []' in proc.stdout
  names = sorted(p.name for p in out.iterdir())
  assert names == ['000000000785.png', '000000040083.png', 'poses.json',
                   'walk.json', 'walk.mp4']
  entries = json.loads((out / 'poses.json').read_text())
  onnx_predictor = deploy_predictor.OnnxPredictor(paths[False])
  for entry, path in zip(entries, IMAGES[:2]):
    assert entry['source'] == path
    poses = onnx_predictor(coco.decode_image(path))
    assert len(entry['people']) == len(poses) > 0
    np.testing.assert_allclose(
        [p['keypoints'] for p in entry['people']], poses.keypoints,
        atol=1e-3)
  frames = json.loads((out / 'walk.json').read_text())['frames']
  capture = cv2.VideoCapture(video)
  assert len(frames) == 2
  for entry in frames:  # each decoded frame's people
    ok, bgr = capture.read()
    assert ok
    poses = onnx_predictor(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    assert len(entry['people']) == len(poses) > 0
    np.testing.assert_allclose(
        [p['keypoints'] for p in entry['people']], poses.keypoints,
        atol=1e-3)


def test_export_cli_writes_onnx_and_refuses_multi_scale(tiny, tmp_path):
  variables, _ = tiny
  variables_checkpoint.save_variables(str(tmp_path / 'ckpt'), variables)
  base = [sys.executable, 'export.py', '--config', 'configs/tiny.py',
          '--ckpt', str(tmp_path / 'ckpt'),
          '--config.test.grouping.detection_threshold=0.2']
  proc = subprocess.run(base + ['--out', str(tmp_path / 'ae.onnx')],
                        cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  onnx_predictor = deploy_predictor.OnnxPredictor(str(tmp_path / 'ae.onnx'))
  assert onnx_predictor.grouping.detection_threshold == 0.2
  assert onnx_predictor.test['flip'] is True  # configs/tiny.py's test group
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ae.onnx', 'ckpt']
  proc = subprocess.run(
      base + ['--out', str(tmp_path / 'ms.onnx'),
              '--config.test.scales=(2.0, 1.0)'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'single scale' in last
  assert not (tmp_path / 'ms.onnx').exists()

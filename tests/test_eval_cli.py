"""eval.py end to end on the mini COCO with a tiny checkpoint."""

import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest

from ae_jax.train import variables_checkpoint
from ae_jax.models import ae_model
from configs import tiny as tiny_config
from tests.conftest import foreign_info_lines
from tests.conftest import random_variables

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
  """A randomly initialised tiny-config AEModel saved as variables."""
  config = tiny_config.get_config()
  model = ae_model.AEModel(**config.model)
  variables = random_variables(model)  # BN statistics at identity
  ckpt = tmp_path_factory.mktemp('ckpt') / 'tiny'
  variables_checkpoint.save_variables(str(ckpt), variables)
  return ckpt


def _run(args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='',
             TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)  # one device is enough here
  return subprocess.run([sys.executable] + args, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)


def test_eval_cli_prints_table_and_names_missing_image(
    tiny_ckpt, coco_mini_root, tmp_path):
  root = tmp_path / 'coco'
  shutil.copytree(coco_mini_root, root)
  (root / 'val2017' / '000000196141.jpg').unlink()
  (root / 'val2017' / '000000040083.jpg').write_bytes(b'')  # zero bytes
  out = tmp_path / 'new' / 'folder' / 'results.json'  # folders created
  proc = _run(['eval.py', '--config', 'configs/tiny.py', '--ckpt',
               str(tiny_ckpt), '--coco_root', str(root), '--output', str(out),
               '--batch_size=2',
               '--config.test.grouping.detection_threshold=0.2'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| AP | AP50 | AP75 | APm | APl | AR | AR50 |' in proc.stdout
  assert ('skipped 2 unreadable image(s): 000000040083.jpg, '
          '000000196141.jpg') in proc.stdout
  assert '000000196141.jpg' in proc.stderr  # logged when skipped
  assert '000000040083.jpg (0 bytes)' in proc.stderr
  assert 'MB/image' in proc.stdout  # device->host bytes
  results = json.loads(out.read_text())
  assert isinstance(results, list)
  for r in results:
    assert r['category_id'] == 1 and len(r['keypoints']) == 51
    assert r['image_id'] in (785, 197388)
  assert [p.name for p in out.parent.iterdir()] == ['results.json']
  umask = os.umask(0)  # written with the user's umask (mkstemp: 0600)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~umask
  # Quiet console: orbax logged ~30 INFO lines for one checkpoint read.
  assert not foreign_info_lines(proc.stderr), proc.stderr[-3000:]
  assert f'Read checkpoint {tiny_ckpt}.' in proc.stderr
  assert f', checkpoint {tiny_ckpt}, scales [1.0], flip True' in proc.stdout


@pytest.mark.parametrize('kind', ['directory', 'under_a_file'])
def test_eval_cli_refuses_bad_output_before_evaluating(
    tiny_ckpt, coco_mini_root, tmp_path, kind):
  if kind == 'directory':
    out = tmp_path
  else:
    (tmp_path / 'a_file').write_text('keep me')
    out = tmp_path / 'a_file' / 'results.json'
  proc = _run(['eval.py', '--config', 'configs/tiny.py', '--ckpt',
               str(tiny_ckpt), '--coco_root', str(coco_mini_root),
               '--output', str(out)])
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and str(out) in last
  assert 'eval ' not in proc.stderr  # no image was evaluated
  if kind == 'under_a_file':
    assert (tmp_path / 'a_file').read_text() == 'keep me'


def test_eval_cli_empty_split_is_an_error(tiny_ckpt, coco_mini_root,
                                          tmp_path):
  root = tmp_path / 'coco'
  shutil.copytree(coco_mini_root, root)
  ann = root / 'annotations' / 'person_keypoints_val2017.json'
  data = json.loads(ann.read_text())
  data['images'], data['annotations'] = [], []
  ann.write_text(json.dumps(data))
  proc = _run(['eval.py', '--config', 'configs/tiny.py', '--ckpt',
               str(tiny_ckpt), '--coco_root', str(root)])
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: split val2017 of {root} has no images to evaluate')
  assert '| AP |' not in proc.stdout


def test_eval_cli_rejects_bad_checkpoint(tmp_path, coco_mini_root):
  proc = _run(['eval.py', '--config', 'configs/tiny.py', '--ckpt',
               str(tmp_path / 'missing'), '--coco_root', str(coco_mini_root)])
  assert proc.returncode != 0
  assert 'checkpoint directory not found' in proc.stderr


def test_eval_cli_names_bad_test_scales_in_one_line(tiny_ckpt, coco_mini_root):
  proc = _run(['eval.py', '--config', 'configs/tiny.py', '--ckpt',
               str(tiny_ckpt), '--coco_root', str(coco_mini_root),
               '--config.test.scales=(2, 0.5)'])
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr
  # Named by config_checks before any work (was the Predictor's line).
  assert proc.stderr.strip() == (
      'error: config.test.scales = (2, 0.5): several scales must include '
      '1 (the tags come from scale 1)')


def test_eval_cli_two_processes_equal_one(tiny_ckpt, coco_mini_root,
                                          tmp_path):
  """2 processes (gloo, each half the images) == 1 process, same json."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  args = ['eval.py', '--config', 'configs/tiny.py', '--ckpt', str(tiny_ckpt),
          '--coco_root', str(coco_mini_root), '--max_images=2',
          '--config.test.grouping.detection_threshold=0.2']
  one = _run(args + ['--output', str(tmp_path / 'one.json')])
  assert one.returncode == 0, one.stderr[-3000:]
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='',
             TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  procs = [subprocess.Popen(
      [sys.executable] + args + [
          '--output', str(tmp_path / 'two.json'),
          f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
          f'--process_id={i}'], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:]
  assert '| AP |' in outs[0][0] and '| AP |' not in outs[1][0]
  table = [l for l in one.stdout.splitlines() if l.startswith('| 0')]
  assert table and table == [l for l in outs[0][0].splitlines()
                             if l.startswith('| 0')]
  assert (json.loads((tmp_path / 'two.json').read_text()) ==
          json.loads((tmp_path / 'one.json').read_text()))

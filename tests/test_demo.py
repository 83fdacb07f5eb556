"""demo.py end to end: images, folders, a video; names that never collide."""

import hashlib
import json
import os
import pathlib
import re
import stat
import subprocess
import sys

import cv2
import numpy as np
import pytest

from ae_jax.train import variables_checkpoint
from ae_jax.infer import draw
from ae_jax.models import ae_model
from configs import tiny as tiny_config
from tests.conftest import foreign_info_lines
from tests.conftest import random_variables

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def tiny_ckpt(tmp_path_factory):
  model = ae_model.AEModel(**tiny_config.get_config().model)
  ckpt = tmp_path_factory.mktemp('ckpt') / 'tiny'
  variables_checkpoint.save_variables(str(ckpt), random_variables(model))
  return ckpt


def _run(args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='',
             TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)
  return subprocess.run(
      [sys.executable, 'demo.py', '--config', 'configs/tiny.py'] + args,
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
      check=False)


def _digest(folder):
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in folder.iterdir()}


def test_demo_writes_pngs_and_names_unreadable_images(tiny_ckpt,
                                                     coco_mini_root, tmp_path):
  image = coco_mini_root / 'val2017' / '000000000785.jpg'
  missing = tmp_path / 'missing.jpg'
  proc = _run(['--ckpt', str(tiny_ckpt), '--out', str(tmp_path / 'demo'),
               str(image), str(missing)])
  png = cv2.imread(str(tmp_path / 'demo' / '000000000785.png'))
  assert png is not None, proc.stderr[-3000:]
  assert png.shape == (425, 640, 3)
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.splitlines()[-1] == (
      f'error: 1 input(s) could not be read: {missing}')
  poses = json.loads((tmp_path / 'demo' / 'poses.json').read_text())
  assert [e['source'] for e in poses] == [str(image)]
  assert 'img/s' in proc.stdout


def test_demo_folder_and_video_into_the_input_folder(tiny_ckpt, tmp_path):
  """--out = the input folder: no input overwritten, no output lost."""
  folder = tmp_path / 'in'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for ext in ('png', 'jpg', 'webp'):  # img.*: the same stem three times
    assert cv2.imwrite(str(folder / f'img.{ext}'),
                       rng.integers(0, 255, (50, 70, 3), np.uint8))
  writer = cv2.VideoWriter(str(folder / 'clip.mp4'),
                           cv2.VideoWriter_fourcc(*'mp4v'), 10, (96, 64))
  for _ in range(3):
    writer.write(rng.integers(0, 255, (64, 96, 3), np.uint8))
  writer.release()
  (folder / 'bad.mp4').write_bytes(b'not a video')
  before = _digest(folder)
  missing = tmp_path / 'nothing_here'
  proc = _run(['--ckpt', str(tiny_ckpt), '--out', str(folder), str(folder),
               str(missing)])
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.splitlines()[-1] == (
      f'error: 2 input(s) could not be read: {missing}, {folder}/bad.mp4')
  after = _digest(folder)
  assert {n: after[n] for n in before} == before  # inputs untouched
  assert sorted(set(after) - set(before)) == [
      'clip_mp4.json', 'clip_mp4.mp4', 'img_jpg.png', 'img_png.png',
      'img_webp.png', 'poses.json']
  for name in ('img_jpg.png', 'img_png.png', 'img_webp.png'):
    assert cv2.imread(str(folder / name)).shape == (50, 70, 3)
  entries = json.loads((folder / 'poses.json').read_text())
  assert [os.path.basename(e['source']) for e in entries] == [
      'img.jpg', 'img.png', 'img.webp']
  video = cv2.VideoCapture(str(folder / 'clip_mp4.mp4'))
  assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
  frames = json.loads((folder / 'clip_mp4.json').read_text())['frames']
  assert [f['frame'] for f in frames] == [0, 1, 2]
  assert '6 images/frames' in proc.stdout and 'img/s' in proc.stdout


def test_output_bases_never_collide(tmp_path):
  inputs = [str(tmp_path / n) for n in ('a.png', 'a.gif', 'a.webp',
                                         'a_gif.png', 'sub/a.png')]
  bases = draw.output_bases(inputs, str(tmp_path), ('.png',))
  outs = [bases[p] + '.png' for p in inputs]
  assert len(set(outs)) == len(outs)
  assert not set(outs) & set(inputs)
  assert outs[0] == str(tmp_path / 'a_png.png')


def test_demo_keeps_existing_files_and_counts_people(tiny_ckpt,
                                                    coco_mini_root, tmp_path):
  """An unrelated a.png and an earlier poses.json in --out are kept (a.png
  was overwritten): the outputs take free names, and one line says so.
  Files get the user's umask; each image's line says how many people pass
  --min_score and how many the json holds."""
  (tmp_path / 'in').mkdir()
  source = tmp_path / 'in' / 'a.jpg'
  source.write_bytes((coco_mini_root / 'val2017' /
                      '000000000785.jpg').read_bytes())
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'a.png').write_bytes(b'mine')
  (out / 'poses.json').write_text('{"mine": 1}')
  proc = _run(['--ckpt', str(tiny_ckpt), '--out', str(out), str(source),
               '--min_score=0.01'])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / 'a.png').read_bytes() == b'mine'
  assert (out / 'poses.json').read_text() == '{"mine": 1}'
  assert sorted(os.listdir(out)) == ['a.png', 'a_jpg.png', 'poses.json',
                                     'poses_2.json']
  assert ('2 output(s) take another name, to keep existing files and inputs '
          '(--overwrite replaces files that are not inputs).') in proc.stderr
  [entry] = json.loads((out / 'poses_2.json').read_text())
  [line] = [l for l in proc.stderr.splitlines() if 'people scoring >' in l]
  drawn, listed = re.search(
      r'a.jpg: (\d+) people scoring > 0.01 \((\d+) in the json\)',
      line).groups()
  assert int(listed) == len(entry['people'])
  assert int(drawn) == sum(p['score'] > 0.01 for p in entry['people'])
  assert not foreign_info_lines(proc.stderr), proc.stderr[-3000:]
  umask = os.umask(0)
  os.umask(umask)
  for name in ('a_jpg.png', 'poses_2.json'):
    assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o666 & ~umask


def test_output_bases_keep_existing_files_unless_overwrite(tmp_path):
  inputs = [str(tmp_path / 'in' / 'a.jpg')]
  (tmp_path / 'a.png').write_text('mine')
  (tmp_path / 'a_jpg.png').write_text('mine too')
  assert draw.output_bases(inputs, str(tmp_path), ('.png',)) == {
      inputs[0]: str(tmp_path / 'a_jpg_2')}
  assert draw.output_bases(inputs, str(tmp_path), ('.png',),
                           overwrite=True) == {inputs[0]: str(tmp_path / 'a')}
  # Never an input, even with overwrite.
  inputs = [str(tmp_path / 'a.png')]
  assert draw.output_bases(inputs, str(tmp_path), ('.png',),
                           overwrite=True) == {
                               inputs[0]: str(tmp_path / 'a_png')}

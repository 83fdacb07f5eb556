"""The jax2tf SavedModel reproduces the JAX model's outputs."""

import os
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ae_jax import keypoints
from ae_jax.deploy import saved_model
from ae_jax.models import ae_model
from ae_jax.train import checkpoints
from ae_jax.train import variables_checkpoint
from tests.conftest import REPO_ROOT
from tests.conftest import foreign_info_lines


TINY = {'widen_factor': 0.25, 'num_deconv_filters': (16, 16, 16)}


def _tiny_model_and_variables():
  model = ae_model.create_model(TINY)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = model.init(jax.random.key(1), x)
  # One train-mode pass so batch_stats are not the trivial 0/1 init.
  _, upd = model.apply(variables, x, train=True, mutable=['batch_stats'])
  return model, {'params': variables['params'], **upd}


def _conv_counts(fn, *args):
  """(grouped convs, lhs-dilated convs) in the StableHLO of jit(fn)."""
  text = jax.jit(fn).lower(*args).as_text()
  convs = [line for line in text.splitlines()
           if 'stablehlo.convolution' in line]
  grouped = sum('feature_group_count = 1 :' not in line for line in convs)
  dilated = sum('lhs_dilate = [2, 2]' in line for line in convs)
  return grouped, dilated


def test_serving_graph_uses_plain_flax_layers_on_any_backend():
  # Traced here on the CPU backend, where train.py picks kernels='cpu':
  # export still has the native depthwise (17 grouped) and transposed
  # (3 lhs-dilated) convolutions of the 'flax' kernels.
  assert jax.default_backend() == 'cpu'
  _, variables = _tiny_model_and_variables()
  x = jnp.zeros((1, 64, 64, 3))
  assert _conv_counts(saved_model.make_serving_fn(TINY, variables), x) == (17, 3)
  cpu_model = ae_model.create_model(TINY, 'cpu')  # the check can tell
  assert _conv_counts(lambda x: cpu_model.apply(variables, x), x) == (0, 0)


def _check_candidates(model, variables, x, got):
  """candidate_* outputs == host NMS/top-k of the torch-resized maps."""
  torch = pytest.importorskip('torch')
  from tests.references import host_grouping  # pylint: disable=g-import-not-at-top
  got = {k: v.numpy() for k, v in got.items()}
  _, h, w, _ = x.shape
  raw = torch.from_numpy(np.array(model.apply(variables, jnp.asarray(x))))
  maps = torch.nn.functional.interpolate(
      raw.permute(0, 3, 1, 2), size=(h, w), mode='bilinear',
      align_corners=False).numpy()  # [B, 2K, H, W]
  found = 0
  for b in range(x.shape[0]):
    heat, tags = maps[b, :17], maps[b, 17:, ..., None]
    want = host_grouping.find_candidates(heat, tags, 6, 0.0)
    for k, joint in enumerate(want):
      n = joint.val.size
      found += n
      np.testing.assert_allclose(got['candidate_values'][b, k, :n],
                                 joint.val, atol=1e-5)
      # Upsampled maps have plateaus (equal peaks), which rounding orders
      # differently in TF and torch: check every position holds its value.
      xs, ys = got['candidate_xy'][b, k, :n].T
      np.testing.assert_allclose(heat[k, ys, xs], joint.val, atol=1e-5)
      np.testing.assert_allclose(got['candidate_tags'][b, k, :n, 0],
                                 tags[k, ys, xs, 0], atol=1e-5)
      np.testing.assert_allclose(
          got['candidate_neighbors'][b, k, :n],
          np.stack([heat[k, np.minimum(h - 1, ys + 1), xs],
                    heat[k, np.maximum(0, ys - 1), xs],
                    heat[k, ys, np.minimum(w - 1, xs + 1)],
                    heat[k, ys, np.maximum(0, xs - 1)]], -1), atol=1e-5)
  assert found > 10


@pytest.mark.parametrize('fixed_shape', [None, (1, 64, 96)])
def test_saved_model_matches_jax(tmp_path, fixed_shape):
  tf = pytest.importorskip('tensorflow')
  model, variables = _tiny_model_and_variables()
  out_dir = str(tmp_path / 'sm')
  # The polymorphic export also decodes: candidates for every shape.
  decode = 6 if fixed_shape is None else 0
  saved_model.export_saved_model(TINY, variables, out_dir, fixed_shape,
                            max_people=decode)
  serve = tf.saved_model.load(out_dir).signatures['serving_default']
  rng = np.random.default_rng(0)
  shapes = [(1, 64, 96)] if fixed_shape else [(1, 64, 96), (3, 128, 64)]
  for b, h, w in shapes:
    x = rng.normal(size=(b, h, w, 3)).astype(np.float32)
    got = serve(images=tf.constant(x))
    want = model.apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(got['heatmaps'].numpy(), want[..., :17],
                               atol=1e-5)
    np.testing.assert_allclose(got['tags'].numpy(), want[..., 17:],
                               atol=1e-5)
    assert ('candidate_xy' in got) == bool(decode)
    if decode:
      _check_candidates(model, variables, x, got)
  if fixed_shape is None:  # was an XLA 'shape refinement failed' error
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r'height and width must be multiples of 32 '
                       r'\(pad the bottom / right edge\); got height, '
                       r'width =\] \[100 96\]'):
      serve(images=tf.zeros([1, 100, 96, 3]))


def test_export_cli_reports_bad_checkpoint(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'export.py', '--config', 'configs/tiny.py',
       '--ckpt', str(tmp_path / 'missing'), '--out', str(tmp_path / 'sm')],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'checkpoint directory not found' in proc.stderr


def test_export_cli_writes_saved_model(tmp_path):
  model, variables = _tiny_model_and_variables()
  del model
  variables_checkpoint.save_variables(str(tmp_path / 'ckpt'), variables)
  proc = subprocess.run(
      [sys.executable, 'export.py', '--config', 'configs/tiny.py',
       '--config.model.num_deconv_filters=(16,16,16)',
       '--ckpt', str(tmp_path / 'ckpt'), '--out', str(tmp_path / 'sm'),
       '--nodecode'],  # decoding: test_saved_model_matches_jax
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (tmp_path / 'sm' / 'saved_model.pb').exists()
  text = proc.stdout + proc.stderr
  assert text.count('SavedModel written') == 1, text[-3000:]
  assert 'oneDNN' not in text and not foreign_info_lines(text), text[-3000:]
  umask = os.umask(0)  # the folder mkdtemp made: 0700 before
  os.umask(umask)
  assert stat.S_IMODE(os.stat(tmp_path / 'sm').st_mode) == 0o777 & ~umask
  # Written beside, then renamed: no temporary folder is left.
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt', 'sm']


def test_export_cli_takes_the_model_from_the_checkpoint(tmp_path):
  """A checkpoint that records its model exports with no --config.model
  flags; a flag that contradicts it is one error line naming both."""
  _, variables = _tiny_model_and_variables()
  record = checkpoints.Record({**TINY, 'num_joints': 17, 'dtype': 'float32'},
                              keypoints.COCO)
  variables_checkpoint.save_variables(tmp_path / 'ckpt', variables, record=record)
  args = [sys.executable, 'export.py', '--config', 'configs/coco512.py',
          '--ckpt', str(tmp_path / 'ckpt'), '--out', str(tmp_path / 'sm'),
          '--nodecode', '--fixed_shape=1,64,64']
  bad = subprocess.run(args + ['--config.model.widen_factor=0.5'],
                       cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 1 and 'Traceback' not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1] == (
      f'error: --config.model.widen_factor=0.5 contradicts the checkpoint '
      f'{tmp_path / "ckpt"}, made with widen_factor=0.25 (leave the flag '
      'out: the checkpoint records its model)')
  proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  tf = pytest.importorskip('tensorflow')
  serve = tf.saved_model.load(str(tmp_path / 'sm')).signatures[
      'serving_default']
  x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
  want = ae_model.create_model(TINY).apply(variables, jnp.asarray(x))
  np.testing.assert_allclose(serve(images=tf.constant(x))['heatmaps'].numpy(),
                             want[..., :17], atol=1e-5)


@pytest.mark.parametrize('case', ['under_a_file', 'foreign_folder'])
def test_export_cli_refuses_unwritable_out_in_one_line(tmp_path, case):
  _, variables = _tiny_model_and_variables()
  variables_checkpoint.save_variables(str(tmp_path / 'ckpt'), variables)
  (tmp_path / 'a_file').write_text('keep me')
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me too')
  out = {'under_a_file': tmp_path / 'a_file' / 'sm',
         'foreign_folder': tmp_path / 'mine'}[case]
  proc = subprocess.run(
      [sys.executable, 'export.py', '--config', 'configs/tiny.py',
       '--config.model.num_deconv_filters=(16,16,16)',
       '--ckpt', str(tmp_path / 'ckpt'), '--out', str(out)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and str(out) in last
  assert (tmp_path / 'a_file').read_text() == 'keep me'
  assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep me too'

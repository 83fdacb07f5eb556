"""convert_torch_weights.py's OUTPUT_DIR: nothing existing is lost.

The converter refuses a non-empty OUTPUT_DIR, replaces (with --overwrite)
only a variables checkpoint it wrote, writes atomically and fails fast, in
one line, on an output it cannot write. Inputs: a randomised small model of
tests/references/torch_model.py, saved mmpose-style.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from ae_jax.train import checkpoints
from ae_jax.train import variables_checkpoint

torch = pytest.importorskip('torch')
from tests.references import torch_model  # pylint: disable=g-import-not-at-top

CLI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'convert_torch_weights.py')


def run_cli(*args):
  """Runs convert_torch_weights.py in a fresh interpreter (as a user does)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')
  return subprocess.run([sys.executable, CLI, *map(str, args)],
                        cwd=os.path.dirname(CLI), env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def small_pth(tmp_path_factory):
  """A randomised 0.25-wide pose model with a 16-wide head, mmpose-style."""
  pth = tmp_path_factory.mktemp('small') / 'small.pth'
  model = torch_model.randomize_(
      torch_model.AETorchModel(0.25, (16, 16, 16)), seed=6)
  torch_model.save_mmpose_checkpoint(str(pth), model)
  return pth


def assert_one_error_line(result, fragment):
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  print(result.stderr)
  assert result.returncode == 1
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  assert fragment in lines[0]


def tree_of_files(folder):
  return sorted((str(p.relative_to(folder)), p.read_bytes())
                for p in folder.rglob('*') if p.is_file())


def test_cli_never_replaces_a_folder_it_did_not_write(small_pth, tmp_path):
  user = tmp_path / 'user'  # a user's folder
  (user / 'sub').mkdir(parents=True)
  (user / 'notes.txt').write_text('keep me')
  (user / 'sub' / 'data.bin').write_bytes(b'\0\1')
  workdir = tmp_path / 'workdir'  # a training workdir
  (workdir / 'checkpoints' / '20').mkdir(parents=True)
  (workdir / 'summary.json').write_text('{}')
  before = {d: tree_of_files(d) for d in (user, workdir)}
  for out, flags in ((user, []), (user, ['--overwrite']),
                     (workdir, ['--overwrite'])):
    result = run_cli(small_pth, out, '--infer_arch', *flags)
    assert_one_error_line(
        result, 'is not a variables checkpoint' if flags else
        'exists and is not empty')
  assert {d: tree_of_files(d) for d in (user, workdir)} == before
  assert sorted(os.listdir(tmp_path)) == ['user', 'workdir']  # no tmp left


def test_cli_overwrite_replaces_only_a_variables_checkpoint(small_pth,
                                                             tmp_path):
  out = tmp_path / 'flax'
  out.mkdir()  # an empty folder is fine
  assert run_cli(small_pth, out, '--infer_arch').returncode == 0
  first = checkpoints.restore_variables(str(out))
  other = tmp_path / 'other.pth'
  torch_model.save_mmpose_checkpoint(str(other), torch_model.randomize_(
      torch_model.AETorchModel(0.25, (16, 16, 16)), seed=7))
  assert_one_error_line(run_cli(other, out, '--infer_arch'),
                        'exists and is not empty')
  assert run_cli(other, out, '--infer_arch', '--overwrite').returncode == 0
  second = checkpoints.restore_variables(str(out))
  kernel = lambda v: v['params']['backbone']['conv1']['conv']['kernel']
  assert not np.array_equal(kernel(first), kernel(second))
  assert sorted(os.listdir(tmp_path)) == ['flax', 'other.pth']


def test_cli_unwritable_output_fails_fast(small_pth, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('a file, not a folder')
  targets = [blocker / 'out']
  if os.geteuid() != 0:  # root writes into read-only folders anyway
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o555)
    targets.append(locked / 'out')
  for out in targets:
    result = run_cli(small_pth, out, '--infer_arch')  # no hang: timeout 300
    assert_one_error_line(result, f'cannot write {out}')


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
  out = tmp_path / 'flax'
  old = {'params': {'w': np.ones(3, np.float32)}, 'batch_stats': {}}
  variables_checkpoint.save_variables(out, old)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def broken_save(self, directory, *args, **kwargs):
    del self, args, kwargs
    (directory / 'partial').mkdir(parents=True)
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(ocp.Checkpointer, 'save', broken_save)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'cannot write .*flax: .*No space left'):
    variables_checkpoint.save_variables(
        out, {'params': {'w': np.zeros(3, np.float32)}}, overwrite=True)
  np.testing.assert_array_equal(
      checkpoints.restore_variables(out)['params']['w'], 1.0)
  assert os.listdir(tmp_path) == ['flax']

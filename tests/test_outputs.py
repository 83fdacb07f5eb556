"""outputs: an output is never an input, free names, modes by umask."""

import os
import stat
import tempfile

import pytest

from ae_jax import outputs


def test_output_that_is_or_is_inside_an_input_is_refused(tmp_path):
  ann = tmp_path / 'annotations' / 'person_keypoints_val2017.json'
  ann.parent.mkdir()
  ann.write_text('{}')
  ckpt = tmp_path / 'run' / 'checkpoints'
  ckpt.mkdir(parents=True)
  inputs = {'the annotation file': str(ann), 'the checkpoint': str(ckpt),
            'nothing': ''}
  with pytest.raises(outputs.OutputError, match=(
      f'^--output {ann} is the annotation file {ann}, an input of this '
      'run; write it elsewhere$')):
    outputs.check_not_input('--output', str(ann), inputs)
  inside = ckpt / '2' / 'r.json'
  with pytest.raises(outputs.OutputError, match=' is inside the checkpoint'):
    outputs.check_not_input('--output', str(inside), inputs)
  # Through a symlink and a relative path too.
  os.symlink(tmp_path / 'annotations', tmp_path / 'link')
  with pytest.raises(outputs.OutputError):
    outputs.check_not_input('--output', str(tmp_path / 'link' / ann.name),
                            inputs)
  for fine in (tmp_path / 'run' / 'results.json',  # beside checkpoints/
               tmp_path / 'annotations_out.json', 'gs://b/results.json'):
    outputs.check_not_input('--output', str(fine), inputs)


def test_checkpoint_data_is_a_workdirs_checkpoints_folder(tmp_path):
  assert outputs.checkpoint_data(str(tmp_path)) == str(tmp_path)
  (tmp_path / 'checkpoints').mkdir()
  assert outputs.checkpoint_data(str(tmp_path)) == str(
      tmp_path / 'checkpoints')


def test_free_path(tmp_path):
  path = str(tmp_path / 'poses.json')
  assert outputs.free_path(path) == path
  (tmp_path / 'poses.json').write_text('mine')
  (tmp_path / 'poses_2.json').mkdir()
  assert outputs.free_path(path) == str(tmp_path / 'poses_3.json')
  taken = {os.path.realpath(tmp_path / 'poses_3.json')}
  assert outputs.free_path(path, taken) == str(tmp_path / 'poses_4.json')


@pytest.mark.parametrize('umask', [0o022, 0o027, 0o077])
def test_tempfile_outputs_get_the_umask_mode(tmp_path, umask):
  old = os.umask(umask)
  try:
    fd, file = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    folder = tempfile.mkdtemp(dir=tmp_path)
    outputs.apply_umask(file)
    outputs.apply_umask(folder)
    plain = tmp_path / 'plain'
    plain.write_text('')  # what open() gives under this umask
    (tmp_path / 'plain_dir').mkdir()
  finally:
    os.umask(old)
  mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
  assert mode(file) == mode(plain) == 0o666 & ~umask
  assert mode(folder) == mode(tmp_path / 'plain_dir') == 0o777 & ~umask

"""Careless use of the command-line scripts (issue 24's probe), each case
one `error:` line, found before any work (subprocess runs, tiny configs).

Most cases stop before JAX starts, in a second or two; the config checks
themselves are tested in-process in tests/test_config_checks.py.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys

from tests.conftest import run_signalled

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--config', 'configs/tiny.py']


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')
  env.pop('XLA_FLAGS', None)
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # the scripts' own defaults
  return env


def _run(args, timeout=300):
  return subprocess.run([sys.executable] + args, cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def _only_line(proc):
  """The one line the run printed (exit 1, nothing else: JAX not started)."""
  lines = (proc.stdout + proc.stderr).strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def _error_line(proc):
  """The run's one `error:` line (exit 1, no traceback)."""
  text = proc.stdout + proc.stderr
  assert proc.returncode == 1, text[-3000:]
  assert 'Traceback' not in text, text[-3000:]
  [line] = [l for l in text.splitlines() if l.startswith('error:')]
  return line


def test_config_file_errors_name_the_file(tmp_path):
  """Missing, not Python, without get_config, failing in it: one line
  before JAX starts (was 2 tracebacks / 52 lines, after JAX start-up)."""
  files = {'syntax.py': 'def get_config(:\n  pass\n',
           'noget.py': 'X = 1\n',
           'fails.py': 'def get_config():\n  return undefined_name\n'}
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  want = {
      'missing.py': ': no such file',
      'syntax.py': ': syntax error at line 1: invalid syntax',
      'noget.py': ' defines no get_config() (a config file defines '
                  'get_config() returning an ml_collections.ConfigDict, as '
                  'configs/default.py)',
      'fails.py': ": get_config() raised NameError at line 2: name "
                  "'undefined_name' is not defined"}
  for name, tail in want.items():
    config = tmp_path / name
    proc = _run(['train.py', '--workdir', str(tmp_path / 'w'), '--config',
                 str(config)])
    assert _only_line(proc) == f'error: --config {config}{tail}'
  proc = _run(['eval.py', '--ckpt', str(tmp_path), '--config',
               str(tmp_path / 'syntax.py')])
  assert _only_line(proc).endswith('syntax error at line 1: invalid syntax')
  assert not (tmp_path / 'w').exists()


def test_bad_config_values_stop_every_script_before_jax(tmp_path):
  """The probe's values, one per script: one line naming the key and its
  range (sigma 0 trained into a NaN after 100 s; an even NMS kernel was a
  JAX TypeError; max_people 0 an all-zero table with exit 0; scale 0.01
  asked for 39 GB)."""
  out = ['--out', str(tmp_path / 'o')]
  cases = [
      (['train.py', '--workdir', str(tmp_path / 'w'),
        '--config.data.sigma=0'],
       'error: config.data.sigma = 0.0: must be a number > 0'),
      (['eval.py', '--ckpt', str(tmp_path),
        '--config.test.grouping.nms_kernel=4'],
       'error: config.test.grouping.nms_kernel = 4: must be an odd integer '
       '>= 1 (a max-pool window centred on each pixel)'),
      (['demo.py', '--ckpt', str(tmp_path), 'a.jpg'] + out +
       ['--config.test.grouping.max_people=0'],
       'error: config.test.grouping.max_people = 0: must be an integer >= '
       '1'),
      (['export.py', '--ckpt', str(tmp_path), '--config.test.scales=(0.01,)']
       + out,
       'error: config.test.scales = (0.01,): scale 1 implies a 6400 px '
       'input side at config.test.input_size = 128 (the smallest scale is '
       'rounded up to 64 px, the others follow it); every side must be <= '
       '4096 px'),
  ]
  for args, want in cases:
    script, *rest = args
    assert _only_line(_run([script] + TINY + rest)) == want, script
  assert not (tmp_path / 'w').exists() and not (tmp_path / 'o').exists()


def test_init_checkpoint_pth_and_busy_port(tmp_path):
  pth = tmp_path / 'model.pth'
  pth.write_bytes(b'PK\x03\x04')
  proc = _run(['train.py', '--workdir', str(tmp_path / 'w')] + TINY +
              [f'--config.train.init_checkpoint={pth}'])
  assert _only_line(proc) == (
      f"error: config.train.init_checkpoint = '{pth}' is a file (a PyTorch "
      f'checkpoint?): convert it first, `python convert_torch_weights.py '
      f'{pth} OUT_DIR`, then pass --config.train.init_checkpoint=OUT_DIR')
  with socket.socket() as busy:  # jax 0.10.2 crashed (SIGSEGV) on it
    busy.bind(('127.0.0.1', 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    proc = _run(['train.py', '--workdir', str(tmp_path / 'w')] + TINY +
                [f'--coordinator_address=127.0.0.1:{port}',
                 '--num_processes=1', '--process_id=0'])
  assert _only_line(proc) == (
      f'error: --coordinator_address 127.0.0.1:{port}: port {port} is busy '
      'on this machine (another job, or an earlier run still ending?); pick '
      'another port for every process')
  assert not (tmp_path / 'w').exists()


def test_data_problems_are_found_before_training(tmp_path, coco_mini_root):
  """A missing val split (was: found after training) and a split whose
  images are all unreadable (was: a 76-line TF traceback)."""
  proc = _run(['train.py', '--workdir', str(tmp_path / 'w')] + TINY +
              ['--config.data.val_split=val2099'])
  line = _error_line(proc)
  assert line == (
      'error: COCO annotation file not found: data/coco_mini/annotations/'
      "person_keypoints_val2099.json (config.data.val_split = 'val2099', "
      'val_annotations, val_images)')
  assert 'Training' not in proc.stderr
  assert not (tmp_path / 'w').exists()
  root = tmp_path / 'coco'
  (root / 'val2017').mkdir(parents=True)
  os.symlink(coco_mini_root / 'annotations', root / 'annotations')
  for f in (coco_mini_root / 'val2017').iterdir():
    (root / 'val2017' / f.name).write_bytes(b'')
  proc = _run(['train.py', '--workdir', str(tmp_path / 'w2')] + TINY +
              [f'--config.data.coco_root={root}'])
  assert _error_line(proc).startswith(
      f'error: 4 of 4 images tried in {root}/val2017 could not be read '
      '(cannot decode image 000000000785.jpg (0 bytes), ...)')
  assert 'Training' not in proc.stderr


def test_outputs_that_are_inputs_are_refused(tmp_path, coco_mini_root):
  """Before any work; the input is untouched."""
  root = tmp_path / 'coco'
  (root / 'annotations').mkdir(parents=True)
  ann = root / 'annotations' / 'person_keypoints_val2017.json'
  ann.write_bytes(
      (coco_mini_root / 'annotations' / ann.name).read_bytes())
  os.symlink(coco_mini_root / 'val2017', root / 'val2017')
  before = ann.read_bytes()
  ckpt = tmp_path / 'run'
  (ckpt / 'checkpoints' / '2').mkdir(parents=True)
  proc = _run(['eval.py'] + TINY + ['--ckpt', str(ckpt), '--coco_root',
                                    str(root), '--output', str(ann)])
  assert _error_line(proc) == (
      f'error: --output {ann} is the annotation file {ann}, an input of this'
      ' run; write it elsewhere')
  assert ann.read_bytes() == before
  inside = ckpt / 'checkpoints' / '2' / 'x'
  for args in (['export.py', '--out', str(inside)],
               ['demo.py', '--out', str(inside), str(root / 'val2017')]):
    proc = _run(args[:1] + TINY + ['--ckpt', str(ckpt)] + args[1:])
    assert _error_line(proc) == (
        f'error: --out {inside} is inside the checkpoint {ckpt}/checkpoints,'
        ' an input of this run; write it elsewhere'), args[0]
  assert os.listdir(ckpt / 'checkpoints' / '2') == []


def test_ctrl_c_during_set_up_is_one_line(tmp_path):
  """Before the loop there is nothing to save: exit 130, one line."""
  returncode, text = run_signalled(
      ['train.py', '--workdir', str(tmp_path / 'w')] + TINY, 'JAX backend',
      signal.SIGINT, _env(), timeout=300)
  assert returncode == 130, text[-3000:]
  assert 'Traceback' not in text
  assert text.strip().splitlines()[-1] == (
      'error: interrupted (Ctrl-C) before a step could be saved; rerun the '
      'same command to resume from the last checkpoint')
  assert not (tmp_path / 'w' / 'train.lock').exists()

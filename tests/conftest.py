"""Shared test set-up: 8 simulated CPU devices, quiet TF, mini COCO path.

Also the helpers the training tests share: a small config and model, a
synthetic batch/dataset that follows the data contract, and a persistent
compile cache.
"""

import contextlib
import os
import pathlib
import shutil
import subprocess

# Must be set before jax is imported anywhere.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# The test extra installs libtpu (tests/test_aot_compile.py compiles for a
# TPU topology): JAX_PLATFORMS=cpu keeps every test process, and the
# subprocesses that inherit it, from initialising a TPU backend (a TPU-init
# warning per process otherwise); topologies.get_topology_desc still works
# under it. ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu's lock file would stop a
# second process (the other xdist worker, a subprocess) that loads it.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import pytest  # pylint: disable=g-import-not-at-top

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COCO_MINI = REPO_ROOT / 'data' / 'coco_mini'


# Modules by their measured time, longest first (bench/RESULTS.md, "Test
# suite time"; `python -m bench.suite_times` prints the order of a junit
# run); the rest follow in name order. Under pytest-xdist's `--dist
# loadfile --no-loadscope-reorder` (pyproject.toml) each worker takes the
# next module when it runs low: longest first, the two workers end within a
# short module of each other instead of one finishing a long one alone. A
# stale order costs only wall time.
LONGEST_FIRST = (
    'test_multihost.py', 'test_checkpoints.py', 'test_models.py',
    'test_aot_compile.py', 'test_convert.py', 'test_export.py',
    'test_train_step.py', 'test_train_cli.py', 'test_keypoints.py',
    'test_data_workers.py', 'test_accelerator_bench.py', 'test_sharding.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: (rank.get(item.path.name, len(rank)),
                               item.path.name))


# Prepended to a `python -c` script: from then on importing jax, flax,
# tensorflow or torch raises ImportError (tests of the JAX-free paths).
BLOCK_IMPORTS = '''
import importlib.abc
import sys

BLOCKED = ('jax', 'jaxlib', 'flax', 'tensorflow', 'torch')


class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError(f'blocked: {name}')
    return None


sys.meta_path.insert(0, Block())
'''


@pytest.fixture(scope='session')
def coco_mini_root() -> pathlib.Path:
  """The mini COCO (4 val2017 images, 14 person annotations) in the repo."""
  assert (COCO_MINI / 'annotations' / 'person_keypoints_val2017.json').exists()
  return COCO_MINI


@contextlib.contextmanager
def mounted_tmpfs(path, options: str):
  """A tmpfs mounted on `path` (e.g. 'size=3m', 'ro'), yields whether it
  could be (it needs root and a mount binary; tests skip otherwise)."""
  mounted = os.geteuid() == 0 and bool(shutil.which('mount')) and (
      subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs',
                      str(path)], capture_output=True, check=False
                     ).returncode == 0)
  try:
    yield mounted
  finally:
    if mounted:
      subprocess.run(['umount', str(path)], check=False)


def random_variables(model, seed: int = 0):
  """Random AEModel variables by shape (cheaper than compiling model.init).

  Weights ~ N(0, 0.2), BatchNorm statistics at identity (mean 0, var 1).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if 'var' in name:
      return np.ones(s.shape, np.float32)
    if 'mean' in name:
      return np.zeros(s.shape, np.float32)
    return (rng.normal(size=s.shape) * 0.2).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ------------------------------------------- train helpers (train_*/loop)
# test_train_*, test_checkpoints, test_sharding and test_train_cli share
# small_config's programs; the compile_cache fixture lets them reuse the
# compiled step across modules.

K, M = 17, 30


@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory):
  """One persistent XLA cache per test session (modules opt in with
  `pytestmark = pytest.mark.usefixtures('compile_cache')`), shared by the
  pytest-xdist workers (and the CLI subprocesses given it), so that a
  program one worker compiled the other loads."""
  import jax  # pylint: disable=g-import-not-at-top
  old = (jax.config.jax_compilation_cache_dir,
         jax.config.jax_persistent_cache_min_compile_time_secs)
  session_dir = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):  # .../pytest-N/popen-gwI
    session_dir = session_dir.parent
  jax.config.update('jax_compilation_cache_dir',
                    str(session_dir / 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  yield
  jax.config.update('jax_compilation_cache_dir', old[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', old[1])


def small_config(num_steps=2, ckpt_every=100, log_every=1):
  """configs/tiny.py narrowed further (64 px) for multi-run loop tests."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.num_deconv_filters = (16, 16, 16)
  config.data.input_size, config.data.heatmap_size = 64, 16
  config.data.augment = False
  config.train.num_steps = num_steps
  config.train.checkpoint_every_steps = ckpt_every
  config.train.log_every_steps = log_every
  config.train.eval_at_end = False
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 2
  config.optim.shard_opt_state = True  # exercised on the 8-device mesh
  return config


def small_model_and_lr():
  """small_config's model and schedule (4 mini COCO / synthetic examples
  at batch 8: 1 step per epoch), so that the single-step tests compile the
  same programs as train_and_evaluate on small_config."""
  from ae_jax.train import state as train_state  # pylint: disable=g-import-not-at-top
  from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top
  config = small_config()
  o = config.optim
  return ae_model.AEModel(**config.model), train_state.make_lr_schedule(
      o.lr, 1, o.warmup_steps, o.warmup_ratio, o.decay_epochs,
      o.decay_factor)


def _wh(size):
  """int S -> (S, S); (W, H) as given (config.data sizes)."""
  return (size, size) if isinstance(size, int) else tuple(size)


def synthetic_batch(seed, step, batch, input_size, heatmap_size,
                    nan=False):
  """One contract-conforming batch from (seed, step): a few people/image.

  Sizes are an int (square) or (w, h), as config.data.input_size. The
  image is float32 N(0, 1) (taken as already normalised by the step).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng([seed, step])
  in_w, in_h = _wh(input_size)
  w, h = _wh(heatmap_size)
  image = rng.normal(size=(batch, in_h, in_w, 3))
  heatmaps = np.zeros((batch, h, w, K), np.float32)
  joints = np.zeros((batch, M, K, 2), np.int32)
  yy, xx = np.mgrid[:h, :w]
  for b in range(batch):
    for p in range(rng.integers(0, 4)):
      xy = rng.integers(0, (w, h), size=(K, 2))
      vis = rng.uniform(size=K) > 0.3
      joints[b, p, :, 0] = np.arange(K) * h * w + xy[:, 1] * w + xy[:, 0]
      joints[b, p, :, 1] = vis
      for k in np.nonzero(vis)[0]:
        g = np.exp(-((xx - xy[k, 0])**2 + (yy - xy[k, 1])**2) / 8.0)
        heatmaps[b, :, :, k] = np.maximum(heatmaps[b, :, :, k], g)
  mask = np.ones((batch, h, w), np.float32)
  mask[:, : h // 4, : h // 4] = 0.0  # a crowd region
  if nan:
    image[0, 0, 0, 0] = np.nan
  return {'image': image.astype(np.float32), 'heatmaps': heatmaps,
          'mask': mask, 'joints': joints}


class SyntheticDataset:
  """Stands in for pipeline.make_train_dataset (same iteration contract):
  batch i of the stream is synthetic_batch(seed, i), so resume is exact."""

  def __init__(self, config, start_step, num_examples=4, hook=None,
               nan_steps=()):
    self.num_examples = num_examples
    self._config, self._start, self._hook = config, start_step, hook
    self._nan_steps = nan_steps

  def __iter__(self):
    c, step = self._config, self._start
    while True:
      if self._hook:
        self._hook(step)
      yield synthetic_batch(c.seed, step, c.train.global_batch_size,
                            c.data.input_size, c.data.heatmap_size,
                            nan=step in self._nan_steps)
      step += 1


def use_synthetic(monkeypatch, hook=None, nan_steps=()):
  """Makes loop.train_and_evaluate read SyntheticDataset."""
  from ae_jax.train import loop  # pylint: disable=g-import-not-at-top

  def make(config, start_step, spec=None):  # pylint: disable=unused-argument
    return SyntheticDataset(config, start_step, hook=hook,
                            nan_steps=nan_steps)
  monkeypatch.setattr(loop, 'make_dataset', make)


def read_train_checkpoint(workdir, step):
  """The raw state tree ({'step', 'params', 'batch_stats', 'opt_state'})
  of {workdir}/checkpoints/{step}, as host numpy arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(workdir).resolve() / 'checkpoints' / str(step) / 'state'
  with ocp.StandardCheckpointer() as ckptr:
    return jax.tree_util.tree_map(np.asarray, ckptr.restore(path))


def foreign_info_lines(text: str):
  """absl INFO lines of `text` not logged by ae_jax or a script (orbax,
  jax, TF chatter; cli.quiet_library_logs drops them below --verbosity 1).
  """
  import re  # pylint: disable=g-import-not-at-top
  ours = {p.name for p in (REPO_ROOT / 'ae_jax').rglob('*.py')}
  ours |= {p.name for p in REPO_ROOT.glob('*.py')}
  found = (re.match(r'I\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]', line)
           for line in text.splitlines())
  return [m.string for m in found if m and m.group(1) not in ours]


def run_signalled(argv, trigger: str, signum: int, env=None,
                  timeout: float = 600):
  """Runs `python argv...` in the repo, sends `signum` once a stderr line
  contains `trigger`; returns (exit status, stderr)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen([sys.executable] + list(argv), cwd=REPO_ROOT,
                          env=env, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True)
  try:
    lines = []
    for line in proc.stderr:
      lines.append(line)
      if trigger in line:
        proc.send_signal(signum)
        break
    lines.extend(proc.stderr)
    proc.wait(timeout=timeout)
  finally:
    proc.kill()
  return proc.returncode, ''.join(lines)

"""Train checkpoints: round trip, records (model config, keypoint spec),
exact resume after SIGTERM, NaN stop, incomplete steps, failed writes,
older checkpoints, workdir paths (local, URLs)."""

import asyncio
import gc
import os
import shutil
import signal

import numpy as np
import pytest

import jax
import optax
import orbax.checkpoint as ocp

from ae_jax import keypoints
from ae_jax import sharding
from ae_jax.models import shapes
from ae_jax.models.ae_model import AEModel
from ae_jax.train import checkpoints
from ae_jax.train import variables_checkpoint
from ae_jax.train import inference_checkpoint
from ae_jax.train import loop
from ae_jax.train import state as train_state
from tests.conftest import read_train_checkpoint
from tests.conftest import small_config
from tests.conftest import use_synthetic

pytestmark = pytest.mark.usefixtures('compile_cache')


@pytest.fixture(scope='module')
def full_run(tmp_path_factory, compile_cache):  # pylint: disable=redefined-outer-name,unused-argument
  """An uninterrupted small_config run of 4 steps, saved at steps 2, 3, 4
  (every step, the last 3 kept): the reference of the resume tests and the
  workdir they damage (in copies)."""
  workdir = tmp_path_factory.mktemp('full') / 'w'
  with pytest.MonkeyPatch.context() as monkeypatch:
    use_synthetic(monkeypatch)
    loop.train_and_evaluate(small_config(4, 1), str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '3', '4']
  return workdir


def _copy(workdir, tmp_path):
  target = tmp_path / 'copy'
  shutil.copytree(workdir, target)
  return target


def _truncate_biggest_file(folder):
  files = [p for p in folder.rglob('*') if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  data = biggest.read_bytes()
  biggest.write_bytes(data[:len(data) // 2])  # a truncated copy/upload


def _small_record(**model):
  """The Record of small_config's model (or of `model` overrides)."""
  config = dict(small_config().model, num_joints=17)
  config.update(model)
  return checkpoints.Record(config, keypoints.COCO)


def test_save_restore_round_trip(tmp_path):
  model = AEModel(widen_factor=0.25, num_deconv_filters=(16, 16, 16))
  mesh = sharding.make_mesh()
  replicated = sharding.replicated(mesh)
  tx = optax.adam(1e-3)
  state, _ = train_state.create_train_state(
      jax.random.key(0), model, tx, 64, mesh)
  state = state.replace(step=state.step + 7)
  record = _small_record()
  with checkpoints.TrainCheckpoints(str(tmp_path)) as ckpts:
    ckpts.save(7, state, {'data_position': 7}, record)
  with checkpoints.TrainCheckpoints(str(tmp_path)) as ckpts:
    resumed = ckpts.restore(replicated, record)
  restored, _ = train_state.state_from_checkpoint(resumed.tree, model, tx,
                                                  64, mesh)
  assert resumed.meta == {'data_position': 7} and resumed.step == 7
  assert int(restored.step) == 7
  assert resumed.record == record  # the checkpoint describes itself
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state)),
                  jax.tree_util.tree_leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(a, b)
  # The variables reader used by eval/init_checkpoint sees the same params.
  variables = checkpoints.restore_variables(str(tmp_path))
  np.testing.assert_array_equal(
      variables['params']['keypoint_head']['final_layer']['kernel'],
      jax.device_get(state.params['keypoint_head']['final_layer']['kernel']))
  # A different model does not silently load.
  with checkpoints.TrainCheckpoints(str(tmp_path)) as ckpts:
    with pytest.raises(checkpoints.CheckpointError, match='does not match'):
      ckpts.restore(replicated, _small_record(widen_factor=0.5))
    # Nor do other keypoints (another order of the same joints).
    other = keypoints.make_spec(keypoints.COCO.names[::-1])
    with pytest.raises(checkpoints.CheckpointError,
                       match=r'trained on other keypoints .*: names '
                       r"\('nose', .*\) there, \('right_ankle', .*\) here"):
      ckpts.restore(replicated, checkpoints.Record(record.model, other))


def test_first_save_compiles_nothing(tmp_path):
  """The replicated state is written whole by one replica: no XLA compile
  at the first save (orbax's default replica-parallel handler, run here
  as the reference on two replicated arrays, compiles slicing programs:
  16 for these two, ~260 for the whole train state)."""
  model = AEModel(widen_factor=0.25, num_deconv_filters=(16, 16, 16))
  mesh = sharding.make_mesh()
  state, _ = train_state.create_train_state(
      jax.random.key(0), model, optax.adam(1e-3), 64, mesh)
  reference = jax.device_put({'kernel': np.ones((3, 3, 8, 16), np.float32),
                              'bias': np.ones((16,), np.float32)},
                             sharding.replicated(mesh))
  compiles = []

  def count(event, duration, **kwargs):
    del duration, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    with checkpoints.TrainCheckpoints(tmp_path / 'ours') as ckpts:
      ckpts.save(1, state, {})
    ours = len(compiles)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp_path / 'orbax_default', reference)
    default = len(compiles) - ours
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  print(f'compiles at the first save: ours {ours}, orbax default {default}')
  assert ours == 0 and default > 0


def test_old_checkpoints_without_a_record_still_load(tmp_path, full_run):
  """A step written by plain orbax (StandardSave, no custom metadata), as
  before checkpoints described themselves: resume and readers take it."""
  state_tree = read_train_checkpoint(full_run, 4)
  manager = ocp.CheckpointManager(tmp_path / 'old' / 'checkpoints',
                                  item_names=('state', 'meta'))
  manager.save(4, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state_tree),
      meta=ocp.args.JsonSave({'step': 4, 'data_position': 4})))
  manager.close()
  with checkpoints.TrainCheckpoints(tmp_path / 'old') as ckpts:
    resumed = ckpts.restore(sharding.replicated(sharding.make_mesh()),
                           _small_record())
  assert resumed.step == 4 and resumed.record is None
  for a, b in zip(jax.tree_util.tree_leaves(state_tree),
                  jax.tree_util.tree_leaves(jax.device_get(resumed.tree))):
    np.testing.assert_array_equal(a, b)
  found = checkpoints.read_checkpoint(tmp_path / 'old')
  assert found.record is None and found.step == 4
  with ocp.StandardCheckpointer() as ckptr:  # an old variables checkpoint
    ckptr.save(tmp_path / 'vars', {'params': state_tree['params'],
                                   'batch_stats': state_tree['batch_stats']})
  found = checkpoints.read_checkpoint(tmp_path / 'vars')
  assert found.record is None and found.step is None
  np.testing.assert_array_equal(
      found.tree['params']['backbone']['conv1']['conv']['kernel'],
      state_tree['params']['backbone']['conv1']['conv']['kernel'])


def test_a_failed_save_is_one_error_and_leaves_no_partial_step(
    tmp_path, monkeypatch, caplog):
  """An I/O error while orbax writes (asynchronously): one CheckpointError
  naming the folder and the cause, no orbax traceback logged, no
  half-written step left; the steps saved before stay."""
  model = AEModel(widen_factor=0.25, num_deconv_filters=(16, 16, 16))
  state, _ = train_state.create_train_state(
      jax.random.key(0), model, optax.adam(1e-3), 64, sharding.make_mesh())
  with checkpoints.TrainCheckpoints(tmp_path) as ckpts:
    ckpts.save(1, state, {})
  handler = ocp.type_handlers.ArrayHandler

  async def no_space(self, *args, **kwargs):
    del self, args, kwargs
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(handler, 'serialize', no_space)
  caplog.set_level('ERROR')
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'^cannot write a checkpoint to .*checkpoints: '
                     r'.*No space left on device'):
    with checkpoints.TrainCheckpoints(tmp_path) as ckpts:
      ckpts.save(2, state, {})
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
  assert not [r for r in caplog.records if 'orbax' in r.pathname]


def test_sigterm_then_resume_matches_uninterrupted(tmp_path, monkeypatch,
                                                   full_run):
  def preempt(step):
    if step == 2:  # read 2 ahead (prefetch): while step 2 is prepared
      os.kill(os.getpid(), signal.SIGTERM)

  use_synthetic(monkeypatch, hook=preempt)
  workdir = str(tmp_path / 'resumed')
  first = loop.train_and_evaluate(small_config(4, 100), workdir)
  assert first['preempted'] and first['final_step'] == 2
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']
  use_synthetic(monkeypatch)
  second = loop.train_and_evaluate(small_config(4, 100), workdir)
  assert second['start_step'] == 2 and second['final_step'] == 4
  # Params, BN statistics, Adam moments and step of the final checkpoints.
  want = read_train_checkpoint(full_run, 4)
  got = read_train_checkpoint(workdir, 4)
  assert (jax.tree_util.tree_structure(got) ==
          jax.tree_util.tree_structure(want))
  for a, b in zip(jax.tree_util.tree_leaves(want),
                  jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_nan_stops_training_and_keeps_last_good(tmp_path, monkeypatch):
  # NaN input at data step 2 (the 3rd update); checks run at checkpoint
  # steps (2, 4) only, so the error must name step 3 inside window 3..4.
  use_synthetic(monkeypatch, nan_steps=(2,))
  workdir = str(tmp_path / 'nan')
  with pytest.raises(loop.NonFiniteLossError,
                     match=r'non-finite total_loss = nan at step 3 \(window '
                     r'checked: steps 3..4\).*last good checkpoint: step 2'):
    loop.train_and_evaluate(small_config(6, 2, log_every=100), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']
  variables = checkpoints.restore_variables(workdir)
  assert all(np.all(np.isfinite(x))
             for x in jax.tree_util.tree_leaves(variables))


def test_workdir_urls_are_not_turned_into_local_paths(tmp_path, monkeypatch):
  """gs:// / s3:// workdirs reach orbax as the same URL (no os.path).

  Only the path handling is tested offline: orbax writes gs:// through
  TensorStore's GCS driver and lists it through epath (tf.io.gfile), both
  of which need the network; no remote file is written here.
  """
  monkeypatch.chdir(tmp_path)
  for url in ('gs://bucket/ae', 's3://bucket/runs/ae'):
    assert str(checkpoints.as_path(url)) == url
    assert str(checkpoints.as_path(url + '/')) == url
    assert str(checkpoints.as_path(url) / 'checkpoints') == url + '/checkpoints'
  assert checkpoints.as_path('runs/ae') == tmp_path / 'runs' / 'ae'
  assert str(checkpoints.as_path('~/ae')) == os.path.expanduser('~/ae')
  seen = {}

  class Recorder:
    def __init__(self, directory, **kwargs):
      del kwargs
      seen['directory'] = directory

    def close(self):
      seen['closed'] = True

  monkeypatch.setattr(checkpoints.ocp, 'CheckpointManager', Recorder)
  with checkpoints.TrainCheckpoints('gs://bucket/ae'):
    pass
  assert seen['closed']
  assert str(seen['directory']) == 'gs://bucket/ae/checkpoints'


def test_variables_round_trip_through_epath_and_relative_paths(
    tmp_path, monkeypatch):
  """Local workdirs given as relative strings or epath.Path objects."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  variables = {'params': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)},
               'batch_stats': {'mean': np.ones(3, np.float32)}}
  variables_checkpoint.save_variables('rel/vars', variables)
  assert (tmp_path / 'rel' / 'vars').is_dir()
  restored = checkpoints.restore_variables(epath.Path(tmp_path) / 'rel' /
                                           'vars')
  np.testing.assert_array_equal(restored['params']['w'],
                                variables['params']['w'])
  np.testing.assert_array_equal(restored['batch_stats']['mean'],
                                variables['batch_stats']['mean'])
  with pytest.raises(checkpoints.CheckpointError, match='not found: /'):
    checkpoints.restore_variables('rel/missing')


def _delay_good_reads(monkeypatch, seconds=1.0):
  """orbax reads that succeed return `seconds` late: a failing read ends
  orbax's gather first, with the others still running (the race a loaded
  machine or remote storage gives)."""
  from orbax.checkpoint._src.serialization import serialization  # pylint: disable=g-import-not-at-top
  read = serialization._read_shard  # pylint: disable=protected-access

  async def late(*args, **kwargs):
    out = await read(*args, **kwargs)
    await asyncio.sleep(seconds)
    return out
  monkeypatch.setattr(serialization, '_read_shard', late)


def test_incomplete_newest_steps_are_skipped_and_moved_aside(
    tmp_path, monkeypatch, caplog, capfd, full_run):
  """A truncated data file in the newest step and an empty (half-copied)
  newer folder: one warning per bad step, nothing else printed (no orbax
  or asyncio traceback, even with slow reads), resume from the newest
  intact step, which then matches the uninterrupted run."""
  workdir = _copy(full_run, tmp_path)
  ckpt = workdir / 'checkpoints'
  _truncate_biggest_file(ckpt / '4' / 'state')
  (ckpt / '5').mkdir()
  _delay_good_reads(monkeypatch)
  use_synthetic(monkeypatch)
  caplog.set_level('WARNING')
  capfd.readouterr()
  summary = loop.train_and_evaluate(small_config(4, 1), str(workdir))
  gc.collect()  # where orbax's abandoned reads would report themselves
  assert summary['start_step'] == 3 and summary['final_step'] == 4
  warnings = [r.getMessage() for r in caplog.records
              if 'incomplete checkpoint' in r.getMessage()]
  assert len(warnings) == 2, warnings
  assert warnings[0].startswith('Skipping incomplete checkpoint step 5: ')
  assert warnings[1].startswith('Skipping incomplete checkpoint step 4: ')
  assert 'OUT_OF_RANGE' in warnings[1]  # TensorStore's cause, not orbax's
  assert all(len(w.splitlines()) == 1 for w in warnings)
  assert not [r for r in caplog.records if r.name == 'asyncio'], [
      r.getMessage()[:200] for r in caplog.records if r.name == 'asyncio']
  out, err = capfd.readouterr()
  for text in ('Traceback', 'Task exception', 'Event loop is closed',
               'was never retrieved', 'destroyed but it is pending'):
    assert text not in out + err, (out + err)[-3000:]
  assert {'4.incomplete', '5.incomplete'} <= set(os.listdir(ckpt))
  assert '4' in os.listdir(ckpt)  # written again on resume
  want = read_train_checkpoint(full_run, 4)
  got = read_train_checkpoint(workdir, 4)
  for a, b in zip(jax.tree_util.tree_leaves(want),
                  jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_readers_take_the_newest_complete_step(tmp_path, caplog, full_run):
  """restore_variables (eval, demo, export) skips a truncated newest step
  with one warning and moves nothing; a truncated variables checkpoint or
  a workdir without a complete step is one CheckpointError."""
  workdir = _copy(full_run, tmp_path)
  _truncate_biggest_file(workdir / 'checkpoints' / '4' / 'state')
  caplog.set_level('WARNING')
  variables = checkpoints.restore_variables(workdir)
  [warning] = [r.getMessage() for r in caplog.records
               if 'incomplete checkpoint' in r.getMessage()]
  assert warning.startswith('Skipping incomplete checkpoint step 4: ')
  assert warning.endswith('(using step 3).')
  want = read_train_checkpoint(full_run, 3)
  for a, b in zip(jax.tree_util.tree_leaves(want['params']),
                  jax.tree_util.tree_leaves(variables['params'])):
    np.testing.assert_array_equal(b, a)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '3', '4']
  # What eval/demo/export check next: the variables fit config.model
  # (as recorded; an older checkpoint without the record: as configured).
  model = dict(small_config().model, num_joints=17)
  assert shapes.mismatch(shapes.shapes_of(variables),
                         shapes.model_shapes(model)) is None
  unrecorded = tmp_path / 'unrecorded'
  variables_checkpoint.save_variables(unrecorded, variables)
  other = small_config()
  other.model.widen_factor, other.model.num_deconv_filters = 0.5, (32,) * 3
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'^.*unrecorded does not fit config.model: .* '
                     r'arrays differ\); the checkpoint implies config.model.'
                     r'widen_factor=0.25, config.model.num_deconv_filters='
                     r'\(16, 16, 16\)$'):
    inference_checkpoint.load_for_inference(str(unrecorded), other)
  for step in ('2', '3'):
    _truncate_biggest_file(workdir / 'checkpoints' / step / 'state')
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'no complete training checkpoint in .*step 4: '
                     r'.*OUT_OF_RANGE'):
    checkpoints.restore_variables(workdir)
  saved = tmp_path / 'vars'
  variables_checkpoint.save_variables(saved, variables)
  _truncate_biggest_file(saved)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'vars: OUT_OF_RANGE: .*\(a truncated or '
                     r'corrupt copy\?\)$'):
    checkpoints.restore_variables(saved)


def test_checkpoint_of_another_model_is_not_skipped(tmp_path, monkeypatch,
                                                    full_run):
  """A readable step of another width is a config error, not 'incomplete'
  (no silent fall back to older steps)."""
  use_synthetic(monkeypatch)
  workdir = _copy(full_run, tmp_path)
  other = small_config(5, 1)
  other.model.widen_factor = 0.5
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'checkpoints/4 does not match this model/'
                     r'optimizer config: \S+ is \(8,\) there, \(16,\) '
                     r'here \(\d+ arrays differ\); the checkpoint implies '
                     r'config.model.widen_factor=0.25$'):
    loop.train_and_evaluate(other, str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '3', '4']

"""The training loop: `train_and_evaluate(config, workdir)`.

Stages: data (`make_dataset` -> ae_jax.data.pipeline) -> model, TrainState
and the jitted step on a ('data',) mesh (ae_jax.train.program) -> orbax
checkpoints (ae_jax.train.checkpoints) -> COCO eval at the end
(ae_jax.infer.predict, ae_jax.infer.coco_eval).

Outputs under `workdir` (a local path or a URL such as gs://; paths go
through etils.epath):
  checkpoints/{step}/   orbax train checkpoints (resume, eval.py --ckpt)
  tensorboard/          scalars of every log step (metric_writer.py)
  summary.json          the run summary with a per-log-step `history`
  results_{split}.json  predictions of the end-of-training eval
  train.lock            pid/host of the running trainer (ae_jax.train.workdir_lock)
TensorBoard scalars and summary.json are written by process 0 only.

Resume takes the newest usable checkpoint, read once
(ae_jax.train.checkpoints.TrainCheckpoints.restore: an empty, half-written
or truncated newer step is skipped with a warning and moved aside); every
checkpoint records the model config and keypoint spec of the run. Preemption
(SIGTERM to any one process) stops every process after the same step, saves
it and returns with summary['preempted'] (train.py then exits with
PREEMPTED_EXIT_CODE).
"""

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any, Dict, List, Sequence

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from ae_jax import config_checks
from ae_jax import keypoints
from ae_jax import sharding
from ae_jax.data import coco
from ae_jax.data import pipeline
from ae_jax.infer import coco_eval
from ae_jax.infer import predict
from ae_jax.models.ae_model import AEModel
from ae_jax.train import checkpoints
from ae_jax.train import metric_writer
from ae_jax.train import program as train_program
from ae_jax.train import state as train_state
from ae_jax.train import workdir_lock


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf metric; the last good checkpoint is kept."""


def check_finite(window: Sequence[Dict[str, float]], first_step: int) -> None:
  """Raises NonFiniteLossError naming the first non-finite metric/step."""
  for offset, metrics in enumerate(window):
    # Losses first: a NaN loss makes every later metric NaN as well.
    names = sorted(metrics, key=lambda n: (not n.endswith('_loss'),
                                           n != 'total_loss', n))
    for name in names:
      value = metrics[name]
      if not np.isfinite(value):
        last = first_step + len(window) - 1
        raise NonFiniteLossError(
            f'non-finite {name} = {value} at step {first_step + offset} '
            f'(window checked: steps {first_step}..{last})')


def make_dataset(config: ml_collections.ConfigDict, start_step: int,
                 spec: keypoints.KeypointSpec = keypoints.COCO):
  """The train pipeline for `config.data` (host-local batches).

  Batch s of the stream is a pure function of (config.seed, s), so the
  dataset built at `start_step` needs no saved iterator state; each
  `iter()` of it starts config.data.workers input processes (stopped by
  the iterator's close()). Kept as a module function so tests can
  substitute synthetic data.
  """
  d = config.data
  return pipeline.make_train_dataset(
      d.coco_root, d.train_split, input_size=d.input_size,
      heatmap_size=d.heatmap_size, max_people=d.max_people,
      rot_factor=d.rot_factor, scale_factor=tuple(d.scale_factor),
      scale_type=d.scale_type, trans_factor=d.trans_factor,
      flip_prob=d.flip_prob, augment=d.augment,
      global_batch_size=config.train.global_batch_size, seed=config.seed,
      start_step=start_step, source=d.source,
      tfds_data_dir=d.tfds_data_dir,
      workers=d.workers, flip_index=spec.flip_index,
      annotations=d.train_annotations, images=d.train_images)


# train.py's exit status after a preemption was saved (128 + SIGTERM, what a
# shell reports for a job ended by SIGTERM): schedulers requeue on it.
PREEMPTED_EXIT_CODE = 143


class _StopFlag:
  """Preemption or Ctrl-C: a SIGTERM or SIGINT stops all at the same step.

  One process: a SIGTERM / SIGINT handler sets a flag the loop reads after
  every step. Several processes: jax.distributed's preemption service
  catches SIGTERM itself (a Python handler would replace it) and tells
  every process the same step to stop at (the maximum step any process has
  reached, plus one); `reached(step)` is asked after every step, so no
  process goes on into collectives the others never join. A SIGINT is
  passed on to it as a SIGTERM to this process. `signal` names the signal
  this process got (train.py: exit 130 for SIGINT, 143 otherwise); a
  second Ctrl-C stops at once (KeyboardInterrupt), without saving.
  """

  def __init__(self):
    self.requested = False
    self.signal = None
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in ((signal.SIGINT,) if self._multi else
                     (signal.SIGINT, signal.SIGTERM)):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. `cmd &`
          self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (same on every process)."""
    if self._multi and not self.requested:
      if multihost_utils.reached_preemption_sync_point(step):
        logging.warning('Preemption: every process stops after step %d and '
                        'saves it.', step)
        self.requested = True
    return self.requested

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if signum == signal.SIGINT and self.signal == 'SIGINT':
      raise KeyboardInterrupt  # the second Ctrl-C
    self.signal = signal.Signals(signum).name
    again = (' (Ctrl-C again: stop now, without saving)'
             if signum == signal.SIGINT else '')
    logging.warning('%s: saving a checkpoint after this step%s.',
                    'Ctrl-C' if again else self.signal, again)
    if self._multi:  # the preemption service picks the step for all
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.requested = True

  def __exit__(self, *exc):
    """Restores the previous handlers (Ctrl-C interrupts again)."""
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def describe_spec(spec: keypoints.KeypointSpec) -> str:
  """One line: the joints, flip pairs and OKS sigmas of a keypoint spec."""
  pairs = [f'{spec.names[i]}/{spec.names[j]}'
           for i, j in enumerate(spec.flip_index) if i < j]
  return (f'{spec.num_joints} joints {", ".join(spec.names)}; flip pairs '
          f'{", ".join(pairs) or "none"}; OKS sigmas '
          f'{", ".join(f"{s:.3g}" for s in spec.sigmas)}')


def evaluate_state(config: ml_collections.ConfigDict, workdir: epath.Path,
                   model: AEModel, state: train_state.TrainState,
                   spec: keypoints.KeypointSpec = keypoints.COCO
                   ) -> Dict[str, float]:
  """COCO keypoint AP of the trained variables on config.data.val_split.

  Host-side grouping and scoring (ae_jax.infer.predict / ae_jax.infer.coco_eval);
  run on single-process jobs only (multi-host: run eval.py on the workdir).
  Writes {workdir}/results_{split}.json.
  """
  if jax.process_count() > 1:
    logging.info('eval_at_end: multi-process run; use eval.py --ckpt %s.',
                 workdir)
    return {}
  variables = jax.device_get({'params': state.params,
                              'batch_stats': state.batch_stats})
  predictor = predict.Predictor(model, variables, predict.PredictOptions(
      **config.test, flip_index=spec.flip_index))
  split = config.data.val_split
  metrics, _ = coco_eval.evaluate(
      predictor.stream, config.data.coco_root, split,
      output_path=str(workdir / f'results_{split}.json'),
      sigmas=spec.sigmas, annotations=config.data.val_annotations,
      images=config.data.val_images)
  logging.info('COCO %s:\n%s', split, coco_eval.format_table(metrics))
  return {k: float(v) for k, v in metrics.items()}


def skipped_images(dataset) -> Dict[str, int]:
  """Images skipped so far, by reason, over all processes.

  The index filtering (no people, crowd only) is the same on every
  process; files replaced at run time (missing, corrupt, wrongly sized;
  counted by each process from its workers' reports) are summed.
  """
  counts = dict(getattr(dataset, 'skipped', None) or {})
  if jax.process_count() > 1:
    runtime = [coco.MISSING, coco.CORRUPT, coco.SIZE_MISMATCH]
    skips = getattr(dataset, 'skips', None)
    local = [skips.counts.get(r, 0) if skips else 0 for r in runtime]
    total = np.asarray(multihost_utils.process_allgather(
        np.asarray(local, np.int64))).reshape(-1, len(runtime)).sum(0)
    for reason, here, n in zip(runtime, local, total):
      counts[reason] = counts.get(reason, 0) - here + int(n)
  return {k: int(v) for k, v in sorted(counts.items()) if v}


def _start_state(config, resumed, program, mesh, rng):
  """The resumed step's state, else a new one (initialised from
  config.train.init_checkpoint's weights if set), placed as
  `program.state_shardings`."""
  if resumed is not None:
    if int(resumed.meta['data_position']) != resumed.step:
      raise checkpoints.CheckpointError(
          f'checkpoint {resumed.step}: data_position '
          f'{resumed.meta["data_position"]} != step')
    return train_state.place_state(resumed.tree, program.abstract_state,
                                   program.state_shardings)
  state = train_state.init_on_mesh(program.init_fn, rng,
                                   program.state_shardings)
  # A strong int32 step (flax's is weak-typed), as a restored one: fresh
  # and resumed runs then compile the same step (one persistent-cache
  # entry, which the reruns of a preempted job load).
  state = state.replace(step=sharding.put_replicated(np.int32(0), mesh))
  if config.train.init_checkpoint:
    state, loaded = train_state.load_pretrained(
        state, checkpoints.restore_variables(config.train.init_checkpoint),
        config.train.init_checkpoint)
    logging.info('%s', loaded)
  return state


def _log_step(pending: List[Dict[str, jax.Array]], step: int,
              total_steps: int, t_window: float, global_batch: int,
              is_main: bool):
  """The one host sync of a log step, for the steps since the last log.

  Checks their metrics (NonFiniteLossError), averages them, adds
  images_per_sec and logs one line on process 0.

  Returns:
    (window: the per-step host metrics, mean: their means, now: the time
    after the sync).
  """
  window = [{k: float(v) for k, v in m.items()}
            for m in jax.device_get(pending)]
  check_finite(window, step - len(window) + 1)
  now = time.time()
  mean = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
  mean['images_per_sec'] = len(window) * global_batch / max(
      now - t_window, 1e-9)
  if is_main:
    eta = (total_steps - step) * (now - t_window) / len(window)
    logging.info(
        'step %d/%d  loss %.4g (hm %.4g push %.3g pull %.3g)  lr %.3g  '
        '%.2f img/s  ETA %.0fs', step, total_steps, mean['total_loss'],
        mean['heatmap_loss'], mean['push_loss'], mean['pull_loss'],
        mean['lr'], mean['images_per_sec'], eta)
  return window, mean, now


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: epath.PathLike, *,
                       kernels: str = 'flax') -> Dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), then evals.

  Args:
    config: a configs/*.py config.
    workdir: where checkpoints, TensorBoard scalars and summary.json go.
    kernels: 'flax' or 'cpu', the layer kernels of the model (chosen by
      the entry point for its backend; ae_model.create_model).

  Returns:
    The summary written to {workdir}/summary.json (host values only):
    start/final/total steps, preempted, first/last loss, seconds,
    images_per_sec, last_checkpoint, history (one entry per log step:
    step, the mean metrics of the steps since the last log, images/s) and
    eval (the COCO metrics, if eval_at_end ran) and skipped_images
    (reason -> images skipped, all processes).

  Raises:
    config_checks.ConfigError: a config value that cannot work (names it).
    workdir_lock.WorkdirError: another trainer uses `workdir`, or it
      cannot be used (a file, converted weights, not writable).
    checkpoints.CheckpointError: the newest usable checkpoint holds
      another model or keypoints; a checkpoint could not be written.
    NonFiniteLossError: a NaN/inf metric; the last good checkpoint stays.
  """
  workdir = checkpoints.as_path(workdir)
  t = config.train
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh()
  config_checks.check_train_config(config, mesh.size, jax.process_count())
  global_batch = t.global_batch_size
  # Every resource is closed here, in reverse order, also on errors; the
  # checkpoints' close waits for the asynchronous saves.
  with contextlib.ExitStack() as resources:
    resources.enter_context(workdir_lock.WorkdirLock(workdir))
    spec = coco.resolve_spec(config.data)  # the one source of K
    if is_main:
      logging.info('Keypoints (%s): %s', config.data.keypoints.source,
                   describe_spec(spec))
    record = checkpoints.Record(
        {**config.model, 'num_joints': spec.num_joints}, spec)
    ckpts = resources.enter_context(checkpoints.TrainCheckpoints(
        workdir, t.keep_checkpoints))
    # One scan for the newest usable step, which is read once.
    resumed = ckpts.restore(sharding.replicated(mesh), record)
    start_step = step = resumed.step if resumed else 0
    dataset = make_dataset(config, start_step, spec)
    num_examples = int(dataset.num_examples)
    epoch_steps = train_state.steps_per_epoch(num_examples, global_batch)
    total_steps = config_checks.total_steps(t, epoch_steps)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    # The same function builds the step that ae_jax.aot.compiler compiles.
    program = train_program.make_train_program(
        config, mesh, num_joints=spec.num_joints, epoch_steps=epoch_steps,
        kernels=kernels, init_rng=init_rng)
    model = program.model
    state = _start_state(config, resumed, program, mesh, init_rng)
    if resumed:
      logging.info('Resumed from %s at step %d.', ckpts.directory,
                   start_step)
    last_good = resumed.step if resumed else None
    step_fn = program.step_fn
    step_rng = sharding.put_replicated(step_rng, mesh)
    writer = metric_writer.make_metric_writer(workdir / 'tensorboard', is_main)
    resources.callback(writer.close)
    data_iter = sharding.prefetch_to_mesh(iter(dataset), mesh, size=2)
    if hasattr(data_iter, 'close'):
      resources.callback(data_iter.close)
    stop = resources.enter_context(_StopFlag())
    logging.info('Training %d -> %d steps (%d examples, %d steps/epoch, '
                 'global batch %d on %d devices, %d processes).',
                 start_step, total_steps, num_examples, epoch_steps,
                 global_batch, mesh.size, jax.process_count())
    if step < total_steps:
      logging.info('Compiling the train step (tens of seconds on a CPU); '
                   'step %d follows.', step + 1)

    history, pending = [], []
    first_loss = last_loss = None
    preempted = False
    t_start = t_window = time.time()
    run_step = None
    try:
      while step < total_steps and not preempted:
        batch = next(data_iter)  # on the devices, 2 batches ahead
        run_step = run_step or train_program.compile_step(
            step_fn, state, batch, step_rng)
        state, metrics = run_step(state, batch, step_rng)
        pending.append(metrics)  # device arrays until the next log step
        step += 1
        preempted = stop.reached(step)
        save = (preempted or step == total_steps or
                step % t.checkpoint_every_steps == 0)
        if save or step % t.log_every_steps == 0:
          window, mean, t_window = _log_step(
              pending, step, total_steps, t_window, global_batch, is_main)
          pending = []
          if first_loss is None:
            first_loss = window[0]['total_loss']
          last_loss = window[-1]['total_loss']
          history.append({'step': step, **mean})
          writer.write_scalars(step, mean)
          writer.flush()
        if save:
          ckpts.save(step, state, {
              'step': step, 'data_position': step, 'seed': config.seed,
              'global_batch_size': global_batch}, record)
          last_good = step
    except NonFiniteLossError as e:
      kept = (f'last good checkpoint: step {last_good} in '
              f'{workdir / "checkpoints"} (no checkpoint was written after '
              'it)') if last_good is not None else (
                  'no checkpoint exists yet (a rerun starts over)')
      raise NonFiniteLossError(
          f'{e}. Training stopped; {kept}. Likely causes: a learning rate '
          f'too high for the batch (config.optim.lr = {config.optim.lr:g})'
          ' or a target sigma too small for the heatmap (config.data.sigma '
          f'= {config.data.sigma:g})') from None
    stop.__exit__()  # Ctrl-C from here on (end-of-training eval): stop now

    elapsed = time.time() - t_start
    summary = {
        'start_step': start_step, 'final_step': step,
        'total_steps': total_steps, 'preempted': preempted,
        'first_loss': first_loss, 'last_loss': last_loss,
        'seconds': elapsed,
        'images_per_sec': ((step - start_step) * global_batch /
                           max(elapsed, 1e-9)),
        'last_checkpoint': last_good, 'history': history,
        'stop_signal': stop.signal,
        'skipped_images': skipped_images(dataset)}
    if t.eval_at_end and not preempted and step == total_steps:
      summary['eval'] = evaluate_state(config, workdir, model, state, spec)
      writer.write_scalars(
          step, {f'eval/{k}': v for k, v in summary['eval'].items()})

  if is_main:
    logging.info('Done: steps %d->%d, loss %s -> %s, %.1fs, %.2f img/s%s.',
                 start_step, step, first_loss, last_loss, elapsed,
                 summary['images_per_sec'],
                 ' (preempted, saved)' if preempted else '')
    skipped = summary['skipped_images']
    logging.info('Skipped images: %d%s.', sum(skipped.values()),
                 ''.join(f', {n} {r}' for r, n in skipped.items()))
    (workdir / 'summary.json').write_text(json.dumps(summary, indent=1))
  return summary

"""Training: TrainState, lr schedule, sharded train_step, the train loop.

Stages: data (ae_jax.data.pipeline) -> AEModel -> losses -> jitted step on
a ('data',) mesh -> orbax checkpoints (ae_jax.checkpoints).

BatchNorm choice: under `jax.jit` with the batch split over 'data', flax's
BatchNorm computes its mean/variance over the *global* batch (XLA inserts
the all-reduce). mmpose trains with plain DDP BatchNorm, i.e. statistics
over the 24 images of one GPU. We keep global statistics: the step is then
independent of the device count (1 device == 8 devices, tested), and at
the paper's global batch of 192 the estimate is only less noisy. Running
statistics use PyTorch's momentum (0.1), so they converge alike.

Legend: B global batch, S input size, h heatmap size, K=17 joints, M=30
people. Batch: image [B, S, S, 3] uint8 RGB (normalised on device by
ae_model.normalize_images; float32 input is taken as normalised), mask
[B, h, h] uint8/float32, keypoints [B, M, K, 3] float32, from which the step
renders heatmaps [B, h, h, K] float32 and joints [B, M, K, 2] int32
(data/device_targets.py); a batch may carry heatmaps and joints instead.
"""

import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

from absl import logging
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ae_jax import checkpoints
from ae_jax import losses
from ae_jax import sharding
from ae_jax.data import device_targets
from ae_jax.data import transforms
from ae_jax.models import layers
from ae_jax.models.ae_model import AEModel
from ae_jax.models.ae_model import normalize_images


class TrainState(train_state.TrainState):
  """flax TrainState plus BatchNorm running statistics."""
  batch_stats: Any


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf metric; the last good checkpoint is kept."""


# ----------------------------------------------------------------- schedule


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Iterations per epoch; mmpose's train loader keeps the last partial
  batch (drop_last=False), hence the ceiling."""
  return max(1, math.ceil(num_examples / global_batch_size))


def scaled_lr(lr: float, global_batch_size: int, base_batch_size: int,
              scale_lr: bool) -> float:
  """Linear lr scaling for a global batch other than mmpose's 192."""
  return lr * global_batch_size / base_batch_size if scale_lr else lr


def make_lr_schedule(base_lr: float, num_steps_per_epoch: int,
                     warmup_steps: int = 500, warmup_ratio: float = 0.001,
                     decay_epochs: Sequence[int] = (200, 260),
                     decay_factor: float = 0.1) -> optax.Schedule:
  """mmcv 'step' policy with linear warmup, as an optax schedule.

  mmcv computes the step lr per epoch (base * factor^#(decay epochs <=
  epoch)) and, during the first `warmup_steps` iterations i, multiplies it
  by 1 - (1 - i / warmup_steps) * (1 - warmup_ratio). The optax count is
  the number of updates done, i.e. mmcv's runner.iter.

  Args:
    base_lr: lr after warmup (already batch-scaled if wanted).
    num_steps_per_epoch: converts decay epochs to steps.
    warmup_steps: lr_config.warmup_iters (0 disables warmup).
    warmup_ratio: lr_config.warmup_ratio.
    decay_epochs: lr_config.step.
    decay_factor: the step policy's gamma.

  Returns:
    step -> lr.
  """
  boundaries = [int(e) * num_steps_per_epoch for e in decay_epochs]
  stages = [optax.constant_schedule(base_lr * decay_factor**i)
            for i in range(len(boundaries) + 1)]
  step_lr = optax.join_schedules(stages, boundaries)
  if warmup_steps <= 0:
    return step_lr

  def warmup_factor(count):
    # ratio + (1 - ratio) * i / W, the same line as mmcv's expression;
    # optax.linear_schedule's (a - b) * (1 - i / W) + b form loses ~1e-5
    # relative precision to float32 cancellation in the first steps.
    frac = jnp.minimum(jnp.asarray(count, jnp.float32), warmup_steps)
    return warmup_ratio + (1.0 - warmup_ratio) * frac / warmup_steps

  return lambda count: step_lr(count) * warmup_factor(count)


# -------------------------------------------------------------- train state


def create_train_state(rng: jax.Array, model: AEModel,
                       tx: optax.GradientTransformation, input_size,
                       mesh: jax.sharding.Mesh,
                       shard_opt_state: bool = False):
  """Initialises a TrainState already placed on `mesh`.

  The abstract state comes from `jax.eval_shape`; `jax.jit` of the same
  init function with `out_shardings` then builds it in place (no host copy
  of the full state, no replicated-then-resharded arrays).

  Args:
    rng: init key.
    model: the AE model.
    tx: the optimizer.
    input_size: config.data.input_size, int S (square) or (W, H).
    mesh: device mesh.
    shard_opt_state: shard the Adam moments over 'data'.

  Returns:
    (state, state_shardings).
  """
  width, height = transforms.as_wh(input_size)

  def init(key):
    dummy = jnp.zeros((1, height, width, 3), jnp.float32)
    variables = model.init(key, dummy, train=False)
    return TrainState.create(apply_fn=model.apply,
                             params=variables['params'], tx=tx,
                             batch_stats=variables['batch_stats'])

  abstract = jax.eval_shape(init, rng)
  shardings = sharding.state_shardings(abstract, mesh, shard_opt_state)
  lowered = jax.jit(init, out_shardings=shardings).lower(rng)
  # XLA:CPU spends 10-30 s optimising the ~150 random initialisers of a
  # program that runs once; unoptimised code initialises in milliseconds.
  options = ({'xla_backend_optimization_level': 0}
             if jax.default_backend() == 'cpu' else None)
  state = lowered.compile(compiler_options=options)(rng)
  return state, shardings


def load_backbone(state: TrainState, variables: Dict[str, Any],
                  source: str = '') -> TrainState:
  """Replaces the backbone params/BN stats with converted weights.

  Accepts full AEModel variables (uses their 'backbone' subtree only) or a
  backbone-only tree (e.g. a converted ImageNet MobileNetV2). The head
  keeps its initialisation; Adam moments are zeros either way.

  Raises:
    checkpoints.CheckpointError: when shapes or names do not match.
  """
  new_vars = {}
  for col in ('params', 'batch_stats'):
    tree = variables.get(col, {})
    tree = tree.get('backbone', tree)
    current = getattr(state, col)['backbone']
    want = jax.tree_util.tree_structure(current)
    got = jax.tree_util.tree_structure(tree)
    if want != got:
      raise checkpoints.CheckpointError(
          f'init checkpoint {source!r}: {col} backbone tree does not match '
          f'the model (widen_factor?)')

    def put(cur, new, col=col):
      if tuple(cur.shape) != tuple(np.shape(new)):
        raise checkpoints.CheckpointError(
            f'init checkpoint {source!r}: {col} shape {np.shape(new)} '
            f'!= model {cur.shape}')
      return jax.device_put(np.asarray(new, cur.dtype), cur.sharding)

    backbone = jax.tree_util.tree_map(put, current, tree)
    new_vars[col] = {**getattr(state, col), 'backbone': backbone}
  return state.replace(params=new_vars['params'],
                       batch_stats=new_vars['batch_stats'])


# --------------------------------------------------------------------- step


def train_step(state: TrainState, batch: Dict[str, jax.Array],
               rng: jax.Array, *, model: AEModel,
               lr_fn: optax.Schedule, num_joints: int = 17,
               sigma: float = 2.0, heatmap_factor: float = 1.0,
               push_factor: float = 0.001, pull_factor: float = 0.001):
  """One optimisation step (pure; jitted by `make_train_step`).

  Args:
    state: the replicated TrainState.
    batch: global batch arrays (see legend), split over 'data'.
    rng: base key; the step key is fold_in(rng, step) (the model has no
      stochastic layer today, the key is passed as 'dropout' for those
      that may come).
    model: the AEModel (static).
    lr_fn: the schedule (for the lr metric; the optimizer holds its own).
    sigma: heatmap Gaussian sigma of the targets rendered from
      batch['keypoints'] (device_targets.render_targets).
    num_joints, heatmap_factor, push_factor, pull_factor: loss settings.

  Returns:
    (new_state, metrics): metrics are float32 scalars heatmap_loss,
    push_loss, pull_loss, total_loss, lr, grad_norm, param_norm (of the
    updated params).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  batch = device_targets.render_targets(batch, sigma=sigma)

  def loss_fn(params):
    outputs, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats},
        normalize_images(batch['image']), train=True,
        mutable=['batch_stats'],
        rngs={'dropout': step_rng})
    parts = losses.compute_losses(
        outputs, batch['heatmaps'], batch['mask'], batch['joints'],
        num_joints=num_joints, heatmap_factor=heatmap_factor,
        push_factor=push_factor, pull_factor=pull_factor)
    return parts['total_loss'], (parts, updates['batch_stats'])

  grads, (parts, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = dict(parts)
  metrics['lr'] = jnp.asarray(lr_fn(state.step), jnp.float32)
  metrics['grad_norm'] = optax.global_norm(grads)
  metrics['param_norm'] = optax.global_norm(new_state.params)
  return new_state, metrics


def make_train_step(mesh: jax.sharding.Mesh, state_shardings: Any,
                    **step_kwargs) -> Callable:
  """`train_step` jitted with explicit shardings; the state is donated."""
  rep = sharding.replicated(mesh)
  return jax.jit(
      functools.partial(train_step, **step_kwargs),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), rep),
      out_shardings=(state_shardings, rep),
      donate_argnums=0, compiler_options=layers.compiler_options())


# ------------------------------------------------------------------ logging


class ScalarWriter:
  """TensorBoard scalars (process 0 only); TensorFlow imported lazily.

  Writes the summary proto tf.summary.scalar would write (a float32 scalar
  tensor tagged for the 'scalars' plugin) through tf.summary.write, which
  works without the tensorboard package installed.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self._writer = None
    if enabled:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._writer = tf.summary.create_file_writer(logdir)
      self._meta = tf.compat.v1.SummaryMetadata(
          plugin_data=tf.compat.v1.SummaryMetadata.PluginData(
              plugin_name='scalars'))

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if self._writer is None:
      return
    with self._writer.as_default():
      for name, value in scalars.items():
        self._tf.summary.write(name, self._tf.constant(value, 'float32'),
                               step=step, metadata=self._meta)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


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


# --------------------------------------------------------------------- loop


def make_dataset(config: ml_collections.ConfigDict, start_step: int):
  """The train pipeline for `config.data` (host-local batches).

  Kept as a module function so tests can substitute synthetic data.
  """
  from ae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
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
      num_parallel_calls=d.num_parallel_calls)


class _StopFlag:
  """Set by SIGTERM (preemption); the loop saves and returns."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning('SIGTERM: saving a checkpoint after this step.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def evaluate_state(config: ml_collections.ConfigDict, workdir: str,
                   model: AEModel, state: TrainState) -> Dict[str, float]:
  """COCO keypoint AP of the trained variables on config.data.val_split.

  Host-side grouping and scoring (ae_jax.inference / ae_jax.coco_eval);
  run on single-process jobs only (multi-host: run eval.py on the workdir).
  Writes {workdir}/results_{split}.json.
  """
  if jax.process_count() > 1:
    logging.info('eval_at_end: multi-process run; use eval.py --ckpt %s.',
                 workdir)
    return {}
  from ae_jax import coco_eval  # pylint: disable=g-import-not-at-top
  from ae_jax import inference  # pylint: disable=g-import-not-at-top
  variables = jax.device_get({'params': state.params,
                              'batch_stats': state.batch_stats})
  predictor = inference.Predictor(model, variables,
                                  **inference.predictor_kwargs(config.test))
  split = config.data.val_split
  metrics, _ = coco_eval.evaluate(
      predictor, config.data.coco_root, split,
      output_path=os.path.join(workdir, f'results_{split}.json'))
  logging.info('COCO %s:\n%s', split, coco_eval.format_table(metrics))
  return {k: float(v) for k, v in metrics.items()}


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), then evals.

  Returns:
    The final summary (also written to {workdir}/summary.json on process 0).

  Raises:
    NonFiniteLossError: a NaN/inf metric; the last good checkpoint stays.
  """
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh()
  global_batch = config.train.global_batch_size
  if global_batch % mesh.size:
    raise ValueError(f'global_batch_size {global_batch} is not a multiple '
                     f'of the {mesh.size} devices')
  manager = checkpoints.make_train_manager(
      workdir, config.train.keep_checkpoints)
  resume_step = manager.latest_step()
  dataset = make_dataset(config, resume_step or 0)
  num_examples = int(dataset.num_examples)
  epoch_steps = steps_per_epoch(num_examples, global_batch)
  total_steps = (config.train.num_steps if config.train.num_steps > 0
                 else config.train.num_epochs * epoch_steps)
  o = config.optim
  lr = scaled_lr(o.lr, global_batch, o.base_batch_size, o.scale_lr)
  lr_fn = make_lr_schedule(lr, epoch_steps, o.warmup_steps, o.warmup_ratio,
                           tuple(o.decay_epochs), o.decay_factor)
  tx = optax.adam(lr_fn)  # torch Adam defaults: betas (0.9, 0.999), 1e-8.
  model = AEModel(**config.model)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state, state_shardings = create_train_state(
      init_rng, model, tx, config.data.input_size, mesh,
      o.shard_opt_state)
  if resume_step is not None:
    state, meta = checkpoints.restore_train_state(manager, state,
                                                  resume_step)
    if int(meta['data_position']) != resume_step:
      raise checkpoints.CheckpointError(
          f'checkpoint {resume_step}: data_position '
          f'{meta["data_position"]} != step')
    logging.info('Resumed from %s at step %d.', workdir, resume_step)
  elif config.train.init_checkpoint:
    state = load_backbone(
        state, checkpoints.restore_variables(config.train.init_checkpoint),
        config.train.init_checkpoint)
    logging.info('Backbone initialised from %s.',
                 config.train.init_checkpoint)
  start_step = resume_step or 0
  step_fn = make_train_step(
      mesh, state_shardings, model=model, lr_fn=lr_fn,
      num_joints=config.model.num_joints, sigma=config.data.sigma,
      heatmap_factor=config.loss.heatmap_factor,
      push_factor=config.loss.push_factor,
      pull_factor=config.loss.pull_factor)
  step_rng = jax.device_put(step_rng, sharding.replicated(mesh))
  writer = ScalarWriter(os.path.join(workdir, 'tensorboard'), is_main)
  logging.info('Training %d -> %d steps (%d examples, %d steps/epoch, '
               'global batch %d on %d devices, %d processes).', start_step,
               total_steps, num_examples, epoch_steps, global_batch,
               mesh.size, jax.process_count())

  meta = lambda s: {'step': s, 'data_position': s, 'seed': config.seed,
                    'global_batch_size': global_batch}
  log_every = config.train.log_every_steps
  ckpt_every = config.train.checkpoint_every_steps
  pending, history = [], []
  last_good = resume_step
  t_window = t_start = time.time()
  first_loss = last_loss = None
  preempted = False
  step = start_step
  data_iter = iter(dataset)
  try:
    with _StopFlag() as stop:
      while step < total_steps:
        host_batch = next(data_iter)
        batch = sharding.make_global_batch(dict(host_batch), mesh)
        state, metrics = step_fn(state, batch, step_rng)
        pending.append(metrics)
        step += 1
        save = (step % ckpt_every == 0 or step == total_steps or
                stop.requested)
        if step % log_every == 0 or save:
          window = [{k: float(v) for k, v in m.items()}
                    for m in jax.device_get(pending)]
          check_finite(window, step - len(window) + 1)
          now = time.time()
          mean = {k: float(np.mean([m[k] for m in window]))
                  for k in window[0]}
          ips = len(window) * global_batch / max(now - t_window, 1e-9)
          eta = (total_steps - step) * (now - t_window) / len(window)
          first_loss = window[0]['total_loss'] if first_loss is None \
              else first_loss
          last_loss = window[-1]['total_loss']
          history.append({'step': step, **mean, 'images_per_sec': ips})
          if is_main:
            logging.info(
                'step %d/%d  loss %.4g (hm %.4g push %.3g pull %.3g)  '
                'lr %.3g  %.2f img/s  ETA %.0fs', step, total_steps,
                mean['total_loss'], mean['heatmap_loss'],
                mean['push_loss'], mean['pull_loss'], mean['lr'], ips, eta)
          writer.write(step, {**mean, 'images_per_sec': ips})
          pending, t_window = [], now
        if save:
          checkpoints.save_train_state(manager, step, state, meta(step))
          last_good = step
        if stop.requested:
          preempted = True
          break
  except NonFiniteLossError as e:
    manager.wait_until_finished()
    manager.close()
    writer.close()
    raise NonFiniteLossError(
        f'{e}. Training stopped; last good checkpoint: step {last_good} '
        f'in {workdir}/checkpoints (no checkpoint was written after it).'
    ) from None
  manager.wait_until_finished()
  manager.close()
  elapsed = time.time() - t_start
  summary = {
      'start_step': start_step, 'final_step': step,
      'total_steps': total_steps, 'preempted': preempted,
      'first_loss': first_loss, 'last_loss': last_loss,
      'seconds': elapsed,
      'images_per_sec': (step - start_step) * global_batch / max(elapsed,
                                                                1e-9),
      'last_checkpoint': last_good, 'history': history}
  if config.train.eval_at_end and not preempted and step == total_steps:
    summary['eval'] = evaluate_state(config, workdir, model, state)
    writer.write(step, {f'eval/{k}': v for k, v in summary['eval'].items()})
  writer.close()
  if is_main:
    logging.info('Done: steps %d->%d, loss %s -> %s, %.1fs, %.2f img/s%s.',
                 start_step, step, first_loss, last_loss, elapsed,
                 summary['images_per_sec'],
                 ' (preempted, saved)' if preempted else '')
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=1)
  summary['state'] = state
  return summary

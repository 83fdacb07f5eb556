r"""Trains Associative Embedding + MobileNetV2 (resumes from --workdir).

  python train.py --config configs/coco512.py --workdir /tmp/ae_coco512 \
      --config.data.coco_root=/data/coco
  python train.py --config configs/coco_mini.py --workdir /tmp/ae_mini

Multi-process (TPU pod slice, multi-node GPU): every process runs the same
command. Where JAX detects the cluster (TPU pods, SLURM) pass --distributed
(or set AE_JAX_DISTRIBUTED=1); elsewhere pass --coordinator_address,
--num_processes and --process_id (and --local_device_ids for one process
per GPU):

  python train.py --config configs/coco512.py --workdir /shared/ae \
      --coordinator_address=node0:1234 --num_processes=2 --process_id=$RANK

Before renting a slice: compile (only) this very step for it on any CPU
machine with libtpu (pip install -e '.[tpu]'), e.g. a 16-chip v5e, and
print per-chip memory vs HBM, the largest per-chip batch that fits,
FLOPs, bytes, roofline and collectives (ae_jax/aot/report.py; GPUs:
--aot_topology=h100:8 with the cuda12 extra); nothing is trained or
written:

  python train.py --config configs/coco512.py --workdir W \
      --aot_topology=v5e:4x4 [--config.model.dtype=bfloat16 ...]

Checkpoints, TensorBoard scalars and summary.json go to --workdir; a rerun
with the same --workdir resumes from the newest complete checkpoint. One
trainer per workdir (train.lock). Exit codes:
  0    done (num_steps reached)
  1    an `error: ...` line: bad flag/config value, workdir in use,
       unusable checkpoint, NaN/inf loss, unreadable images, an input
       worker process that died (the last good checkpoint stays)
  2    --aot_topology: the step does not fit the chip's memory (the last
       line names the per-chip batch that would)
  130  Ctrl-C (SIGINT): the current step was saved (a second Ctrl-C, or
       one before the first step, stops without saving); rerun to resume
  143  preempted: SIGTERM to any process saved the same step on all of
       them; rerun the same command to resume (schedulers: requeue)
  134  (multi-process) another process died; rerun resumes from the last
       checkpoint
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ae_jax.aot import flags as aot_flags  # defines the --aot_* flags
from ae_jax import cli
from ae_jax import config_checks
from ae_jax import launch_flags  # defines the multi-process flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Checkpoints, TensorBoard and summary go here.')
flags.mark_flags_as_required(['config', 'workdir'])

_INTERRUPTED = ('interrupted (Ctrl-C) before a step could be saved; rerun '
                'the same command to resume from the last checkpoint')


def _end_multiprocess(code: int) -> None:
  """Exits a multi-process run once every process is done.

  All processes meet in jax.distributed's shutdown barrier, then leave
  without interpreter teardown: with gloo CPU collectives, jax 0.10.2
  processes were seen to hang in the final garbage collection after a peer
  had exited. Checkpoints, TensorBoard and summary.json are closed by then.
  """
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.shutdown()
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _check_split_files(config, process_count: int) -> None:
  """The train split's files (json source) and, when the run ends with an
  evaluation (one process), the val split's: FileNotFoundError naming the
  missing one before any set-up, not after training."""
  from ae_jax.data import coco  # pylint: disable=g-import-not-at-top
  d = config.data
  if d.source == 'json':
    coco.check_split_files(d.coco_root, d.train_split, d.train_annotations,
                           d.train_images, 'train')
  if config.train.eval_at_end and process_count == 1:
    coco.check_split_files(d.coco_root, d.val_split, d.val_annotations,
                           d.val_images, 'val')


def _aot_check(config) -> int:
  """--aot_topology: compile the step for a TPU slice (no training)."""
  aot_flags.prepare_environment()
  # pylint: disable=g-import-not-at-top
  from ae_jax import keypoints
  from ae_jax.aot import report
  from ae_jax.aot import targets
  try:
    return cli.interruptible(  # Ctrl-C ends a compile at once
        report.check_train, config, aot_flags.TOPOLOGY.value,
        search=aot_flags.SEARCH.value,
        top_fusions=aot_flags.TOP_FUSIONS.value,
        hlo_out=aot_flags.HLO_OUT.value)
  except (targets.AotError, config_checks.ConfigError,
          keypoints.KeypointSpecError, FileNotFoundError) as e:
    logging.flush()
    print(f'error: {e}', file=sys.stderr)
    return 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Config values and input paths before JAX starts or any set-up.
  config = cli.checked_config(_CONFIG.value, train=True)
  if aot_flags.TOPOLOGY.value:  # compile only: no workdir, no devices
    return _aot_check(config)
  try:
    config_checks.check_init_checkpoint(config.train.init_checkpoint)
  except config_checks.ConfigError as e:
    raise SystemExit(f'error: {e}') from None
  distributed = launch_flags.initialize()
  # Imported here so --help and flag errors stay fast.
  from ae_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.log_backend(config.data.input_size,
                       config.train.global_batch_size)
  import jax  # pylint: disable=g-import-not-at-top
  from ae_jax.train import loop  # pylint: disable=g-import-not-at-top
  from ae_jax.models import ae_model  # pylint: disable=g-import-not-at-top
  # The one place the layer kernels are chosen: the backend this runs on.
  kernels = ae_model.default_kernels(jax.default_backend())
  from ae_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
  from ae_jax import keypoints  # pylint: disable=g-import-not-at-top
  from ae_jax.train import workdir_lock  # pylint: disable=g-import-not-at-top
  from ae_jax.data import coco  # pylint: disable=g-import-not-at-top
  from ae_jax.data import example_loader  # pylint: disable=g-import-not-at-top
  from ae_jax.data import workers  # pylint: disable=g-import-not-at-top
  code = 0
  try:
    _check_split_files(config, jax.process_count())
    summary = loop.train_and_evaluate(config, _WORKDIR.value,
                                           kernels=kernels)
    if summary['preempted']:
      ctrl_c = summary['stop_signal'] == 'SIGINT'
      code = (cli.INTERRUPTED_EXIT_CODE if ctrl_c else
              loop.PREEMPTED_EXIT_CODE)
      logging.warning('%s at step %d (saved): exit code %d; rerun '
                      'the same command to resume.',
                      'Interrupted (Ctrl-C)' if ctrl_c else 'Preempted',
                      summary['final_step'], code)
  except (loop.NonFiniteLossError, config_checks.ConfigError,
          workdir_lock.WorkdirError, checkpoints.CheckpointError,
          FileNotFoundError, coco.AnnotationError, coco.ImageError,
          keypoints.KeypointSpecError, example_loader.InputDataError,
          workers.InputWorkerError) as e:  # user errors, data included
    logging.flush()
    print(f'error: {e}', file=sys.stderr)
    code = 1
  except KeyboardInterrupt:  # Ctrl-C before step 1, or a second Ctrl-C
    if not distributed:
      raise  # cli.run: one line, exit 130
    logging.flush()
    print(f'error: {_INTERRUPTED}', file=sys.stderr)
    sys.stderr.flush()  # no shutdown barrier: the others may be mid-step
    os._exit(cli.INTERRUPTED_EXIT_CODE)
  if distributed:
    _end_multiprocess(code)
  logging.flush()
  sys.exit(code)


if __name__ == '__main__':
  cli.run(main, interrupted=_INTERRUPTED)

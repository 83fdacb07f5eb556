"""TensorBoard scalars of the train loop, written without TensorFlow.

An event file is TFRecord-framed `Event` protos; TensorBoard's own record
framing (`RecordWriter`) and protos write it here, and neither imports
TensorFlow. clu's SummaryWriter (tf.summary) would import TensorFlow into
every trainer process only for this (seconds of start-up, hundreds of MB
resident per process), while the input needs none (the json and the TFDS
ArrayRecord sources read with numpy).

The methods are clu's MetricWriter's (write_scalars, flush, close), so a
clu writer drops in where TensorFlow is in the process anyway.
"""

import itertools
import os
import socket
import time
from typing import Mapping

from etils import epath
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import record_writer

_FILE_NUMBERS = itertools.count()


class ScalarWriter:
  """Appends scalars to a new `events.out.tfevents.*` file in `logdir`."""

  def __init__(self, logdir: epath.PathLike):
    logdir = epath.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    # TensorFlow's naming: time, host, pid and a per-process number keep
    # the files of reruns and of several writers apart.
    name = (f'events.out.tfevents.{int(time.time()):010d}.'
            f'{socket.gethostname()}.{os.getpid()}.{next(_FILE_NUMBERS)}')
    self._records = record_writer.RecordWriter((logdir / name).open('wb'))
    self._open = True
    self._write(event_pb2.Event(file_version='brain.Event:2'))

  def _write(self, event: event_pb2.Event) -> None:
    event.wall_time = time.time()
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One event at `step` holding every {tag: value} of `scalars`."""
    values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
              for tag, value in scalars.items()]
    self._write(event_pb2.Event(step=int(step),
                                summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    if self._open:
      self._open = False
      self._records.close()


class NullWriter:
  """The same methods, writing nothing (processes other than 0)."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    del step, scalars

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def make_metric_writer(logdir: epath.PathLike, enabled: bool = True):
  """A ScalarWriter for `logdir`, or a NullWriter if not `enabled`."""
  return ScalarWriter(logdir) if enabled else NullWriter()

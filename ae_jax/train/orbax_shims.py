"""How ae_jax drives orbax: its handler for our trees, and the one place
where orbax's public API cannot give a behaviour we need (it says why).

  pytree_handler()            orbax's PyTree handler, replicated arrays
                              written whole by one replica (public options)
  failures_reported_once()    a failed read or write prints nothing later
  reason(error)               the cause of an orbax error in one line
"""

import asyncio
import contextlib
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp


def pytree_handler() -> ocp.PyTreeCheckpointHandler:
  """orbax's PyTree handler, with jax.Arrays written whole by one replica.

  orbax's default ArrayHandler (replica-parallel on CPU/TPU) has every
  replica write a slice of each replicated array, cut on its device: one
  small XLA compile per array shape and device at the first save of a run
  (264 for configs/tiny.py on 8 devices). Our state is replicated and
  small; sharded arrays are still written shard by shard. The registry is
  this handler's own (orbax's global one stays as it is). No ArrayMetadata
  store: it records PRNG-key types, which our trees never hold.
  """
  registry = ocp.type_handlers.create_type_handler_registry(
      *[(t, ocp.type_handlers.get_type_handler(t))
        for t in ocp.type_handlers.supported_types() if t is not jax.Array],
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def restore_args(target: Any) -> ocp.args.PyTreeRestore:
  """Restore into `target` (ShapeDtypeStructs with shardings)."""
  return ocp.args.PyTreeRestore(
      target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def placed(saved: Any, sharding: jax.sharding.Sharding) -> Any:
  """ShapeDtypeStructs of a saved tree's metadata, placed by `sharding`."""
  return jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
      saved)


class _DrainingLoop(asyncio.SelectorEventLoop):
  """Cancels and awaits its pending tasks before closing (as asyncio.run),
  and does not report the exceptions of operations nobody awaited: the
  operation that failed first has raised to the caller."""

  def __init__(self):
    super().__init__()
    self.set_exception_handler(_report_unless_unretrieved)

  def close(self):
    if not self.is_closed() and not self.is_running():
      pending = asyncio.all_tasks(self)
      for task in pending:
        task.cancel()
      if pending:
        self.run_until_complete(
            asyncio.gather(*pending, return_exceptions=True))
    super().close()


def _report_unless_unretrieved(loop, context):
  if 'exception was never retrieved' not in context.get('message', ''):
    loop.default_exception_handler(context)


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):

  def new_event_loop(self):
    return _DrainingLoop()


@contextlib.contextmanager
def failures_reported_once():
  """While open, a failed orbax read or write is only the exception it
  raises to us; nothing prints later.

  orbax reads and writes on fresh asyncio loops (in its save threads too).
  When one operation fails (a truncated file, a full disk) it closes that
  loop with the others still pending, and they print "Task exception was
  never retrieved" / "Event loop is closed" tracebacks later, from wherever
  the program is by then; its save threads also log each failure with a
  traceback (six for a full disk). orbax has no option for either, so while
  this is open the loops it makes cancel and await their pending tasks
  before closing (what asyncio.run does; the event-loop policy is set for
  this block only; they do not report exceptions nobody retrieved) and
  orbax's ERROR records are dropped from the absl log (the same error
  reaches the caller, who reports it in one line).
  """
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    with _absl_records_kept_if(_drop_orbax_errors):
      yield
  finally:
    asyncio.set_event_loop_policy(previous)


def _drop_orbax_errors(record: logging.LogRecord) -> bool:
  return record.levelno < logging.ERROR or '/orbax/' not in record.pathname


def reason(error: BaseException) -> str:
  """The innermost cause's first line, short enough for a one-line message
  (orbax wraps TensorStore's message, e.g. a truncated zstd stream, in a
  generic one with a spec dump)."""
  while True:
    inner = error.__cause__ or (None if error.__suppress_context__ else
                                error.__context__)
    if inner is None:
      break
    error = inner
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  # TensorStore names the file first and the OS error last.
  return text if len(text) <= 240 else f'{text[:110]} ... {text[-125:]}'


def read_only_notice_dropped():
  """Drops orbax's "Given directory is read only=..." warning, which every
  read-only CheckpointManager logs (our readers: eval, demo, export, each
  naming the checkpoint it read in its own line)."""
  return _absl_records_kept_if(_drop_read_only_notice)


@contextlib.contextmanager
def _absl_records_kept_if(keep):
  """While open, the absl log keeps only the records `keep(record)` is
  True for (orbax logs through absl)."""
  absl_logger = logging.getLogger('absl')
  absl_logger.addFilter(keep)
  try:
    yield
  finally:
    absl_logger.removeFilter(keep)


def _drop_read_only_notice(record: logging.LogRecord) -> bool:
  return not ('/orbax/' in record.pathname and
              record.getMessage().startswith('Given directory is read only'))


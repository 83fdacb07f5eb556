"""Reads a saved orbax item in full, without orbax's event loop.

orbax's restore reads all arrays concurrently on an asyncio loop it makes
for the call. When one read fails (a truncated data file) the call raises
at once and closes the loop while the other reads are still running; they
print "Task exception was never retrieved" / "Event loop is closed"
tracebacks later, from wherever the program is by then. `read_item` reads
every array of the item with TensorStore's synchronous futures instead
(the zarr arrays in the OCDBT database orbax wrote, as orbax reads them):
a damaged item raises one `UnreadableItemError` and leaves nothing running,
and orbax is then asked to restore only items known to read.
"""

from typing import Any, Dict, Set

from etils import epath
import jax
import orbax.checkpoint as ocp
import tensorstore as ts


class UnreadableItemError(ValueError):
  """An orbax item, or one of its arrays, that cannot be read."""


def read_item(item_dir: epath.Path) -> Dict[str, Any]:
  """Reads every array of the item at `item_dir`, then its metadata tree.

  Returns:
    The saved tree (`item_metadata`).

  Raises:
    UnreadableItemError: '{item_dir}: {reason}' (a missing, truncated or
      corrupt file; the first failing array or file is named).
  """
  names = _read_all_arrays(item_dir)
  try:
    saved = item_metadata(item_dir)
  except Exception as e:  # pylint: disable=broad-except  # orbax: several
    raise UnreadableItemError(
        f'{item_dir}: unreadable metadata ({reason(e)})') from None
  for leaf in jax.tree_util.tree_leaves(saved):
    if isinstance(leaf, ocp.metadata.ArrayMetadata) and (
        leaf.name not in names):
      raise UnreadableItemError(f'{item_dir}: no data for {leaf.name}')
  return saved


def item_metadata(item_dir: epath.Path) -> Dict[str, Any]:
  """The saved tree of an orbax item (leaves: orbax ArrayMetadata).

  Read by the handler, which raises on a missing or unreadable _METADATA
  (a Checkpointer's `metadata` logs and returns None instead, and warns
  about the step-level file a CheckpointManager item does not have).
  """
  handler = ocp.StandardCheckpointHandler()
  try:
    meta = handler.metadata(item_dir)
  finally:
    handler.close()
  return getattr(meta, 'tree', meta)


def _read_all_arrays(item_dir: epath.Path) -> Set[str]:
  """Reads every zarr array of the item's OCDBT database; their names."""
  url = str(item_dir).rstrip('/') + '/'
  kvstore = {'driver': 'ocdbt', 'cache_pool': 'cache_pool',
             'base': url if '://' in url else 'file://' + url}
  # One context for all arrays: the OCDBT tree is read once, not per array.
  context = ts.Context({'cache_pool': {'total_bytes_limit': 100_000_000}})
  try:
    drivers = {}
    for key in ts.KvStore.open(kvstore, context=context).result().list(
        ).result():
      name, _, leaf = key.decode().rpartition('/')
      if leaf in ('.zarray', 'zarr.json'):
        drivers[name] = 'zarr' if leaf == '.zarray' else 'zarr3'
    opening = [ts.open({'driver': driver,
                        'kvstore': {**kvstore, 'path': f'{name}/'},
                        'fill_missing_data_reads': False},
                       open=True, read=True, context=context)
               for name, driver in drivers.items()]
    reading = [future.result().read() for future in opening]
    for future in reading:
      future.result()
  except Exception as e:  # pylint: disable=broad-except  # TensorStore's
    raise UnreadableItemError(f'{item_dir}: {reason(e)}') from None
  return set(drivers)


def reason(error: BaseException) -> str:
  """The innermost cause's first line, short enough for a one-line message.

  (orbax wraps TensorStore's message, e.g. a truncated zstd stream, in a
  generic 'error while reading array index' with a spec dump.)
  """
  while True:
    inner = error.__cause__ or (None if error.__suppress_context__ else
                                error.__context__)
    if inner is None:
      break
    error = inner
  text = str(error).strip().splitlines()
  text = text[0] if text else type(error).__name__
  return text if len(text) <= 240 else text[:237] + '...'

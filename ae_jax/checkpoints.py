"""Orbax checkpoints: model variables (converted weights) and train state.

A *variables checkpoint* is a directory written by `save_variables` holding
{'params': ..., 'batch_stats': ...} for `AEModel` (what
convert_torch_weights.py writes and what eval.py/demo.py/train.py's
`init_checkpoint` read). `restore_variables` also accepts a training
workdir and then takes the variables of its latest step.
"""

import os
from typing import Any, Dict

import jax
import numpy as np
import orbax.checkpoint as ocp

Variables = Dict[str, Any]


class CheckpointError(ValueError):
  """A checkpoint path that does not hold what was asked for."""


def save_variables(directory: str, variables: Variables) -> None:
  """Writes {'params', 'batch_stats'} (numpy or jax arrays) to `directory`."""
  directory = os.path.abspath(directory)
  tree = {'params': variables['params'],
          'batch_stats': variables.get('batch_stats', {})}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, tree, force=True)


def restore_variables(directory: str) -> Variables:
  """Reads model variables from a variables checkpoint or a train workdir.

  Returns host numpy arrays {'params': ..., 'batch_stats': ...}.
  Raises CheckpointError naming the path when nothing usable is there.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f'checkpoint directory not found: {directory}')
  latest = _latest_train_step_dir(directory)
  if latest is not None:
    return _restore_from_train_step(latest)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(directory)
  except Exception as e:  # orbax raises several types for a bad directory.
    raise CheckpointError(
        f'{directory} is not an ae_jax checkpoint (neither converted '
        f'variables nor a training workdir): {e}') from None
  if 'params' not in tree:
    raise CheckpointError(f'{directory} holds no "params"')
  return jax.tree_util.tree_map(np.asarray, dict(tree))


def _latest_train_step_dir(directory: str):
  """Path of the newest step of a train workdir's CheckpointManager, if any."""
  ckpt_root = os.path.join(directory, 'checkpoints')
  if not os.path.isdir(ckpt_root):
    return None
  steps = [int(d) for d in os.listdir(ckpt_root) if d.isdigit()]
  return os.path.join(ckpt_root, str(max(steps))) if steps else None


def _restore_from_train_step(step_dir: str) -> Variables:
  """Loads params/batch_stats from one step of a training checkpoint."""
  state_dir = os.path.join(step_dir, 'state')
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(state_dir)
  return jax.tree_util.tree_map(
      np.asarray, {'params': tree['params'],
                   'batch_stats': tree['batch_stats']})

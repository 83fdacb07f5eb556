"""Output paths of the command-line runs: never an input, modes by umask.

`check_not_input` refuses an output that is (or lies inside) one of the
run's own inputs, before any work (eval.py --output onto the annotation
file, demo.py --out inside the checkpoint, ...). `free_path` picks a name
that replaces nothing. `apply_umask` gives a file or folder made by
tempfile (0600 / 0700) the mode the user's umask gives a plain open /
mkdir, so results can be shared as any other file. Local paths only: a URL
(gs://...) is passed through.
"""

import os
from typing import Mapping


class OutputError(ValueError):
  """An output path that would replace or write into an input (one line)."""


def _local(path: str) -> bool:
  return '://' not in str(path)


def check_not_input(flag: str, path: str, inputs: Mapping[str, str]) -> None:
  """Raises OutputError if `path` is one of `inputs` or inside one.

  Args:
    flag: the output's flag, for the message ('--output').
    path: the output file or folder.
    inputs: {what it is ('the annotation file'): its path} (files or
      folders; empty paths are skipped).
  """
  if not _local(path):
    return
  real = os.path.realpath(path)
  for what, where in inputs.items():
    if not where or not _local(where):
      continue
    source = os.path.realpath(where)
    if real == source or real.startswith(source.rstrip(os.sep) + os.sep):
      how = 'is' if real == source else 'is inside'
      raise OutputError(f'{flag} {path} {how} {what} {where}, an input of '
                        'this run; write it elsewhere')


def checkpoint_data(ckpt: str) -> str:
  """The folder of `ckpt` that holds checkpoint data: a train workdir's
  checkpoints/ (its other files, e.g. results json, are outputs too), or a
  variables checkpoint itself."""
  steps = os.path.join(ckpt, 'checkpoints')
  return steps if _local(ckpt) and os.path.isdir(steps) else ckpt


def free_path(path: str, taken=()) -> str:
  """`path`, or `{stem}_2{ext}`, `_3`, ...: the first that is not an
  existing file or folder nor in `taken` (real paths)."""
  stem, ext = os.path.splitext(path)
  candidate, n = path, 1
  while (os.path.lexists(candidate) or
         os.path.realpath(candidate) in taken):
    n += 1
    candidate = f'{stem}_{n}{ext}'
  return candidate


def _umask() -> int:
  mask = os.umask(0o022)  # reading it means setting it: set it back
  os.umask(mask)
  return mask


def apply_umask(path: str) -> None:
  """chmods a file (0666) or folder (0777) made by tempfile to the mode a
  plain open / mkdir gives it under the process umask."""
  if not _local(path):
    return
  base = 0o777 if os.path.isdir(path) else 0o666
  os.chmod(path, base & ~_umask())

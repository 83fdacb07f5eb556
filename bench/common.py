"""What every benchmark shares: the machine line and writing its report."""

import os
import platform
import subprocess
from typing import Sequence


def cpu_model() -> str:
  """The CPU's model name (lscpu), or platform.processor() without lscpu."""
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True,
                           check=False).stdout.splitlines()
  except OSError:
    return platform.processor()
  return next((line.split(':', 1)[1].strip() for line in lscpu
               if line.startswith('Model name')), platform.processor())


def machine() -> str:
  """'<n> cores (<cpu model>)' for the reports' Machine line."""
  return f'{os.cpu_count()} cores ({cpu_model()})'


def write_report(lines: Sequence[str], path: str) -> None:
  """Prints the markdown report and writes it to `path`."""
  text = '\n'.join(lines) + '\n'
  print(text, end='')
  with open(path, 'w') as f:
    f.write(text)
  print(f'wrote {path}')

"""Per-process figures for the benchmarks, from /proc (Linux).

CPU seconds and memory (RSS, private = USS) of a process and its
descendants, and `GilSampler`: py-spy's count of the samples in which a
thread of this process holds its GIL.
"""

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

_TICK = os.sysconf('SC_CLK_TCK')


def children(pid: int) -> list[int]:
  """Live descendants of `pid` (from /proc)."""
  parents = {}
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          parents[int(entry)] = int(f.read().rsplit(')', 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        continue
  found, frontier = [], [pid]
  while frontier:
    p = frontier.pop()
    kids = [c for c, parent in parents.items() if parent == p]
    found.extend(kids)
    frontier.extend(kids)
  return found


def cpu_s(pid: int) -> float:
  """utime + stime of a process (0 if it is gone)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
  except OSError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / _TICK


def own_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def memory_mb(pid: int) -> tuple[float, float]:
  """(RSS, private = USS) of a process in MB."""
  values = {}
  try:
    with open(f'/proc/{pid}/smaps_rollup') as f:
      for line in f:
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
          values[parts[0].rstrip(':')] = int(parts[1]) / 1024
  except OSError:
    return 0.0, 0.0
  return values.get('Rss', 0.0), (values.get('Private_Clean', 0.0) +
                                  values.get('Private_Dirty', 0.0))


class GilSampler:
  """py-spy --gil on this process for `seconds`: the timed window.

  The window opens when py-spy reports that it samples and closes when it
  exits (after `seconds`), so the samples and the examples counted cover
  the same time. Each sample in which a thread of this process holds the
  GIL is one line of py-spy's raw output (weight = count); held time =
  samples / rate.
  """

  def __init__(self, seconds: float, rate: int = 200):
    self.seconds, self.rate = seconds, rate
    exe = shutil.which('py-spy') or os.path.join(
        os.path.dirname(sys.executable), 'py-spy')
    self.exe = exe if os.access(exe, os.X_OK) else None
    self._proc = self._out = None

  def start(self) -> None:
    """Starts py-spy; returns once it samples (or at once without it)."""
    if self.exe is None:
      self._end = time.perf_counter() + self.seconds
      return
    self._out = tempfile.NamedTemporaryFile(suffix='.txt', delete=False).name
    self._proc = subprocess.Popen(
        [self.exe, 'record', '--pid', str(os.getpid()), '--gil',
         '--nonblocking', '--rate', str(self.rate), '--duration',
         str(int(self.seconds)), '--format', 'raw', '--output', self._out],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in self._proc.stdout:  # py-spy reports on stdout
      if 'Sampling process' in line:
        return
    raise RuntimeError(f'py-spy did not start: {self._proc.wait()}')

  @property
  def pid(self):
    return self._proc.pid if self._proc else None

  def open(self) -> bool:
    """Whether the window is still open."""
    if self._proc is None:
      return time.perf_counter() < self._end
    return self._proc.poll() is None

  def held_seconds(self) -> tuple[float | None, str]:
    """(GIL-held seconds in the window, py-spy's note) once closed."""
    if self._proc is None:
      return None, 'py-spy not installed'
    err = self._proc.stdout.read()
    self._proc.wait()
    with open(self._out) as f:
      samples = sum(int(line.rsplit(' ', 1)[1]) for line in f if line.strip())
    os.unlink(self._out)
    notes = [l.replace('py-spy> ', '') for l in err.splitlines()
             if 'behind' in l or 'Samples:' in l]
    return samples / self.rate, '; '.join(notes[-2:])


def cmdline(pid: int) -> str:
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      return f.read().replace(b'\0', b' ').decode(errors='replace')
  except OSError:
    return ''

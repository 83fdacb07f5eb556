r"""Per-module test times of a suite run, and the order to collect them in.

  PYTEST_ADDOPTS=--junitxml=/tmp/junit.xml bash .ci/run
  .venv/bin/python -m bench.suite_times /tmp/junit.xml

Prints each module's summed test time (longest first), the sum, and the
module order for tests/conftest.py's LONGEST_FIRST. With it, the ends of
the two xdist workers are simulated (a worker takes the next module when
two or fewer of its tests are pending, as pytest-xdist's loadfile
scheduling does), for the order conftest has now and for the printed one:
an estimate of the wall time lost to one worker finishing alone.
"""

import collections
import sys
import xml.etree.ElementTree as ET

from tests import conftest


def module_times(junit_xml: str) -> 'collections.OrderedDict[str, list]':
  """{module file name: [test seconds in run order]}."""
  modules = collections.OrderedDict()
  for case in ET.parse(junit_xml).iter('testcase'):
    name = case.get('classname').split('.')[-1] + '.py'
    modules.setdefault(name, []).append(float(case.get('time')))
  return modules


def simulate(modules, order, workers: int = 2):
  """Seconds each worker runs, handing out modules in `order`."""
  queue = [list(modules[m]) for m in order]
  pending = [[] for _ in range(workers)]
  clock = [0.0] * workers
  for w in range(workers):
    if queue:
      pending[w] += queue.pop(0)
  for w in range(workers):
    if queue and len(pending[w]) <= 2:
      pending[w] += queue.pop(0)
  while any(pending):
    w = min((w for w in range(workers) if pending[w]),
            key=lambda w: clock[w] + pending[w][0])
    clock[w] += pending[w].pop(0)
    if queue and len(pending[w]) <= 2:
      pending[w] += queue.pop(0)
  return clock


def main(junit_xml: str) -> None:
  modules = module_times(junit_xml)
  total = {m: sum(t) for m, t in modules.items()}
  longest = sorted(total, key=lambda m: -total[m])
  for m in longest:
    print(f'{total[m]:7.1f} s  {m}')
  print(f'{sum(total.values()):7.1f} s  sum of {len(total)} modules, '
        f'{sum(len(t) for t in modules.values())} tests')
  rank = {m: i for i, m in enumerate(conftest.LONGEST_FIRST)}
  now = sorted(modules, key=lambda m: (rank.get(m, len(rank)), m))
  for what, order in (('conftest order', now), ('longest first', longest)):
    ends = simulate(modules, order)
    print(f'{what}: workers end at {", ".join(f"{e:.0f}" for e in ends)} '
          's (simulated)')
  print('LONGEST_FIRST = ' + repr(tuple(longest[:12])))


if __name__ == '__main__':
  main(sys.argv[1])

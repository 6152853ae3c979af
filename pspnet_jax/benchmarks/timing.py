"""Clocks for the benchmarks: the median of timed calls, and CPU seconds that
count Grain's worker processes beside this process's threads."""

import os
import statistics
import time


def median_seconds(fn, steps: int) -> float:
  """Median wall time of `steps` calls of fn(), after one untimed warm-up call."""
  fn()  # warm-up: compilation, allocation
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def cpu_seconds() -> float:
  """CPU seconds of this process (all its threads) and of its live children: Grain's workers.

  Children are found by their parent pid in Linux's /proc; elsewhere only this
  process counts.
  """
  total = time.process_time()
  if not os.path.isdir('/proc'):
    return total
  ticks_per_second, parent = os.sysconf('SC_CLK_TCK'), os.getpid()
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/stat') as stat:
        # After the parenthesized command: state, ppid, ..., utime and stime at 11 and 12.
        fields = stat.read().rsplit(')', 1)[1].split()
    except OSError:  # the process ended while we looked
      continue
    if int(fields[1]) == parent:
      total += (int(fields[11]) + int(fields[12])) / ticks_per_second
  return total


def wall_and_cpu_seconds(next_batch, steps: int) -> tuple[float, float]:
  """Wall time and CPU time (`cpu_seconds`) for `steps` calls of next_batch().

  Each batch is dropped before the next, as a training loop does: keeping them
  all made every batch land on fresh pages, and the kernel's page zeroing cost
  the loader ~25% of its rate.
  """
  wall, cpu = time.perf_counter(), cpu_seconds()
  for _ in range(steps):
    next_batch()
  return time.perf_counter() - wall, cpu_seconds() - cpu

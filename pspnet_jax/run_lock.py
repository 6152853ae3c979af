"""One training run per workdir: a lock that names its holder and dies with it.

Two runs on one workdir overwrite each other's checkpoints and interleave
their metrics, so a run takes `WORKDIR/run.lock` before it reads or writes
anything there, and a second run is refused at start with the holder's host,
pid and start time. The lock is an advisory `flock` on that file: the kernel
drops it when the holding process ends in any way (kill -9 included), so a
lock left behind never blocks a restart; the file itself only says who held
it last. With several processes, process 0 holds it for the run.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket

LOCK_FILE = 'run.lock'


class WorkdirInUse(RuntimeError):
  """Another live run holds the workdir."""


class WorkdirLock:
  """The lock of one workdir; `acquire` raises WorkdirInUse while another process holds it."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def acquire(self) -> None:
    lock_file = open(self.path, 'a+', encoding='utf-8')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock_file.seek(0)
      holder = lock_file.read().strip() or 'a process that has not written its name yet'
      lock_file.close()
      raise WorkdirInUse(f'{os.path.dirname(self.path)} is in use by another run ({holder}); '
                         f'stop it first, or give this run another --workdir') from None
    lock_file.truncate(0)
    lock_file.write(json.dumps({
        'host': socket.gethostname(), 'pid': os.getpid(),
        'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}))
    lock_file.flush()
    self._file = lock_file

  def release(self) -> None:
    if self._file is not None:
      # Unlocked by closing; the file stays, naming the last holder.
      self._file.close()
      self._file = None


@contextlib.contextmanager
def hold(workdir: str, *, is_lead_process: bool = True):
  """Holds the workdir's lock for the `with` block (a no-op on processes other than the lead)."""
  lock = WorkdirLock(workdir)
  if is_lead_process:
    lock.acquire()
  try:
    yield lock
  finally:
    lock.release()

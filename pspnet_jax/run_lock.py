"""One training run per workdir: a lock that names its holder and never outlives it for good.

Two runs on one workdir overwrite each other's checkpoints and interleave
their metrics, so a run takes `WORKDIR/run.lock` before it reads or writes
anything there, and a second run is refused at start with the holder's host,
pid and start time. With several processes, process 0 holds it for the run.
The file stays after the run, naming who held it last.

A local workdir is locked with an advisory `flock` on that file: the kernel
drops it when the holding process ends in any way (kill -9 included), so a
lock left behind never blocks a restart.

An object store (`gs://`) has no flock, so there the lock is a lease: the file
names its holder with a random token, and a thread of the run rewrites it
every `HEARTBEAT_SECONDS`. A run is refused while the lock is held, not
released, and was written less than `EXPIRY_SECONDS` ago (judged by the
object's modification time, the store's clock, against this host's). So after
a crash, a restart waits at most EXPIRY_SECONDS; a restart on the crashed
run's own host, where the holder's pid is gone, starts at once. A clean end
marks the lock released. Limits, all from the store offering no atomic
create-if-absent through tf.io.gfile:
- two runs started within `SETTLE_SECONDS` of each other are told apart by
  writing, waiting and reading the lock back (the last writer keeps it); a
  run whose write stalls longer than that could still pass unnoticed;
- a holder stalled (not killed) beyond EXPIRY_SECONDS can lose its lease to
  a new run; its heartbeat then sees a foreign token, logs an error and
  stops refreshing, but the stalled run is not stopped;
- expiry compares the store's clock with this host's (NTP-synchronized on
  cloud VMs; a skew of minutes shifts the expiry by as much).
Delete WORKDIR/run.lock by hand only when the holder it names is surely gone.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
from etils import epath

from pspnet_jax import paths

LOCK_FILE = 'run.lock'
HEARTBEAT_SECONDS = 60.0
EXPIRY_SECONDS = 300.0
SETTLE_SECONDS = 2.0


class WorkdirInUse(RuntimeError):
  """Another live run holds the workdir."""


def _holder() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}


def _in_use(workdir, holder: str, detail: str = '') -> WorkdirInUse:
  return WorkdirInUse(f'{workdir} is in use by another run ({holder}){detail}; stop it first, '
                      f'or give this run another --workdir')


class WorkdirLock:
  """The flock of a local workdir; `acquire` raises WorkdirInUse while another process holds it."""

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
      raise _in_use(os.path.dirname(self.path), holder) from None
    lock_file.truncate(0)
    lock_file.write(json.dumps(_holder()))
    lock_file.flush()
    self._file = lock_file

  def release(self) -> None:
    if self._file is not None:
      # Unlocked by closing; the file stays, naming the last holder.
      self._file.close()
      self._file = None


class LeaseLock:
  """The lease of a workdir in an object store (module docstring); the API of WorkdirLock."""

  def __init__(self, workdir: str):
    self.path = epath.Path(workdir) / LOCK_FILE
    self._record = None
    self._stop = threading.Event()
    self._heartbeat = None

  def _read(self) -> dict | None:
    try:
      return {**json.loads(self.path.read_text()), 'written': self.path.stat().mtime}
    except FileNotFoundError:
      return None
    except ValueError:  # a torn or foreign file holds nothing
      return {}

  def _write(self, **changes) -> None:
    self._record.update(changes)
    self.path.write_text(json.dumps(self._record))

  def _refusal(self, record: dict) -> str | None:
    """Why `record` (a lock read from the store) still holds the workdir; None when it is free."""
    if not record or record.get('released'):
      return None
    age = time.time() - record['written']
    if age >= EXPIRY_SECONDS:
      return None
    if record.get('host') == socket.gethostname() and not _pid_alive(record.get('pid')):
      return None   # a run of this host that ended without releasing (kill -9, a crash)
    return f'; its lease was renewed {age:.0f} s ago and expires in {EXPIRY_SECONDS - age:.0f} s'

  def acquire(self) -> None:
    held = self._read()
    if (refusal := self._refusal(held)) is not None:
      raise _in_use(self.path.parent, _describe(held), refusal)
    self._record = {**_holder(), 'token': uuid.uuid4().hex}
    self._write()
    # Another run that read the lock before this write may write its own after it; the
    # last writer wins, and each run finds out by reading back once the other has written.
    time.sleep(SETTLE_SECONDS)
    now = self._read() or {}
    if now.get('token') != self._record['token']:
      raise _in_use(self.path.parent, _describe(now), ' (it started at the same time as this run)')
    self._heartbeat = threading.Thread(target=self._renew, daemon=True, name='run-lock lease')
    self._heartbeat.start()

  def _renew(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      current = self._read()
      if current == {}:   # unreadable (a store serving a write in progress): next beat
        logging.warning('%s: the lock could not be read; renewing at the next beat', self.path)
        continue
      if (current or {}).get('token') != self._record['token']:
        logging.error('%s: this run lost its lease to %s (it was not renewed for %.0f s); '
                      'two runs may now write to this workdir', self.path, _describe(current),
                      EXPIRY_SECONDS)
        return
      try:
        self._write(renewed=time.time())
      except OSError as error:  # the store is unreachable for a while: try again next beat
        logging.warning('%s: the lease could not be renewed: %s', self.path, error)

  def release(self) -> None:
    if self._heartbeat is None:
      return
    self._stop.set()
    self._heartbeat.join()
    self._heartbeat = None
    if (self._read() or {}).get('token') == self._record['token']:
      self._write(released=time.time())


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (TypeError, ValueError, ProcessLookupError):
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _describe(record: dict | None) -> str:
  keys = ('host', 'pid', 'started')
  return json.dumps({key: record[key] for key in keys if key in (record or {})})


def lock_for(workdir: str):
  """The lock that fits where `workdir` is: a flock locally, a lease in an object store."""
  return LeaseLock(workdir) if paths.is_remote(workdir) else WorkdirLock(workdir)


@contextlib.contextmanager
def hold(workdir: str, *, is_lead_process: bool = True):
  """Holds the workdir's lock for the `with` block (a no-op on processes other than the lead)."""
  lock = lock_for(workdir)
  if is_lead_process:
    lock.acquire()
  try:
    yield lock
  finally:
    lock.release()

"""One run per workdir: a second one is refused naming the holder; a killed holder blocks nothing."""

import os
import signal
import subprocess
import sys
import time

import pytest

from configs import default
from pspnet_jax import run_lock, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_second_holder_is_refused_by_name_until_the_first_lets_go(tmp_path):
  first = run_lock.WorkdirLock(str(tmp_path))
  first.acquire()
  with pytest.raises(run_lock.WorkdirInUse, match=rf'in use by another run .*"pid": {os.getpid()}'):
    run_lock.WorkdirLock(str(tmp_path)).acquire()
  first.release()
  with run_lock.hold(str(tmp_path)):
    pass


def test_a_lock_left_by_a_killed_run_does_not_block_a_restart(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from pspnet_jax import run_lock; '
       'lock = run_lock.WorkdirLock(sys.argv[1]); lock.acquire(); print("held", flush=True); '
       'time.sleep(60)',
       str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'held'
  with pytest.raises(run_lock.WorkdirInUse, match=rf'"pid": {holder.pid}'):
    run_lock.WorkdirLock(str(tmp_path)).acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  deadline = time.time() + 10
  with run_lock.hold(str(tmp_path)):
    assert time.time() < deadline
  assert (tmp_path / run_lock.LOCK_FILE).exists()  # it stays, naming the last holder


def test_training_refuses_a_workdir_held_by_another_run(tmp_path):
  with run_lock.hold(str(tmp_path)):
    with pytest.raises(run_lock.WorkdirInUse, match=str(tmp_path)):
      train.train_and_evaluate(default.get_config(), str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists() and not (tmp_path / 'config.json').exists()


@pytest.mark.slow
def test_the_training_command_exits_75_on_a_held_workdir(tmp_path):
  """EX_TEMPFAIL, not a failure: launch/tpu.sh watch retries it (a lease may still be running
  out), where it gives up on exit 1."""
  with run_lock.hold(str(tmp_path)):
    result = subprocess.run([sys.executable, '-m', 'pspnet_jax.main', '--config=configs/ade20k.py',
                             f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 75, result.stderr[-3000:]
  assert 'in use by another run' in result.stderr

"""Two processes on 127.0.0.1 train one run together (one CPU device each, gloo collectives).

Process 0 alone writes the metrics; every process saves its own Grain iterator
state in the same checkpoint; SIGTERM delivered to one process makes both
save the same step and exit 0, and the restart equals an uninterrupted run; a
restart with another process count is refused with a message instead of a
missing-file error deep in Grain.
"""

import os
import signal
import socket
import subprocess
import time

import pytest

from demo_runs import REPO, demo_config, main_command, read_rows
from pspnet_jax import checkpoint
from pspnet_jax.data import synthetic
from test_resume import OVERRIDES, assert_same_last_checkpoint

# Whole training runs: CI runs them, `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

NUM_STEPS = 12
ENV = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def command(workdir, data_dir):
  return main_command(workdir, data_dir, {**OVERRIDES, 'train.num_steps': NUM_STEPS})


def start_two_processes(workdir, data_dir):
  address = f'127.0.0.1:{free_port()}'
  return [subprocess.Popen(command(workdir, data_dir) + [
      f'--coordinator_address={address}', '--num_processes=2', f'--process_id={index}'],
      cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for index in range(2)]


def wait_all(processes):
  for process in processes:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A two-process run, and the same run with SIGTERM sent to process 1 part-way, restarted."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  straight = str(tmp_path_factory.mktemp('straight'))
  stopped = str(tmp_path_factory.mktemp('stopped'))
  # Built once up front, so the two processes do not race to build it.
  synthetic.prepare(demo_config(data_dir, OVERRIDES))
  wait_all(start_two_processes(straight, data_dir))

  processes = start_two_processes(stopped, data_dir)
  deadline = time.time() + 300
  metrics_file = os.path.join(stopped, 'metrics.jsonl')
  while time.time() < deadline and processes[1].poll() is None:
    if os.path.exists(metrics_file) and len(read_rows(stopped)) >= 2:
      processes[1].send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  wait_all(processes)
  stopped_at = checkpoint.all_steps(stopped)
  wait_all(start_two_processes(stopped, data_dir))
  return data_dir, straight, stopped, stopped_at


def test_two_processes_train_one_run(runs):
  data_dir, straight, _, _ = runs
  rows = read_rows(straight)
  assert [row['step'] for row in rows if 'train/loss' in row] == list(range(1, NUM_STEPS + 1))
  assert 0 <= rows[-1]['eval/mIoU'] <= 1
  data_item = os.path.join(straight, 'checkpoints', str(NUM_STEPS), 'data')
  states = sorted(name for name in os.listdir(data_item) if name.startswith('process_'))
  assert states == ['process_0-of-2.json', 'process_1-of-2.json']

  one_process = subprocess.run(command(straight, data_dir), cwd=REPO,
                               env={**ENV, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'},
                               capture_output=True, text=True)
  assert one_process.returncode != 0
  assert 'same number of processes' in one_process.stderr


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_restart_equals_a_straight_run(
    runs):
  _, straight, stopped, stopped_at = runs
  # Both processes saved into one checkpoint (each its own data state) at the same step.
  assert len(stopped_at) == 1 and 2 <= stopped_at[0] < NUM_STEPS, stopped_at
  expected, got = read_rows(straight), read_rows(stopped)
  assert [row['step'] for row in got if 'train/loss' in row] == list(range(1, NUM_STEPS + 1))
  for mine, reference in zip(got, expected):
    assert mine.get('train/loss') == reference.get('train/loss'), mine['step']
  assert_same_last_checkpoint(straight, stopped, NUM_STEPS)

"""Two processes on 127.0.0.1 train one run together (one CPU device each, gloo collectives).

Process 0 alone writes the metrics; every process saves its own Grain iterator
state in the same checkpoint; a restart with another process count is refused
with a message instead of a missing-file error deep in Grain.
"""

import os
import socket
import subprocess

import pytest

from demo_runs import REPO, demo_config, main_command, read_rows
from pspnet_jax.data import synthetic
from test_resume import OVERRIDES

# Whole training runs: CI runs them, `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

NUM_STEPS = 4


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def command(workdir, data_dir):
  return main_command(workdir, data_dir, {**OVERRIDES, 'train.num_steps': NUM_STEPS})


def test_two_processes_train_one_run(tmp_path):
  workdir, data_dir = str(tmp_path / 'run'), str(tmp_path / 'tfds')
  # Built once up front, so the two processes do not race to build it.
  synthetic.prepare(demo_config(data_dir, OVERRIDES))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  address = f'127.0.0.1:{free_port()}'
  processes = [subprocess.Popen(command(workdir, data_dir) + [
      f'--coordinator_address={address}', '--num_processes=2', f'--process_id={index}'],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for index in range(2)]
  for process in processes:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]

  rows = read_rows(workdir)
  assert [row['step'] for row in rows if 'train/loss' in row] == list(range(1, NUM_STEPS + 1))
  assert 0 <= rows[-1]['eval/mIoU'] <= 1
  data_item = os.path.join(workdir, 'checkpoints', str(NUM_STEPS), 'data')
  states = sorted(name for name in os.listdir(data_item) if name.startswith('process_'))
  assert states == ['process_0-of-2.json', 'process_1-of-2.json']

  one_process = subprocess.run(command(workdir, data_dir), cwd=REPO,
                               env={**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'},
                               capture_output=True, text=True)
  assert one_process.returncode != 0
  assert 'same number of processes' in one_process.stderr

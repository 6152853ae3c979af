"""Two processes on 127.0.0.1 train one run together (one CPU device each, gloo collectives).

Process 0 alone writes the metrics; every process saves its own Grain iterator
state in the same checkpoint; a restart with another process count is refused
with a message instead of a missing-file error deep in Grain.
"""

import json
import os
import socket
import subprocess
import sys

from test_resume import OVERRIDES, REPO

NUM_STEPS = 4


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def command(workdir, data_dir):
  overrides = {**OVERRIDES, 'train.num_steps': NUM_STEPS}
  return [sys.executable, '-m', 'pspnet_jax.main', '--config=configs/demo.py',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}'] + [
              f'--config.{key}={value}' for key, value in overrides.items()]


def test_two_processes_train_one_run(tmp_path):
  workdir, data_dir = str(tmp_path / 'run'), str(tmp_path / 'tfds')
  # Built once up front, so the two processes do not race to build it.
  subprocess.run([sys.executable, '-c', 'import sys; from configs import demo; '
                  'from pspnet_jax.data import synthetic; c = demo.get_config(); '
                  f'c.data.data_dir = {data_dir!r}; '
                  + '; '.join(f'c.{key} = {value!r}' for key, value in OVERRIDES.items()
                              if key.startswith('data.synthetic'))
                  + '; synthetic.prepare(c)'], cwd=REPO, check=True, capture_output=True)
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  address = f'127.0.0.1:{free_port()}'
  processes = [subprocess.Popen(command(workdir, data_dir) + [
      f'--coordinator_address={address}', '--num_processes=2', f'--process_id={index}'],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for index in range(2)]
  for process in processes:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]

  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
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

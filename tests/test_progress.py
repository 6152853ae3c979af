"""What a run says on the console, a restart of a finished run, and prepare's training command.

- a progress line from the first step on (then every train.log_every steps) and a summary at
  the end, no clu "Setting work unit notes" lines;
- a finished run started again does no training or evaluation and writes nothing: the same
  metrics.jsonl bytes, no new TensorBoard event file, no config record; a longer schedule
  (--allow_config_change=train.num_steps) still trains on, and an eval.at_end_of_training
  protocol that did not run yet still runs, alone;
- `prepare --dataset=folder` on a folder of six images prints a command that trains as printed.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from configs import default
from demo_runs import REPO, main_command, read_rows
from fake_datasets import fake_folder, run_prepare
from pspnet_jax import evaluation, train, writers
from pspnet_jax.data import registry

# A short run of the demo on tiny images: 4 steps, progress lines at steps 1, 3 and 4.
STEPS = 4
OVERRIDES = {
    'data.synthetic.num_train': 16, 'data.synthetic.num_validation': 4,
    'data.synthetic.min_size': 41, 'data.synthetic.max_size': 57, 'data.crop_size': 41,
    'train.batch_size': 4, 'train.num_steps': STEPS, 'train.log_every': 3,
    'train.checkpoint_every': 1000, 'train.eval_every': 0, 'eval.batch_size': 4,
    'eval.at_end_of_training': True}
ONE_DEVICE = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
# Compiling as a fresh run does (no persistent cache), for the time a restart saves.
UNCACHED = {**ONE_DEVICE, 'JAX_ENABLE_COMPILATION_CACHE': 'false'}
PROGRESS = re.compile(r'step +(\d+)/(\d+)  loss (\d+\.\d{4})  (\d+\.\d) img/s  ETA (\S+)')


def test_progress_line():
  assert train.progress_line(150, 8000, 1.23456, 2.14, 0.47) == (
      'step  150/8000  loss 1.2346  2.1 img/s  ETA 1h01m')
  assert train.progress_line(7, 10, None, 30.0, 4.0) == (
      'step  7/10  loss non-finite  30.0 img/s  ETA 12s')
  assert train.progress_line(1, 250, 2.0, 5.0, 1.01, data_wait_fraction=0.5).endswith(
      'ETA 4m11s  (waiting for data 50% of the time)')


def test_batch_sizes_for_a_small_set_fit_the_images_and_the_devices():
  assert registry.RECIPE_BATCH_SIZE == default.get_config().train.batch_size
  assert registry.RECIPE_BATCH_SIZE == default.get_config().eval.batch_size
  assert registry.small_set_batch_sizes(6, 1) == {'train.batch_size': 6}
  assert registry.small_set_batch_sizes(6, 4) == {'train.batch_size': 4}
  assert registry.small_set_batch_sizes(6, 3) == {'train.batch_size': 6, 'eval.batch_size': 15}
  # Fewer images than devices: no batch fits (prepare says so).
  assert registry.small_set_batch_sizes(3, 8) == {}
  assert registry.small_set_batch_sizes(6, 32) == {'eval.batch_size': 32}
  # The recipe's batch when the images fill it.
  assert registry.small_set_batch_sizes(16, 3) == {}
  config = ml_collections.ConfigDict({'data': {'name': 'folder', 'data_dir': '/data',
                                               'folder_dir': '/src/boats'}})
  assert registry.training_flags(config, 3, num_train=6, num_devices=4).endswith(
      '--config.data.data_dir=/data --config.train.batch_size=4')


def test_eval_row_is_the_last_evaluation_of_a_step(tmp_path):
  assert writers.eval_row(str(tmp_path), 4) is None
  rows = [{'step': 4, 'train/loss': 1.0}, {'step': 4, 'eval/mIoU': 0.25},
          {'step': 4, 'eval_whole/mIoU': 0.5}, {'step': 8, 'eval/mIoU': 0.75}]
  (tmp_path / writers.METRICS_FILE).write_text(
      ''.join(json.dumps(row) + '\n' for row in rows) + '{"step": 4, "eval/mI')
  assert writers.eval_row(str(tmp_path), 4) == rows[1]
  assert writers.eval_row(str(tmp_path), 4, 'eval_whole') == rows[2]
  assert writers.eval_row(str(tmp_path), 6) is None


def run_main(workdir, data_dir, flags=(), env=None, **overrides):
  """(stderr, seconds) of `python -m pspnet_jax.main` on the tiny demo, which must succeed."""
  start = time.perf_counter()
  result = subprocess.run(main_command(workdir, data_dir, {**OVERRIDES, **overrides}) +
                          list(flags), cwd=REPO, env=env or ONE_DEVICE, capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stderr, time.perf_counter() - start


def snapshot(workdir) -> dict:
  """Every file under `workdir` but the run lock (rewritten by each start) -> its bytes."""
  files = {}
  for folder, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(folder, name)
      if name != 'run.lock':
        with open(path, 'rb') as f:
          files[os.path.relpath(path, workdir)] = f.read()
  return files


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """(data dir, workdir, stderr, seconds) of a finished tiny run."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  workdir = str(tmp_path_factory.mktemp('run'))
  stderr, seconds = run_main(workdir, data_dir, env=UNCACHED)
  return data_dir, workdir, stderr, seconds


@pytest.mark.slow
def test_progress_from_the_first_step_and_a_summary_at_the_end(finished):
  _, workdir, stderr, _ = finished
  lines = [PROGRESS.search(line) for line in stderr.splitlines()]
  progress = [match.groups() for match in lines if match]
  assert [(int(step), int(total)) for step, total, *_ in progress] == [(1, 4), (3, 4), (4, 4)]
  rows = read_rows(workdir)
  # The logged steps' lines carry their metrics.jsonl rows' mean loss and images/s.
  for step, _, loss, images_per_sec, _ in progress[1:]:
    (row,) = [row for row in rows if row['step'] == int(step) and 'train/loss' in row]
    assert loss == f'{row["train/loss"]:.4f}'
    assert images_per_sec == f'{row["train/images_per_sec"]:.1f}'
  assert 'Setting work unit notes' not in stderr
  # The first step's line comes before the second step ran to its end: before step 3's.
  assert stderr.index('step 1/4') < stderr.index('step 3/4')
  summary = stderr[stderr.index(f'run complete: step {STEPS} of {STEPS}'):]
  final = writers.eval_row(workdir, STEPS)
  protocol = writers.eval_row(workdir, STEPS, 'eval_whole')
  assert (f'evaluation at step {STEPS} (validation): mIoU {final["eval/mIoU"]:.4f}  '
          f'mAcc {final["eval/mAcc"]:.4f}  allAcc {final["eval/allAcc"]:.4f}') in summary
  assert f'whole protocol at step {STEPS}: mIoU {protocol["eval_whole/mIoU"]:.4f}' in summary
  assert f'best checkpoint: step {STEPS}, mIoU {final["eval/mIoU"]:.4f}' in summary
  assert f'checkpoints: {os.path.join(workdir, "checkpoints")} (latest: step {STEPS})' in summary
  assert os.path.join(workdir, 'metrics.jsonl') in summary
  assert re.search(r'time: \d+(m\d\ds)?s? \(this start\)', summary), summary


@pytest.mark.slow
def test_a_finished_run_started_again_does_nothing(finished):
  data_dir, workdir, first_stderr, first_seconds = finished
  before = snapshot(workdir)
  stderr, seconds = run_main(workdir, data_dir, env=UNCACHED)
  assert snapshot(workdir) == before   # metrics.jsonl, event files, config.json, eval/, ...
  assert 'run already complete: step 4 of 4 was trained and evaluated before' in stderr
  assert '--allow_config_change=train.num_steps' in stderr
  final = writers.eval_row(workdir, STEPS)
  assert f'evaluation at step {STEPS} (validation): mIoU {final["eval/mIoU"]:.4f}' in stderr
  assert 'train step compiled' in first_stderr and 'train step compiled' not in stderr
  assert not PROGRESS.search(stderr) and 'per-class results' not in stderr
  assert seconds < 0.6 * first_seconds, (seconds, first_seconds)


@pytest.mark.slow
def test_a_longer_schedule_trains_on_and_a_missing_protocol_evaluation_still_runs(
    finished, tmp_path):
  data_dir, done, _, _ = finished
  workdir = str(tmp_path / 'longer')
  shutil.copytree(done, workdir)
  # Two more steps, without the protocol at the end.
  stderr, _ = run_main(workdir, data_dir, ['--allow_config_change=train.num_steps'],
                       **{'train.num_steps': 6, 'eval.at_end_of_training': False})
  rows = read_rows(workdir)
  assert [row['step'] for row in rows if 'train/loss' in row] == [3, 4, 6]
  assert writers.eval_row(workdir, 6) is not None
  assert writers.eval_row(workdir, 6, 'eval_whole') is None
  assert re.search(r'step 5/6  loss', stderr) and 'run complete: step 6 of 6' in stderr
  # Started again with the protocol asked for: only the protocol runs.
  before = read_rows(workdir)
  stderr, _ = run_main(workdir, data_dir, **{'train.num_steps': 6})
  after = read_rows(workdir)
  assert after[:len(before)] == before
  (added,) = after[len(before):]
  assert added['step'] == 6 and 'eval_whole/mIoU' in added
  with open(evaluation.results_path(workdir, 'validation', 6, 'whole'), encoding='utf-8') as f:
    assert json.load(f)['mIoU'] == added['eval_whole/mIoU']
  assert 'train step compiled' not in stderr and not PROGRESS.search(stderr)
  assert 'run complete: step 6 of 6' in stderr


@pytest.mark.slow
def test_prepare_prints_a_training_command_that_runs_on_six_images(tmp_path):
  """Six training images on three devices: train batch 6, eval batch 15 (the recipe's 16
  fits neither)."""
  root = fake_folder(tmp_path / 'harbour', 'water\nboat\nsky\n',
                     {'train': list('abcdef'), 'validation': ['v', 'w']},
                     np.random.default_rng(7))
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=3'}
  output = run_prepare('folder', root, tmp_path / 'tfds', env=env)
  (line,) = [line for line in output.splitlines() if line.startswith('train on it with: ')]
  command = shlex.split(line.removeprefix('train on it with: '))
  assert command[:3] == ['python', '-m', 'pspnet_jax.main']
  assert '--config.train.batch_size=6' in command and '--config.eval.batch_size=15' in command
  workdir = tmp_path / 'work'
  command = ([sys.executable] + command[1:-1] + [f'--workdir={workdir}'] +
             # Not the batch sizes: a small model, crop and schedule, so that it runs in seconds.
             ['--config.model.backbone=resnet18', '--config.data.crop_size=33',
              '--config.train.num_steps=2', '--config.train.log_every=1'])
  assert command[-5] == f'--workdir={workdir}' and line.endswith('--workdir=WORKDIR')
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = read_rows(workdir)
  assert [row['step'] for row in rows if 'train/loss' in row] == [1, 2]
  assert writers.eval_row(str(workdir), 2) is not None

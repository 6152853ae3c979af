"""Whole runs of `python -m pspnet_jax.main`: SIGTERM and restart = uninterrupted, bit for bit,
ending with the official protocol (eval.at_end_of_training) in both.

Also: consecutive non-finite steps stop the run with the last checkpoint
intact; a resume with a config that changes the computation is refused by key
unless allowed (then logged, and config_history/ keeps every start's config).
"""

import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from flax import nnx

from configs import demo
from demo_runs import REPO, demo_config, main_command, read_rows
from pspnet_jax import checkpoint, evaluation, train
from pspnet_jax.data import pipeline
from pspnet_jax.models import create_model

# Whole training runs: CI runs them, `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow

NUM_STEPS = 24
OVERRIDES = {
    'data.synthetic.num_train': 24, 'data.synthetic.num_validation': 5,
    'data.synthetic.min_size': 41, 'data.synthetic.max_size': 57, 'data.crop_size': 41,
    'train.num_steps': NUM_STEPS, 'train.log_every': 1, 'train.checkpoint_every': 1000,
    'train.eval_every': 0, 'eval.batch_size': 8, 'optim.base_lr': 0.02}


def command(workdir, data_dir):
  # Both runs end with the official protocol as well (the demo's: whole, at the original sizes).
  return main_command(workdir, data_dir, {**OVERRIDES, 'eval.at_end_of_training': True})


# Two devices: the restore goes through a sharded mesh, without the cost of eight simulated ones.
ENV = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}


def final_variables(workdir):
  config = demo.get_config()
  model = nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0)))
  variables, step, _ = checkpoint.restore_model(workdir, checkpoint.model_variables(model))
  return step, jax.device_get(variables.to_pure_dict())


def assert_same_last_checkpoint(straight, stopped, num_steps):
  """Both workdirs end at checkpoint `num_steps` with bitwise equal variables."""
  straight_step, straight_vars = final_variables(straight)
  stopped_step, stopped_vars = final_variables(stopped)
  assert straight_step == stopped_step == num_steps
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(straight_vars),
                          jax.tree.leaves(stopped_vars)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """An uninterrupted run, and the same run stopped by SIGTERM part-way then restarted."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  straight = str(tmp_path_factory.mktemp('straight'))
  stopped = str(tmp_path_factory.mktemp('stopped'))
  subprocess.run(command(straight, data_dir), cwd=REPO, env=ENV, check=True, capture_output=True)

  process = subprocess.Popen(command(stopped, data_dir), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  metrics_file = os.path.join(stopped, 'metrics.jsonl')
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(metrics_file) and len(read_rows(stopped)) >= 3:
      process.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  stopped_at = checkpoint.all_steps(stopped)
  subprocess.run(command(stopped, data_dir), cwd=REPO, env=ENV, check=True, capture_output=True)
  return straight, stopped, stopped_at


def test_sigterm_saves_a_checkpoint_part_way(runs):
  _, _, stopped_at = runs
  assert len(stopped_at) == 1 and 3 <= stopped_at[0] < NUM_STEPS, stopped_at


def test_restarted_run_equals_uninterrupted_run_bitwise(runs):
  straight, stopped, _ = runs
  expected = read_rows(straight)
  got = read_rows(stopped)
  assert [row['step'] for row in expected if 'train/loss' in row] == list(range(1, NUM_STEPS + 1))
  assert [row['step'] for row in got if 'train/loss' in row] == list(range(1, NUM_STEPS + 1))
  keys = ('train/loss', 'train/main_loss', 'train/aux_loss', 'train/pixel_acc',
          'train/lr_backbone', 'train/lr_head')
  for mine, reference in zip(got, expected):
    assert {key: mine.get(key) for key in keys} == {key: reference.get(key) for key in keys}
  final = lambda rows, key: [row[key] for row in rows if key in row]
  assert final(got, 'eval/mIoU') == final(expected, 'eval/mIoU')
  # The run ended with the protocol too: one row, its results file, the same in both runs.
  assert final(got, 'eval_whole/mIoU') == final(expected, 'eval_whole/mIoU')
  assert len(final(got, 'eval_whole/mIoU')) == 1
  with open(evaluation.results_path(stopped, 'validation', NUM_STEPS, 'whole'),
            encoding='utf-8') as f:
    assert json.load(f)['mIoU'] == final(got, 'eval_whole/mIoU')[0]
  assert_same_last_checkpoint(straight, stopped, NUM_STEPS)


def test_learning_rate_trace_of_a_run_is_the_official_one(runs):
  """Logged lr of step k (1-based) is base * (1 - (k-1)/N) ** 0.9; heads 10x."""
  straight, _, _ = runs
  rows = [row for row in read_rows(straight) if 'train/lr_backbone' in row]
  for row in rows[:3] + rows[-3:]:
    expected = OVERRIDES['optim.base_lr'] * (1 - (row['step'] - 1) / NUM_STEPS) ** 0.9
    assert row['train/lr_backbone'] == pytest.approx(expected, rel=1e-6)
    assert row['train/lr_head'] == pytest.approx(10 * expected, rel=1e-6)


def small_config(data_dir, **overrides):
  return demo_config(data_dir, {**OVERRIDES, **overrides})


class PoisonAfter:
  """A train loader whose images turn NaN after `good` batches (iterator state kept intact)."""

  def __init__(self, loader, good):
    self._loader, self._good = loader, good

  def __iter__(self):
    return _PoisonIterator(iter(self._loader), self._good)


class _PoisonIterator:

  def __init__(self, iterator, good):
    self._iterator, self._good, self._count = iterator, good, 0

  def __next__(self):
    batch = next(self._iterator)
    self._count += 1
    if self._count > self._good:
      batch['image'] = np.full_like(batch['image'], np.nan)
    return batch

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(state)


def test_consecutive_nonfinite_steps_stop_with_the_checkpoint_intact(tmp_path, monkeypatch):
  config = small_config(str(tmp_path / 'tfds'), **{'train.checkpoint_every': 2,
                                                   'train.max_nonfinite_steps': 3,
                                                   'train.log_every': 2})
  real_loader = pipeline.train_loader
  monkeypatch.setattr(pipeline, 'train_loader',
                      lambda config: PoisonAfter(real_loader(config), good=4))
  workdir = str(tmp_path / 'run')
  with pytest.raises(FloatingPointError, match=r'train\.max_nonfinite_steps=3'):
    train.train_and_evaluate(config, workdir)
  rows = read_rows(workdir)
  assert rows[-1]['train/nonfinite_steps'] >= 2
  # Checkpoints at 4 and 6; 6 comes after two skipped steps, so it holds step 4's weights.
  step, variables = final_variables(workdir)
  assert step == 6
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables))


def test_a_resume_with_a_changed_config_is_refused_by_key(runs, tmp_path):
  straight, _, _ = runs
  workdir = str(tmp_path / 'copy')
  shutil.copytree(straight, workdir)
  config = small_config(str(tmp_path / 'tfds'), **{'model.output_stride': 8,
                                                   'train.batch_size': 16})
  with pytest.raises(ValueError, match=r'model\.output_stride: 16 -> 8; train\.batch_size: 8 -> 16'
                                       r'.*--allow_config_change=model\.output_stride,'
                                       r'train\.batch_size'):
    train.train_and_evaluate(config, workdir)
  # Allowed, a change of architecture still cannot load the weights: refused by parameter.
  config = small_config(str(tmp_path / 'tfds'), **{'model.use_ppm': False})
  with pytest.raises(ValueError, match='does not match the model of the config'):
    train.train_and_evaluate(config, workdir, allowed_config_changes=['model.use_ppm'])


def test_an_allowed_longer_schedule_continues_and_keeps_the_config_history(runs, tmp_path):
  straight, _, _ = runs
  workdir = str(tmp_path / 'copy')
  shutil.copytree(straight, workdir)
  longer = NUM_STEPS + 2
  result = subprocess.run(command(workdir, str(tmp_path / 'tfds')) + [
      f'--config.train.num_steps={longer}', '--allow_config_change=train.num_steps'],
                          cwd=REPO, env=ENV, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'with config changes: train.num_steps: {NUM_STEPS} -> {longer}' in result.stderr
  assert [row['step'] for row in read_rows(workdir) if 'train/loss' in row] == list(
      range(1, longer + 1))
  history = sorted(os.listdir(os.path.join(workdir, train.CONFIG_HISTORY_DIR)))
  assert [name.split('-')[-1] for name in history] == ['step0.json', f'step{NUM_STEPS}.json']
  with open(os.path.join(workdir, train.CONFIG_HISTORY_DIR, history[0]), encoding='utf-8') as f:
    assert json.load(f)['train']['num_steps'] == NUM_STEPS
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['train']['num_steps'] == longer

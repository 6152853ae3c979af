"""Whole runs of `python -m pspnet_jax.main`: SIGTERM and restart = uninterrupted, bit for bit,
ending with the official protocol (eval.at_end_of_training) in both.

Also: consecutive non-finite steps stop the run with the last checkpoint
intact; a resume with a config that changes the computation is refused by key
unless allowed (then logged, and config_history/ keeps every start's config).
"""

import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from demo_runs import (REPO, RESUME_OVERRIDES, RESUME_STEPS, TWO_DEVICES,
                       assert_same_last_checkpoint, demo_config, final_variables, read_rows,
                       resume_command, sigterm_after_rows)
from pspnet_jax import checkpoint, evaluation, train
from pspnet_jax.data import pipeline

# Whole training runs: CI runs them, `pytest -m "not slow"` skips them.
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def runs(straight_run, tmp_path_factory):
  """The uninterrupted run, and the same run stopped by SIGTERM part-way then restarted."""
  data_dir, straight = straight_run
  stopped = str(tmp_path_factory.mktemp('stopped'))

  process = subprocess.Popen(resume_command(stopped, data_dir), cwd=REPO, env=TWO_DEVICES,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  sigterm_after_rows(process, stopped, 3)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  stopped_at = checkpoint.all_steps(stopped)
  subprocess.run(resume_command(stopped, data_dir), cwd=REPO, env=TWO_DEVICES, check=True,
                 capture_output=True)
  return straight, stopped, stopped_at


def test_sigterm_saves_a_checkpoint_part_way(runs):
  _, _, stopped_at = runs
  assert len(stopped_at) == 1 and 3 <= stopped_at[0] < RESUME_STEPS, stopped_at


def test_every_logged_window_reports_its_share_of_waiting_for_data(runs):
  straight, _, _ = runs
  fractions = [row['train/data_wait_fraction'] for row in read_rows(straight)
               if 'train/loss' in row]
  assert len(fractions) == RESUME_STEPS and all(0.0 <= f <= 1.0 for f in fractions), fractions


def test_restarted_run_equals_uninterrupted_run_bitwise(runs):
  straight, stopped, _ = runs
  expected = read_rows(straight)
  got = read_rows(stopped)
  steps = list(range(1, RESUME_STEPS + 1))
  assert [row['step'] for row in expected if 'train/loss' in row] == steps
  assert [row['step'] for row in got if 'train/loss' in row] == steps
  keys = ('train/loss', 'train/main_loss', 'train/aux_loss', 'train/pixel_acc',
          'train/lr_backbone', 'train/lr_head')
  for mine, reference in zip(got, expected):
    assert {key: mine.get(key) for key in keys} == {key: reference.get(key) for key in keys}
  final = lambda rows, key: [row[key] for row in rows if key in row]
  assert final(got, 'eval/mIoU') == final(expected, 'eval/mIoU')
  # The run ended with the protocol too: one row, its results file, the same in both runs.
  assert final(got, 'eval_whole/mIoU') == final(expected, 'eval_whole/mIoU')
  assert len(final(got, 'eval_whole/mIoU')) == 1
  with open(evaluation.results_path(stopped, 'validation', RESUME_STEPS, 'whole'),
            encoding='utf-8') as f:
    assert json.load(f)['mIoU'] == final(got, 'eval_whole/mIoU')[0]
  assert_same_last_checkpoint(straight, stopped, RESUME_STEPS)


def test_learning_rate_trace_of_a_run_is_the_official_one(runs):
  """Logged lr of step k (1-based) is base * (1 - (k-1)/N) ** 0.9; heads 10x."""
  straight, _, _ = runs
  rows = [row for row in read_rows(straight) if 'train/lr_backbone' in row]
  for row in rows[:3] + rows[-3:]:
    expected = (RESUME_OVERRIDES['optim.base_lr'] *
                (1 - (row['step'] - 1) / RESUME_STEPS) ** 0.9)
    assert row['train/lr_backbone'] == pytest.approx(expected, rel=1e-6)
    assert row['train/lr_head'] == pytest.approx(10 * expected, rel=1e-6)


def small_config(data_dir, **overrides):
  return demo_config(data_dir, {**RESUME_OVERRIDES, **overrides})


def poisoned_from(first_bad_step):
  """pipeline.train_batches whose images turn NaN from global batch `first_bad_step` on."""
  real_batches = pipeline.train_batches

  def train_batches(config, first_step, num_steps, **kwargs):
    batches = real_batches(config, first_step, num_steps, **kwargs)
    for step, batch in zip(range(first_step, num_steps), batches):
      if step >= first_bad_step:
        batch['image'] = np.full_like(batch['image'], np.nan)
      yield batch
  return train_batches


def test_consecutive_nonfinite_steps_stop_with_the_checkpoint_intact(tmp_path, monkeypatch):
  config = small_config(str(tmp_path / 'tfds'), **{'train.checkpoint_every': 2,
                                                   'train.max_nonfinite_steps': 3,
                                                   'train.log_every': 2})
  monkeypatch.setattr(pipeline, 'train_batches', poisoned_from(4))
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
  longer = RESUME_STEPS + 2
  result = subprocess.run(resume_command(workdir, str(tmp_path / 'tfds')) + [
      f'--config.train.num_steps={longer}', '--allow_config_change=train.num_steps'],
                          cwd=REPO, env=TWO_DEVICES, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'with config changes: train.num_steps: {RESUME_STEPS} -> {longer}' in result.stderr
  assert [row['step'] for row in read_rows(workdir) if 'train/loss' in row] == list(
      range(1, longer + 1))
  history = sorted(os.listdir(os.path.join(workdir, train.CONFIG_HISTORY_DIR)))
  assert [name.split('-')[-1] for name in history] == ['step0.json', f'step{RESUME_STEPS}.json']
  with open(os.path.join(workdir, train.CONFIG_HISTORY_DIR, history[0]), encoding='utf-8') as f:
    assert json.load(f)['train']['num_steps'] == RESUME_STEPS
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['train']['num_steps'] == longer

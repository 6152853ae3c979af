"""Shared by the tests that run whole trainings of configs/demo.py: command lines, configs, rows."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

from configs import demo
from pspnet_jax import checkpoint
from pspnet_jax.models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(workdir, data_dir, overrides: dict) -> list[str]:
  """`python -m pspnet_jax.main --config=configs/demo.py` with `--config.<key>=<value>` overrides."""
  return [sys.executable, '-m', 'pspnet_jax.main', '--config=configs/demo.py',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}'] + [
              f'--config.{key}={value}' for key, value in overrides.items()]


def demo_config(data_dir, overrides: dict):
  """The config that main_command(…, data_dir, overrides) trains with."""
  config = demo.get_config()
  config.data.data_dir = data_dir
  for key, value in overrides.items():
    *sections, field = key.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  return config


def read_rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


# The resume runs (test_resume, test_multihost): a short demo run on 2 devices.
RESUME_STEPS = 24
RESUME_OVERRIDES = {
    'data.synthetic.num_train': 24, 'data.synthetic.num_validation': 5,
    'data.synthetic.min_size': 41, 'data.synthetic.max_size': 57, 'data.crop_size': 41,
    'train.num_steps': RESUME_STEPS, 'train.log_every': 1, 'train.checkpoint_every': 1000,
    'train.eval_every': 0, 'eval.batch_size': 8, 'optim.base_lr': 0.02}
# Two devices: the restore goes through a sharded mesh, without the cost of eight simulated ones.
TWO_DEVICES = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}


def resume_command(workdir, data_dir):
  # The runs end with the official protocol as well (the demo's: whole, at the original sizes).
  return main_command(workdir, data_dir, {**RESUME_OVERRIDES, 'eval.at_end_of_training': True})


def straight_resume_run(workdir, data_dir) -> None:
  """The uninterrupted resume run, on one process with two devices."""
  subprocess.run(resume_command(workdir, data_dir), cwd=REPO, env=TWO_DEVICES, check=True,
                 capture_output=True)


def final_variables(workdir):
  config = demo.get_config()
  model = nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0)))
  variables, step, _ = checkpoint.restore_model(workdir, checkpoint.model_variables(model))
  return step, jax.device_get(variables.to_pure_dict())


def assert_same_last_checkpoint(straight, stopped, num_steps, rtol=0.0):
  """Both workdirs end at checkpoint `num_steps` with equal variables (bitwise by default)."""
  straight_step, straight_vars = final_variables(straight)
  stopped_step, stopped_vars = final_variables(stopped)
  assert straight_step == stopped_step == num_steps
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(straight_vars),
                          jax.tree.leaves(stopped_vars)):
    np.testing.assert_allclose(b, a, rtol=rtol, atol=0, err_msg=jax.tree_util.keystr(path))


def sigterm_after_rows(process, workdir, rows: int) -> None:
  """Sends SIGTERM to `process` once WORKDIR/metrics.jsonl has `rows` rows (or it ended)."""
  metrics_file = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(metrics_file) and len(read_rows(workdir)) >= rows:
      process.send_signal(signal.SIGTERM)
      return
    time.sleep(0.02)

"""Shared by the tests that run whole trainings of configs/demo.py: command lines, configs, rows."""

import json
import os
import sys

from configs import demo

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
    section, field = key.rsplit('.', 1)
    config[section][field] = value
  return config


def read_rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]

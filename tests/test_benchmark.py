"""The benchmark command end to end at toy sizes: one JSON line whose fields make sense.

Timings depend on the machine and its load, so only their sign is checked.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from pspnet_jax.benchmarks import timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small synthetic dataset and crop; the demo config's ResNet-18 at output stride 16.
TINY = ['--config=configs/demo.py', '--config.data.crop_size=65', '--batch_size=2',
        '--config.data.synthetic.num_train=8', '--config.data.synthetic.num_validation=2',
        '--config.data.synthetic.min_size=65', '--config.data.synthetic.max_size=81']


def _benchmark(args: list[str], devices: int) -> dict:
  """Runs the command on `devices` CPU devices; returns its stdout, which must be one JSON line."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  result = subprocess.run([sys.executable, '-m', 'pspnet_jax.benchmark', *TINY, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  lines = result.stdout.splitlines()
  assert len(lines) == 1, result.stdout
  return json.loads(lines[0])


@pytest.mark.slow
def test_train_step_on_two_devices_beside_the_torch_twin():
  result = _benchmark(['--what=train', '--steps=1', '--torch_reference'], devices=2)
  assert (result['what'], result['backbone'], result['size'], result['batch_size'],
          result['num_devices']) == ('train', 'resnet18', 65, 2, 2)
  for key in ('compile_seconds', 'jax_seconds', 'jax_images_per_s', 'flops_per_step',
              'achieved_flops_per_s', 'torch_seconds', 'torch_images_per_s',
              'jax_speedup_over_torch'):
    assert result[key] > 0, key
  assert '2 device' in result['flops_counted']
  # Forward and backward of a ResNet-18 PSPNet on two 65x65 crops: billions of FLOPs.
  assert 1e9 < result['flops_per_step'] < 1e11
  # No CPU peak is claimed, so no utilization either.
  assert result['peak_flops_per_s_per_device'] is None and result['mfu'] is None
  assert result['torch_threads'] >= 1


@pytest.mark.slow
def test_input_pipeline_builds_the_synthetic_data_and_counts_images(tmp_path):
  result = _benchmark(['--what=input', '--steps=3', f'--config.data.data_dir={tmp_path}'],
                      devices=1)
  assert (result['what'], result['dataset'], result['batch_size'], result['worker_count'],
          result['steps']) == ('input', 'synthetic', 2, 0, 3)
  assert result['images_per_s'] > 0 and result['images_per_cpu_second'] > 0
  assert os.path.isdir(tmp_path / 'synthetic_context')


@pytest.mark.slow
def test_input_on_fake_ade20k_beside_the_semseg_way():
  """ADE20K-sized pairs through the real builder and loader, and semseg's loop on the same files."""
  result = _benchmark(['--what=input', '--steps=2', '--fake_ade20k=3', '--semseg_reference',
                       '--config.data.crop_size=97'], devices=1)
  assert (result['what'], result['dataset'], result['size']) == ('input', 'ade20k', 97)
  for key in ('images_per_s', 'images_per_cpu_second', 'semseg_way_images_per_s',
              'semseg_way_images_per_cpu_second', 'speedup_over_semseg_way_per_cpu_second'):
    assert result[key] > 0, key


def test_cpu_seconds_count_live_child_processes():
  """Grain's workers are child processes: their CPU time must count. A child that
  burns ~0.6 s of CPU and then sleeps, while this process sleeps."""
  before = timing.cpu_seconds()
  child = subprocess.Popen([sys.executable, '-c', (
      'import time\nend = time.process_time() + 0.6\n'
      'while time.process_time() < end: pass\ntime.sleep(30)')])
  try:
    time.sleep(0.3)
    while child.poll() is None and timing.cpu_seconds() - before < 0.6:
      time.sleep(0.1)
    assert child.poll() is None
    assert 0.55 <= timing.cpu_seconds() - before < 2.0
  finally:
    child.kill()
    child.wait()

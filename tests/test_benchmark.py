"""The benchmark command end to end at toy sizes: one JSON line whose fields make sense; and the
eval benchmark's semseg way proven to compute what the Predictor computes.

Timings depend on the machine and its load, so only their sign is checked.
"""

import json
import os
import subprocess
import sys
import time

import cv2
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from configs import demo
from pspnet_jax import inference
from pspnet_jax.benchmarks import eval_speed, timing
from pspnet_jax.models import create_model

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


def small_eval_config(num_classes=5):
  """The demo's ResNet-18 at output stride 16, with windows of 33 on images resized to 48."""
  config = demo.get_config()
  config.data.num_classes = num_classes
  config.eval.crop_size = 33
  config.eval.base_size = 48
  config.eval.batch_size = 8
  return config


def test_semseg_way_of_the_eval_benchmark_equals_the_predictor():
  """The timed reference is the Predictor's computation: semseg's test.py transcription in
  eval_speed gives the same probabilities (two scales, flip, padding, several windows), and
  runs the model once per window counted by `window_count`."""
  config = small_eval_config()
  config.eval.scales = (0.75, 1.25)
  model = create_model(config, rngs=nnx.Rngs(0))
  # BatchNorm statistics and a classifier far from the initial ones: outputs far from uniform.
  rng = np.random.default_rng(1)
  for path, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.BatchStat):
      shape = variable.get_value().shape
      value = rng.uniform(0.5, 2.0, shape) if path[-1] == 'var' else rng.normal(0, 0.1, shape)
      variable.set_value(jax.numpy.asarray(value, jax.numpy.float32))
  model.cls.classifier.kernel.set_value(model.cls.classifier.kernel.get_value() * 20)
  model.eval()
  protocol = inference.Protocol.from_config(config, 'slide')
  images = [(index, cv2.resize(rng.integers(0, 256, (8, 8, 3)).astype(np.float32),
                               (width, height)).astype(np.uint8))
            for index, (height, width) in enumerate([(70, 50), (40, 90), (20, 25)])]
  got = dict(inference.Predictor.from_model(model, config, protocol=protocol).probabilities(
      images))
  twin = eval_speed.semseg_twin(config, model)
  batches = []

  def counting_twin(tensor):
    batches.append(tensor.shape[0])
    return twin(tensor)

  # One thread: windows of 33 gain nothing from more, and PyTorch's OpenMP threads stall
  # (5x here) while the other tests load the machine.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    for key, image in images:
      expected = eval_speed.semseg_probabilities(counting_twin, image, config.data.num_classes,
                                                 protocol, config.data.mean, config.data.std)
      np.testing.assert_allclose(got[key], expected, atol=2e-5)
      assert np.ptp(expected, axis=(0, 1)).max() > 0.01
  finally:
    torch.set_num_threads(threads)
  assert batches == [2] * sum(eval_speed.window_count(*image.shape[:2], protocol)
                              for _, image in images)
  # ADE20K at scale 1: a 512 x 683 image becomes 384 x 512, padded to 473 x 512: two windows.
  ade20k = inference.Protocol('slide', 473, 512, (1.0,), True)
  assert eval_speed.window_count(512, 683, ade20k) == 2
  assert eval_speed.window_count(683, 512, ade20k) == 2


def test_semseg_way_resizes_more_channels_than_opencv_5_takes():
  """ADE20K's 150 class probabilities, resized in slices: each channel as if alone (to cv2's
float32 interpolation weights, which its many-channel path uses)."""
  probabilities = np.random.default_rng(0).random((5, 7, 150))
  resized = eval_speed.cv2_resize(probabilities, (9, 6))
  assert resized.shape == (6, 9, 150)
  for channel in (0, 127, 128, 149):
    np.testing.assert_allclose(resized[..., channel], cv2.resize(
        probabilities[..., channel], (9, 6), interpolation=cv2.INTER_LINEAR), atol=1e-6)


def test_eval_benchmark_on_tiny_sizes_beside_the_semseg_way():
  result = eval_speed.measure_eval(small_eval_config(num_classes=7), batch_size=8, num_images=2,
                                   semseg_reference=True)
  assert (result['what'], result['protocol'], result['crop_size'], result['num_devices'],
          result['num_images'], result['windows']) == ('eval', 'slide', 33, 8, 2, 4)
  for key in ('warmup_seconds', 'seconds', 'images_per_s', 'windows_per_s',
              'windows_per_s_per_device', 'semseg_way_seconds', 'semseg_way_images_per_s',
              'speedup_over_semseg_way'):
    assert result[key] > 0, key
  assert result['windows_per_s'] == pytest.approx(result['windows_per_s_per_device'] * 8,
                                                  rel=1e-3)


@pytest.mark.slow
def test_eval_command_prints_one_line():
  result = _benchmark(['--what=eval', '--num_images=1', '--config.eval.crop_size=33',
                       '--config.eval.base_size=48'], devices=2)
  assert (result['what'], result['batch_size'], result['num_devices'], result['windows']) == (
      'eval', 2, 2, 2)

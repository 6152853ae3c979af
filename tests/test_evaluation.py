"""The evaluation command's counts: every image once, at its own size, padding never counted.

The reference is built image by image, independently of the batching: each
image of the split predicted alone (`Predictor.predict`) and scored with a
transcription of semseg's `intersectionAndUnion` (numpy histograms).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from demo_runs import REPO, demo_config
from pspnet_jax import checkpoint, evaluation, inference, metrics, sharding
from pspnet_jax.data import pipeline, registry
from pspnet_jax.models import create_model
from test_multihost import free_port

OVERRIDES = {
    'data.synthetic.num_train': 8, 'data.synthetic.num_validation': 7,
    'data.synthetic.min_size': 41, 'data.synthetic.max_size': 75,
    'eval.protocol': 'slide', 'eval.crop_size': 33, 'eval.base_size': 48,
    'eval.scales': (0.75, 1.25), 'eval.batch_size': 8}


def intersection_and_union(output, target, K, ignore_index=255):
  """semseg's util.intersectionAndUnion (numpy)."""
  output = output.reshape(output.size).copy()
  target = target.reshape(target.size)
  output[np.where(target == ignore_index)[0]] = ignore_index
  intersection = output[np.where(output == target)[0]]
  area_intersection, _ = np.histogram(intersection, bins=np.arange(K + 1))
  area_output, _ = np.histogram(output, bins=np.arange(K + 1))
  area_target, _ = np.histogram(target, bins=np.arange(K + 1))
  area_union = area_output + area_target - area_intersection
  return area_intersection, area_union, area_target


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = demo_config(data_dir, OVERRIDES)
  model = create_model(config, rngs=nnx.Rngs(3))
  model.eval()
  return config, model


def test_split_counts_equal_image_by_image_reference(setup):
  config, model = setup
  predictor = inference.Predictor.from_model(model, config)
  results = evaluation.evaluate_split(predictor, config)

  num_classes = config.data.num_classes
  totals = np.zeros((3, num_classes), np.int64)
  labelled = 0
  source = pipeline.load_split(config, config.data.eval_split)
  for index in range(len(source)):
    example = source[index]
    label = np.asarray(example['label'])[..., 0]
    classes, _ = predictor.predict(np.asarray(example['image']))
    assert classes.shape == label.shape
    totals += np.stack(intersection_and_union(classes, label, num_classes))
    labelled += int(np.sum(label != config.data.ignore_label))
  assert results['num_images'] == len(source) == 7
  confusion = results['confusion']
  # Only real pixels of real images are counted: neither padding windows nor padding.
  assert confusion.sum() == labelled
  np.testing.assert_array_equal(np.diag(confusion), totals[0])
  np.testing.assert_array_equal(confusion.sum(0) + confusion.sum(1) - np.diag(confusion),
                                totals[1])
  np.testing.assert_array_equal(confusion.sum(1), totals[2])
  present = totals[2] > 0
  assert results['mIoU'] == pytest.approx(np.mean(totals[0][present] / totals[1][present]))
  assert results['allAcc'] == pytest.approx(totals[0].sum() / totals[2].sum())


def test_one_device_equals_eight_devices(setup):
  config, model = setup
  one = inference.Predictor.from_model(model, config, batch_size=1,
                                       mesh=sharding.make_mesh(jax.devices()[:1]))
  eight = inference.Predictor.from_model(model, config, batch_size=16)
  np.testing.assert_array_equal(evaluation.evaluate_split(one, config)['confusion'],
                                evaluation.evaluate_split(eight, config)['confusion'])


def test_results_file_names_classes_and_keeps_the_confusion(setup, tmp_path):
  config, model = setup
  predictor = inference.Predictor.from_model(model, config)
  results = evaluation.evaluate_split(predictor, config)
  names = registry.class_names(config)
  path = evaluation.results_path(str(tmp_path), 'validation', 5, 'slide')
  evaluation.write_results(path, results, names, predictor.protocol.settings())
  with open(path, encoding='utf-8') as f:
    record = json.load(f)
  assert path.endswith('eval/validation-5-slide.json')
  assert record['mIoU'] == pytest.approx(results['mIoU'])
  assert list(record['IoU']) == list(names)
  assert record['protocol']['scales'] == [0.75, 1.25] and record['num_images'] == 7
  confusion = np.load(path.removesuffix('.json') + '.confusion.npy')
  np.testing.assert_array_equal(confusion, results['confusion'])
  assert metrics.segmentation_metrics(confusion)['mIoU'] == pytest.approx(record['mIoU'])


def evaluate_command(workdir, data_dir, extra=()):
  return [sys.executable, '-m', 'pspnet_jax.evaluate', '--config=configs/demo.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}'] + [
              f'--config.{key}={value}' for key, value in OVERRIDES.items()
              if key != 'eval.scales'] + ['--config.eval.scales=(0.75,1.25)'] + list(extra)


@pytest.mark.slow
def test_two_processes_count_every_image_once_and_agree_with_one(setup, tmp_path):
  config, model = setup
  workdir = str(tmp_path / 'run')
  checkpoint.save_model(workdir, 3, checkpoint.model_variables(model), {'source': 'test'})
  data_dir = config.data.data_dir
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  saved = str(tmp_path / 'predictions')
  single = subprocess.run(evaluate_command(workdir, data_dir, [f'--save_predictions={saved}']),
                          cwd=REPO, env=env, capture_output=True, text=True)
  assert single.returncode == 0, single.stderr[-3000:]
  # The predictions of the split are saved as `predict` saves them, one per image.
  gray = sorted(os.listdir(os.path.join(saved, 'gray', 'validation')))
  assert gray == [f'{index:06d}.png' for index in range(7)]
  with open(os.path.join(saved, 'prediction.json'), encoding='utf-8') as f:
    assert json.load(f)['images'] == 7
  path = evaluation.results_path(workdir, 'validation', 3, 'slide')
  with open(path, encoding='utf-8') as f:
    expected = json.load(f)
  expected_confusion = np.load(path.removesuffix('.json') + '.confusion.npy')
  os.remove(path)

  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  address = f'127.0.0.1:{free_port()}'
  processes = [subprocess.Popen(evaluate_command(workdir, data_dir, [
      f'--coordinator_address={address}', '--num_processes=2', f'--process_id={index}']),
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for index in range(2)]
  for process in processes:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
  with open(path, encoding='utf-8') as f:
    got = json.load(f)
  np.testing.assert_array_equal(np.load(path.removesuffix('.json') + '.confusion.npy'),
                                expected_confusion)
  assert got['num_images'] == expected['num_images'] == 7
  assert got['mIoU'] == expected['mIoU']

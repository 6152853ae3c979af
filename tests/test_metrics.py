"""Confusion matrix and dataset-level metrics against semseg's histogram formulation in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pspnet_jax import metrics, sharding


def intersection_and_union(output, target, num_classes, ignore_index=255):
  """semseg util.intersectionAndUnion, re-derived: histograms of the hits, predictions, targets."""
  output = output.reshape(-1).copy()
  target = target.reshape(-1)
  output[target == ignore_index] = ignore_index
  intersection = output[output == target]
  area_intersection = np.histogram(intersection, bins=num_classes, range=(0, num_classes - 1))[0]
  area_output = np.histogram(output, bins=num_classes, range=(0, num_classes - 1))[0]
  area_target = np.histogram(target, bins=num_classes, range=(0, num_classes - 1))[0]
  return area_intersection, area_output + area_target - area_intersection, area_target


def random_batch(seed, shape, num_classes):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, shape)
  labels[rng.random(shape) < 0.2] = 255
  # Predictions mostly right, so the IoUs are far from 0 and from each other.
  predictions = np.where(rng.random(shape) < 0.6, np.where(labels == 255, 0, labels),
                         rng.integers(0, num_classes, shape))
  return predictions, labels


def test_dataset_metrics_equal_semseg_sums_over_batches():
  num_classes = 6
  confusion = np.zeros((num_classes, num_classes), np.int64)
  sums = np.zeros((3, num_classes))
  for seed in range(4):
    predictions, labels = random_batch(seed, (2, 17, 23), num_classes)
    confusion += np.asarray(metrics.confusion_matrix(jnp.asarray(predictions),
                                                     jnp.asarray(labels), num_classes, 255))
    sums += np.stack(intersection_and_union(predictions, labels, num_classes))
  intersection, union, target = sums
  result = metrics.segmentation_metrics(confusion)
  np.testing.assert_allclose(result['IoU'], intersection / union, rtol=1e-12)
  np.testing.assert_allclose(result['acc'], intersection / target, rtol=1e-12)
  assert result['mIoU'] == pytest.approx(np.mean(intersection / union), rel=1e-12)
  assert result['mAcc'] == pytest.approx(np.mean(intersection / target), rel=1e-12)
  assert result['allAcc'] == pytest.approx(intersection.sum() / target.sum(), rel=1e-12)


def test_absent_classes_are_left_out_of_the_means():
  labels = np.array([[0, 0, 1, 255]])
  predictions = np.array([[0, 1, 1, 2]])
  result = metrics.segmentation_metrics(
      np.asarray(metrics.confusion_matrix(jnp.asarray(predictions), jnp.asarray(labels), 4, 255)))
  # class 0: I=1, U=2; class 1: I=1, U=2; classes 2 and 3 never occur in the labels.
  assert np.isnan(result['IoU'][2]) and np.isnan(result['IoU'][3])
  assert result['mIoU'] == pytest.approx(0.5)
  assert result['mAcc'] == pytest.approx(0.75)
  assert result['allAcc'] == pytest.approx(2 / 3)


def test_confusion_over_eight_devices_equals_numpy():
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  predictions, labels = random_batch(7, (8, 9, 11), 5)
  expected = np.zeros((5, 5), np.int64)
  valid = labels != 255
  np.add.at(expected, (labels[valid], predictions[valid]), 1)
  fn = jax.jit(lambda p, l: metrics.confusion_matrix(p, l, 5, 255),
               out_shardings=sharding.replicated(mesh))
  batch = sharding.to_global({'p': predictions.astype(np.int32),
                              'l': labels.astype(np.int32)}, mesh)
  np.testing.assert_array_equal(np.asarray(fn(batch['p'], batch['l'])), expected)

"""Evaluation: the confusion matrix of a model's predictions over a dataset split.

Two ways, both summing one dataset-level confusion matrix before any ratio
(`metrics.segmentation_metrics`), as semseg computes them:

  - `evaluate`, the periodic check during training: each image resized so its
    long side is data.crop_size and padded to the crop (`pipeline.eval_batches`),
    the label resized with it, one forward pass; the confusion matrix is
    computed on the devices. Fast and of one shape, but at the network's
    resolution.
  - `evaluate_split`, the official protocol (`inference`, eval.protocol
    semseg's whole or slide, mmseg's mmseg_whole or mmseg_slide):
    probabilities at each image's original size, compared
    with the original label. Each process evaluates its own contiguous share of
    the split; the counts are summed over processes at the end. Given a
    `refine` (CascadePSP's scene refinement, `scene_refinement`), it counts the
    refined predictions beside the model's own.

`write_results` stores a result as `WORKDIR/eval/<split>-<step>-<protocol>.json`
with the confusion matrix beside it (`.confusion.npy`).
"""

import functools
import io
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from pspnet_jax import inference, metrics, paths, sharding
from pspnet_jax.data import pipeline

# Seconds between two progress lines of evaluate_split.
_PROGRESS_EVERY = 10.0


def eval_step(variables: nnx.State, batch: dict, *, graphdef: nnx.GraphDef, num_classes: int,
              ignore_label: int) -> jax.Array:
  """Confusion matrix of the eval-mode model's argmax on a (global) batch."""
  model = nnx.merge(graphdef, variables)
  predictions = jnp.argmax(model(batch['image']), axis=-1)
  return metrics.confusion_matrix(predictions, batch['label'], num_classes, ignore_label)


def jit_eval_step(mesh, *, graphdef: nnx.GraphDef, config):
  """eval_step under jit: variables replicated, batch sharded over `data`."""
  step_fn = functools.partial(eval_step, graphdef=graphdef, num_classes=config.data.num_classes,
                              ignore_label=config.data.ignore_label)
  return jax.jit(step_fn, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=sharding.replicated(mesh))


def evaluate(eval_fn, variables: nnx.State, config, mesh) -> dict:
  """Dataset-level metrics of `config.data.eval_split` (see metrics.segmentation_metrics)."""
  num_classes = config.data.num_classes
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for batch in pipeline.eval_batches(config):
    # Padding examples carry only ignore labels, so they add nothing to the counts.
    del batch['valid']
    confusion += np.asarray(eval_fn(variables, sharding.to_global(batch, mesh)), np.int64)
  return metrics.segmentation_metrics(confusion)


def image_confusion(class_map: np.ndarray, label: np.ndarray, num_classes: int,
                    ignore_label: int) -> np.ndarray:
  """(num_classes, num_classes) int64 counts of one image; rows = truth, columns = prediction."""
  valid = label != ignore_label
  index = label[valid].astype(np.int64) * num_classes + class_map[valid]
  return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def sum_over_processes(confusion: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return confusion
  return np.asarray(multihost_utils.process_allgather(confusion)).sum(axis=0)


def evaluate_split(predictor: inference.Predictor, config, split: str | None = None, *,
                   on_prediction=None, refine=None) -> dict:
  """Metrics of `predictor` (its protocol) on `split` (default data.eval_split), every image once.

  Each process reads its share of the images (`pipeline.eval_examples`);
  only the labels of the images in flight are kept. `on_prediction(file_name,
  image, class_map)` sees every prediction (e.g. to save it). Returns
  `metrics.segmentation_metrics` of the split-wide confusion matrix, plus
  'confusion', 'num_images' and 'seconds'. With `refine(image, class_map) ->
  class_map` (e.g. a `scene_refinement.SceneRefiner`), every prediction is also
  refined: on_prediction sees the refined one, and 'refined' holds its metrics
  and 'confusion'.
  """
  data = config.data
  split = split or data.eval_split
  num_classes = data.num_classes
  examples, share, total = pipeline.eval_examples(config, split)
  in_flight = {}     # index -> (file name, image, label) until its prediction comes back

  def images():
    for index, example in examples:
      in_flight[index] = example['file_name'], example['image'], example['label']
      yield index, example['image']

  confusion = np.zeros((num_classes, num_classes), np.int64)
  refined_confusion = np.zeros_like(confusion)
  start = last_report = time.perf_counter()
  done = 0
  for index, probabilities in predictor.probabilities(images()):
    file_name, image, label = in_flight.pop(index)
    predicted = inference.class_map(probabilities)
    confusion += image_confusion(predicted, label, num_classes, data.ignore_label)
    if refine is not None:
      predicted = refine(image, predicted)
      refined_confusion += image_confusion(predicted, label, num_classes, data.ignore_label)
    if on_prediction is not None:
      on_prediction(file_name, image, predicted)
    done += 1
    now = time.perf_counter()
    if now - last_report >= _PROGRESS_EVERY or done == share:
      rate = done / (now - start)
      logging.info('evaluating %s: %d/%d images of this process (%d in the split), %.2f '
                   'images/s, ETA %.0f s', split, done, share, total, rate, (share - done) / rate)
      last_report = now
  confusion = sum_over_processes(confusion)
  results = {**metrics.segmentation_metrics(confusion), 'confusion': confusion,
             'num_images': total, 'seconds': time.perf_counter() - start}
  if refine is not None:
    refined_confusion = sum_over_processes(refined_confusion)
    results['refined'] = {**metrics.segmentation_metrics(refined_confusion),
                          'confusion': refined_confusion}
  return results


def results_path(workdir: str, split: str, step: int, protocol: str) -> str:
  return os.path.join(workdir, 'eval', f'{split}-{step}-{protocol}.json')


def metrics_record(results: dict, class_names) -> dict:
  """mIoU, mAcc, allAcc and IoU and accuracy by class name (None for a class absent from the
  ground truth), as JSON values."""
  per_class = lambda values: {name: None if np.isnan(value) else float(value)
                              for name, value in zip(class_names, values)}
  return {**{key: float(results[key]) for key in ('mIoU', 'mAcc', 'allAcc')},
          'IoU': per_class(results['IoU']), 'acc': per_class(results['acc'])}


def write_results(path: str, results: dict, class_names, settings: dict,
                  extra: dict | None = None) -> None:
  """The metrics by class name, the protocol's settings, the counts and `extra` as JSON; the
  confusion matrix beside it (`.confusion.npy`, rows = truth). Written whole or not at all."""
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  record = metrics_record(results, class_names)
  record.update({'protocol': settings, 'num_images': int(results['num_images']),
                 'seconds': float(results['seconds']), **(extra or {})})
  confusion = io.BytesIO()
  np.save(confusion, results['confusion'], allow_pickle=False)
  paths.write_whole(path.removesuffix('.json') + '.confusion.npy', confusion.getvalue())
  paths.write_whole(path, json.dumps(record, indent=2))

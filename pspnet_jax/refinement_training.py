"""CascadePSP training (config.task='refinement'): the refinement module's objective and its
evaluation, plugged into the training loop of `train` (checkpoints, resume, progress, stops).

A training batch is {'image' NHWC RGB, 'mask' NHW uint8 0/255 (the perturbed input mask),
'gt' NHW uint8 0..255 (the ground truth, soft edges kept)}, `pipeline.train_batches`. The
model sees the image normalized and the mask as the official `seg_transform` gives it
(x / 255 - 0.5) / 0.5, in [-1, 1]; the loss takes gt / 255 as its float target.

Evaluation refines every example of data.eval_split from its stored input mask with the
official inference; each process refines its own share of the examples on its own devices
(images differ in size, so processes could not share device steps), and the counts are summed
over processes at the end (`refinement.Refiner`: the global step at refine.L and, unless
refine.fast, the local step), thresholds both masks at 128 and reports what the official
eval_post.py does: the dataset IoU (total intersection / total union) of the refined and of
the input masks, and their mean boundary accuracy over images (`metrics.boundary_accuracy`).
The refined masks' two-class confusion matrix gives the rows every run has (mIoU over
background and foreground, mAcc, allAcc), so the best checkpoint is chosen by mIoU as for
segmentation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pspnet_jax import evaluation, losses, metrics, refinement, sharding
from pspnet_jax.data import pipeline

# Masks at or above this grey level are foreground (eval_post.py: mask > 128).
_FOREGROUND_ABOVE = 128


def device_masks(masks: jax.Array) -> jax.Array:
  """uint8 NHW 0..255 -> float32 NHW1 in [-1, 1], torchvision ToTensor + Normalize(0.5, 0.5)."""
  return (masks.astype(jnp.float32)[..., None] / 255.0 - 0.5) / 0.5


def _intersection_over_union(prediction: jax.Array, truth: jax.Array) -> jax.Array:
  """Batch IoU of two boolean maps (the official training log's iou/*)."""
  intersection = jnp.sum(prediction & truth)
  return intersection / jnp.maximum(jnp.sum(prediction | truth), 1)


def objective(model, images: jax.Array, batch: dict, *, ce_weights, l1_weights, l2_weights,
              grad_weight: float):
  """The refinement loss of a train-mode model on a batch: (loss, metrics of the step), the
  metrics being the loss's parts and the IoU of the input masks and of the refined output."""
  masks = device_masks(batch['mask']).astype(images.dtype)
  gt = batch['gt'].astype(images.dtype)[..., None] / 255.0
  outputs = model(images, masks)
  loss, parts = losses.refinement_loss(outputs, gt, ce_weights=ce_weights,
                                       l1_weights=l1_weights, l2_weights=l2_weights,
                                       grad_weight=grad_weight)
  truth = gt > 0.5
  return loss, {**parts, 'input_iou': _intersection_over_union(masks > 0.5, truth),
                'iou': _intersection_over_union(outputs['pred_224'] > 0.5, truth)}


def objective_of(config):
  """`objective` with config.loss's weights."""
  loss = config.loss
  return functools.partial(objective, ce_weights=tuple(loss.ce_weights),
                           l1_weights=tuple(loss.l1_weights), l2_weights=tuple(loss.l2_weights),
                           grad_weight=loss.grad_weight)


def evaluate(variables, *, graphdef, config) -> dict:
  """Refines data.eval_split's input masks and returns the dataset's metrics (module
  docstring): mIoU, mAcc, allAcc, IoU and acc per class of the refined masks, and
  'fg_IoU', 'input_fg_IoU', 'mBA', 'input_mBA'."""
  # The (replicated) variables on this process's devices only.
  refiner = refinement.Refiner(graphdef, jax.device_get(variables),
                               mesh=sharding.make_mesh(jax.local_devices()),
                               batch_size=config.refine.batch_size)
  examples, count, total = pipeline.eval_examples(config, config.data.eval_split)
  confusion = np.zeros((2, 2), np.int64)
  counts = np.zeros(6)   # refined I, U; input I, U; refined and input boundary accuracy sums
  for _, example in examples:
    refined = refiner.refine(example['image'], example['input_mask'], fast=config.refine.fast,
                             L=config.refine.L) > _FOREGROUND_ABOVE
    given = example['input_mask'] > _FOREGROUND_ABOVE
    truth = example['gt'] > _FOREGROUND_ABOVE
    confusion += evaluation.image_confusion(refined.astype(np.int64), truth.astype(np.int64),
                                            num_classes=2, ignore_label=2)
    refined_accuracy, given_accuracy = metrics.boundary_accuracy(truth, refined, given)
    counts += (np.sum(refined & truth), np.sum(refined | truth), np.sum(given & truth),
               np.sum(given | truth), refined_accuracy, given_accuracy)
  counts = evaluation.sum_over_processes(counts)
  confusion = evaluation.sum_over_processes(confusion)
  logging.info('refined %d of %d evaluation examples in this process', count, total)
  results = metrics.segmentation_metrics(confusion)
  results.update(fg_IoU=counts[0] / max(counts[1], 1), input_fg_IoU=counts[2] / max(counts[3], 1),
                 mBA=counts[4] / total, input_mBA=counts[5] / total)
  return results

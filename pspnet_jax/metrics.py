"""Segmentation metrics over a whole dataset: one confusion matrix, then mIoU / mAcc / allAcc.

As in semseg's `intersectionAndUnion`, the counts (intersection, union and
target pixels per class) are summed over the entire split before any ratio is
taken, so the result does not depend on how images are batched or sharded.
Classes that never occur in the ground truth (target 0) are left out of mIoU
and mAcc instead of counting as 0 (semseg divides by target + 1e-10 and then
averages every class; with the full validation sets every class occurs, and
on small subsets their mean would punish absent classes).
"""

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int,
                     ignore_label: int) -> jax.Array:
  """(num_classes, num_classes) int32 counts, rows = ground truth, columns = prediction.

  Pixels labelled `ignore_label` are not counted. Under jit over a sharded batch
  the sum runs over every device.
  """
  valid = labels != ignore_label
  index = jnp.where(valid, labels * num_classes + predictions, 0).reshape(-1)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(
      valid.reshape(-1).astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray) -> dict:
  """Confusion matrix -> {'mIoU', 'mAcc', 'allAcc', 'IoU' (per class), 'acc' (per class)}.

  Per-class values of classes absent from the ground truth are NaN.
  """
  confusion = np.asarray(confusion, np.float64)
  intersection = np.diag(confusion)
  target = confusion.sum(axis=1)
  union = target + confusion.sum(axis=0) - intersection
  present = target > 0
  iou = np.full(len(confusion), np.nan)
  acc = np.full(len(confusion), np.nan)
  iou[present] = intersection[present] / union[present]
  acc[present] = intersection[present] / target[present]
  total = target.sum()
  return {
      'mIoU': float(np.mean(iou[present])) if present.any() else 0.0,
      'mAcc': float(np.mean(acc[present])) if present.any() else 0.0,
      'allAcc': float(intersection.sum() / total) if total else 0.0,
      'IoU': iou,
      'acc': acc,
  }

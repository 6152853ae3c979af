"""Segmentation metrics over a whole dataset: one confusion matrix, then mIoU / mAcc / allAcc.

As in semseg's `intersectionAndUnion`, the counts (intersection, union and
target pixels per class) are summed over the entire split before any ratio is
taken, so the result does not depend on how images are batched or sharded.
Classes that never occur in the ground truth (target 0) are left out of mIoU
and mAcc instead of counting as 0 (semseg divides by target + 1e-10 and then
averages every class; with the full validation sets every class occurs, and
on small subsets their mean would punish absent classes).

CascadePSP's refinement metrics are here too, in numpy and OpenCV on the host:
mask IoU counts and the mean boundary accuracy (mBA) of binary masks and of
scene-parsing label maps.
"""

import cv2
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


# CascadePSP's mask metrics (its util/compute_boundary_acc.py and eval_post.py), in numpy and
# OpenCV: IoU counts summed over a dataset, and the mean boundary accuracy (mBA) per image.

_BOUNDARY_STEPS = 5


def mask_iou_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
  """(intersection, union) pixel counts of two boolean masks; a dataset's IoU is the sum of
  the intersections over the sum of the unions, as CascadePSP's evaluation."""
  pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
  return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def _boundary_radii(height: int, width: int) -> list[int]:
  """The 5 radii of the boundary bands: from 1 towards (height + width) / 300, truncated (so
  below 300 + 300 pixels every band has radius 1)."""
  max_radius = (width + height) / 300
  return [1 + int((max_radius - 1) / _BOUNDARY_STEPS * step) for step in range(_BOUNDARY_STEPS)]


def _boundary_bands(regions: list[np.ndarray]):
  """For each radius r of `_boundary_radii`: the pixels within the morphological gradient of any
  of the uint8 0/1 `regions` by a (2r+1)-pixel disk."""
  for radius in _boundary_radii(*regions[0].shape):
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    band = np.zeros(regions[0].shape, bool)
    for region in regions:
      band |= cv2.morphologyEx(region, cv2.MORPH_GRADIENT, disk) > 0
    yield band


def boundary_accuracy(gt: np.ndarray, seg: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
  """CascadePSP's boundary accuracy of two predictions `seg` and `mask` of a binary `gt` (HxW,
  nonzero = foreground): for each of 5 bands around the ground truth's outline, the fraction
  of its pixels each prediction gets right; their mean over the bands. NaN when `gt` has no
  outline (all background or all foreground)."""
  gt = np.asarray(gt) != 0
  predictions = [np.asarray(seg) != 0, np.asarray(mask) != 0]
  sums = np.zeros(2)
  for band in _boundary_bands([gt.astype(np.uint8)]):
    pixels = np.count_nonzero(band)
    for index, prediction in enumerate(predictions):
      right = np.count_nonzero(prediction[band] == gt[band])
      sums[index] += right / pixels if pixels else np.nan
  return float(sums[0] / _BOUNDARY_STEPS), float(sums[1] / _BOUNDARY_STEPS)


def boundary_accuracy_multi_class(gt: np.ndarray, seg: np.ndarray,
                                  mask: np.ndarray) -> tuple[float, float]:
  """The scene-parsing version (`compute_boundary_acc_multi_class`): label maps with 0 void;
  the bands around the outline of every class but void, and each prediction's accuracy in
  them as the official code counts it: (band pixels whose label it matches - void band
  pixels) / (band pixels - void band pixels), so a void pixel counts as right only where the
  prediction says 0 as well."""
  gt, predictions = np.asarray(gt), [np.asarray(seg), np.asarray(mask)]
  regions = [(gt == value).astype(np.uint8) for value in np.unique(gt) if value != 0]
  sums = np.zeros(2)
  for band in _boundary_bands(regions or [np.zeros(gt.shape, np.uint8)]):
    labels, void = gt[band], np.count_nonzero(gt[band] == 0)
    valid = labels.size - void
    for index, prediction in enumerate(predictions):
      right = np.count_nonzero(prediction[band] == labels) - void
      sums[index] += right / valid if valid else np.nan
  return float(sums[0] / _BOUNDARY_STEPS), float(sums[1] / _BOUNDARY_STEPS)

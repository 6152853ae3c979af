"""CascadePSP's coarse input masks: a ground-truth mask degraded at its boundary.

CascadePSP (Cheng et al., CVPR 2020) trains on masks that are right in the
large and wrong along the object's outline, made from the ground truth on the
fly (`util/boundary_modification.py` and `util/de_transform.py` of the
official code):

1. `modify_boundary`: every outer or inner contour of at least 10 vertices
   loses a run of 10% of its vertices, chosen among the 10% of runs whose two
   ends lie closest together (cutting off a protrusion or a notch rather than
   a chord through the object); 10% of the remaining vertices are kept as a
   polygon (optionally moved away from or towards the contour's centroid),
   and the polygons are filled again.
2. `perturb_seg`: rounds of 4 random rectangles of the redrawn mask, each
   optionally with its centre pixel set to 0 or 255 and then dilated or
   eroded by a random rectangle or ellipse of size 3..9, until the IoU with
   the redrawn mask falls below the target (at most 250 rounds).

The semantics are the official ones, with the structuring element drawn from
all four shapes (`get_random_structure`'s fixed `randint(1, 5)`, not the
`randint(4)` the released model was trained with). The official code draws
from NumPy's global state and Python's `random`; here every draw comes from
the `np.random.Generator` passed in, so a coarse mask is a pure function of
the mask and the generator's seed. Masks are uint8 HxW, 0 or 255.
"""

import math

import cv2
import numpy as np

# Structuring element sizes are drawn from [_MIN_KERNEL, _MAX_KERNEL).
_MIN_KERNEL, _MAX_KERNEL = 3, 10
_MAX_ROUNDS = 250
_RECTANGLES_PER_ROUND = 4
# Contours with fewer vertices are dropped from the redrawn mask.
_MIN_VERTICES = 10


def _random_structure(rng: np.random.Generator) -> np.ndarray:
  """A rectangle, a disk, or a flat or tall ellipse of a random size (cv2's (width, height))."""
  size = int(rng.integers(_MIN_KERNEL, _MAX_KERNEL))
  shape, ksize = [(cv2.MORPH_RECT, (size, size)), (cv2.MORPH_ELLIPSE, (size, size)),
                  (cv2.MORPH_ELLIPSE, (size, size // 2)),
                  (cv2.MORPH_ELLIPSE, (size // 2, size))][int(rng.integers(4))]
  return cv2.getStructuringElement(shape, ksize)


def iou(seg: np.ndarray, gt: np.ndarray) -> float:
  """The official `compute_iou`: nonzero pixels of both over nonzero pixels of either, with
  1e-6 added to both counts (two empty masks have IoU 1).

  The official code counts the nonzero pixels of the uint8 product and sum; for 0/255 masks
  that is exactly the intersection and the union.
  """
  seg, gt = seg > 0, gt > 0
  return (np.count_nonzero(seg & gt) + 1e-6) / (np.count_nonzero(seg | gt) + 1e-6)


def perturb_seg(gt: np.ndarray, rng: np.random.Generator, iou_target: float = 0.6) -> np.ndarray:
  """`gt` (thresholded at 127) dilated and eroded in random rectangles until its IoU with `gt`
  is below `iou_target`, or 250 rounds have passed; a mask 2 pixels high or wide comes back
  thresholded and otherwise unchanged."""
  height, width = gt.shape
  seg = np.where(gt > 127, 255, 0).astype(np.uint8)
  if height <= 2 or width <= 2:
    return seg
  for _ in range(_MAX_ROUNDS):
    for _ in range(_RECTANGLES_PER_ROUND):
      left, top = int(rng.integers(width)), int(rng.integers(height))
      right, bottom = int(rng.integers(left + 1, width + 1)), int(rng.integers(top + 1, height + 1))
      # One pixel flipped in the middle: the dilation or erosion that follows grows it into a
      # hole or an island.
      if rng.random() < 0.25:
        seg[(top + bottom) // 2, (left + right) // 2] = int(rng.integers(2)) * 255
      morph = cv2.dilate if rng.random() < 0.5 else cv2.erode
      # The morphology sees only the rectangle: what lies outside it is not its border.
      window = np.ascontiguousarray(seg[top:bottom, left:right])
      seg[top:bottom, left:right] = morph(window, _random_structure(rng))
    if iou(seg, gt) < iou_target:
      break
  return seg


def _cut_run(contour: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
  """`contour` without a run of int(fraction * vertices) consecutive vertices, starting at one of
  the 10% of starts (at least one) whose run's two ends are closest (ties by position)."""
  count = len(contour)
  run = int(count * fraction)
  gaps = np.sum((contour[:count - run] - contour[run:]) ** 2, axis=(1, 2))
  closest = np.argsort(gaps, kind='stable')[:math.ceil(0.1 * len(gaps))]
  start = int(closest[rng.integers(len(closest))])
  return np.concatenate([contour[:start], contour[start + run:]])


def _move_from_centroid(polygon: np.ndarray, contour: np.ndarray, move_rate: float,
                        rng: np.random.Generator) -> np.ndarray:
  """Each vertex moved away from the contour's centroid by N(0, move_rate) times its offset,
  truncated to integers; unchanged when the contour encloses no area."""
  moments = cv2.moments(contour)
  if moments['m00'] == 0:
    return polygon
  # Python's round, as the official code (half to even).
  centre = np.array([round(moments['m10'] / moments['m00']),
                     round(moments['m01'] / moments['m00'])])
  change = rng.normal(0.0, move_rate, len(polygon))[:, None, None]
  return (polygon + (polygon - centre) * change).astype(np.int32)


def modify_boundary(mask: np.ndarray, rng: np.random.Generator, *, iou_target: float = 0.8,
                    regional_sample_rate: float = 0.1, sample_rate: float = 0.1,
                    move_rate: float = 0.0) -> np.ndarray:
  """The coarse input mask of a 0/255 uint8 `mask`: contours cut, subsampled and refilled
  (`regional_sample_rate`, `sample_rate`, `move_rate`), then `perturb_seg` to `iou_target`.

  Without any contour of 10 vertices the mask itself goes to `perturb_seg`.
  """
  contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
  polygons = []
  for contour in contours:
    if len(contour) < _MIN_VERTICES:
      continue
    cut = _cut_run(contour, regional_sample_rate, rng)
    keep = int(len(cut) * sample_rate)
    polygon = cut[np.sort(rng.choice(len(cut), keep, replace=False))]
    # The official code draws the moves even at move_rate 0 (where they change nothing).
    polygon = _move_from_centroid(polygon, contour, move_rate, rng)
    if len(polygon):
      polygons.append(polygon)
  if polygons:
    redrawn = cv2.drawContours(np.zeros_like(mask), polygons, -1, 255, thickness=cv2.FILLED)
  else:
    redrawn = mask.copy()
  return perturb_seg(redrawn, rng, iou_target)

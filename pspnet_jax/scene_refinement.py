"""CascadePSP's scene-parsing refinement (Cheng et al., CVPR 2020): a class map refined
component by component with the refinement module's global step.

    refiner = refinement.Refiner.from_workdir('runs/cascadepsp', configuration.load_config(
        'configs/cascadepsp.py'))
    refined = refine_scene(refiner, image, class_map, stuff_classes=ADE20K_STUFF_CLASSES)

The official pipeline for ADE20K (hkchengrex/CascadePSP, docs/testing_scene_parsing.md) in
three scripts, done here image by image in memory:

  1. split (scripts/ade20K/ade_expand_inst.py): every class of more than 32 x 32
     pixels is dilated with a disk (`disk_kernel(10)`: 10 x 10, radius 5), the
     dilation's 8-connected components each eroded back with the same disk
     (a closing, component by component) and kept when more than 32 x 32
     pixels remain; a component's input mask is what remains AND the class.
  2. refine (eval.py --ade, dataset/split_dataset.py with perturb=False,
     eval_helper.py's `process_im_single_pass(model, im, seg, 224, para)`):
     image and input mask cropped to the mask's bounding box grown by 25%
     (`crop_box`: dataset/make_bb_trans.py's scale_bb_by, whose clamped
     bottom/right are inclusive indices used as exclusive ends); the crop's
     long side brought up to 224 (bicubic image, bilinear mask) when shorter,
     down to L (area) when longer, one pass of the model, the prediction back
     to the crop's size (area from 224, bilinear from L), as uint8 (x * 255
     truncated, as eval.py writes it).
  3. recombine (eval_post_ade.py): from the input class map and a confidence
     of 0.5 everywhere, each component's probability (multiplied by 0.51 for
     "stuff" classes) sets its class inside its box where it beats the
     confidence, which becomes the larger of the two.

Where this differs from the official scripts, and why:

  - Only the prediction's classes are split: the official split also walks
    the ground truth's classes, to write ground-truth crops for its own
    evaluation; a class absent from the prediction has no component.
  - Components go in a fixed order, by class and then by component label
    (raster order of the dilated components); the official recombination takes
    them in the order the file system lists their files. The order matters
    only where two probabilities tie exactly.
  - A component whose input crop is empty or has no foreground is not run:
    the official code crops nothing and suppresses its output to 0 (eval.py's
    "suppress close-to-zero segmentation input") or skips it in the
    recombination (an empty box), and 0 never beats the 0.5 confidence. A crop
    whose short side would vanish at long side L is left out too (the
    official code fails on it).
  - eval_post_ade.py resizes each refined mask to its box with PIL bilinear
    before recombining; the mask is the refinement of the crop of that very
    box, so it has the box's size already and that resize is the identity
    (PIL returns a copy): there is nothing to resize. The probability is
    taken as that code reads it back: uint8 / 255 in float64, then float32
    (PIL's 'F' image), times float32 0.51 for stuff, compared with the float64
    confidence.

The model runs through any `forward(images, masks, inter_s8)` as
`refinement.refine_with` takes it (`refine_scene_with`), or a
`refinement.Refiner`'s (`refine_scene`): the global step on its first device,
one component at a time. Each crop size compiles once per process, and a
dataset's crops come in many sizes: they are kept as the official code has
them, as padding crops to shared sizes would change the model's outputs.

The library defines no flags; `predict` and `evaluate` take `--refine_workdir`
(`SceneRefiner.from_workdir`).
"""

import functools
import os
from typing import Iterable, NamedTuple

import cv2
import jax
import numpy as np

from pspnet_jax import paths, refinement, sharding
from pspnet_jax.errors import UserError

# ade_expand_inst.py: classes and components of at most this many pixels are not refined.
MIN_PIXELS = 32 * 32
# eval.py --ade calls process_im_single_pass with min_size 224 ("GTs of small objects in ADE
# are too coarse -- less upsampling is better").
MIN_SIZE = 224
# scale_bb_by(..., 0.25, 0.25): the box grows by an eighth of its side on each side.
BOX_GROWTH = 0.25
# eval_post_ade.py: the factor on stuff classes' probabilities, and the starting confidence.
STUFF_SCALE = np.float32(0.51)
START_CONFIDENCE = 0.5

# eval_post_ade.py's `background_classes` (ADE20K's 1-based indices, 0 = void) as our 0-based
# ADE20K labels (label k is ADE class k + 1): wall, building, sky, floor, ceiling, road, grass,
# sidewalk, earth, mountain, water, house, sea, rug, field, sand, skyscraper, grandstand, path,
# runway, stairway, river, bridge, hill, hovel, tower, dirt track, land, escalator, stage,
# conveyer belt, swimming pool, waterfall, lake, pier.
ADE20K_STUFF_CLASSES = (0, 1, 2, 3, 5, 6, 9, 11, 13, 16, 21, 25, 26, 28, 29, 46, 48, 51, 52, 54,
                        59, 60, 61, 68, 79, 84, 91, 94, 96, 101, 105, 109, 113, 128, 140)


def disk_kernel(size: int) -> np.ndarray:
  """ade_expand_inst.py's get_disk_kernel: a size x size uint8 disk of radius size // 2 around
  (size // 2, size // 2) (for an even size, the last row and column hold no full half)."""
  radius = size // 2
  y, x = np.ogrid[-radius:size - radius, -radius:size - radius]
  return (x * x + y * y <= radius * radius).astype(np.uint8)


_DISK = disk_kernel(10)
# How far cv2's dilation and erosion with _DISK (anchored at its centre) reach.
_REACH = len(_DISK) // 2


class Component(NamedTuple):
  """A component's input mask: `mask` (bool) is its tight bounding box, at (top, left)."""
  class_index: int
  top: int
  left: int
  mask: np.ndarray


def _closed_components(class_mask: np.ndarray) -> Iterable[tuple[int, int, np.ndarray]]:
  """(top, left, closed component) of a uint8 class mask, per component of its dilation in
  label order, each eroded within its box and a margin of the disk's reach: the erosion of a
  pixel in the box sees no further, and pixels of the margin (outside the component) stay 0.
  The image's edges are cv2's own on both sides (the erosion's border never erodes)."""
  height, width = class_mask.shape
  count, labels, stats, _ = cv2.connectedComponentsWithStats(cv2.dilate(class_mask, _DISK),
                                                             connectivity=8)
  for label in range(1, count):
    x, y, box_width, box_height = (int(value) for value in stats[label, :4])
    top, left = max(y - _REACH, 0), max(x - _REACH, 0)
    bottom, right = min(y + box_height + _REACH, height), min(x + box_width + _REACH, width)
    region = (labels[top:bottom, left:right] == label).astype(np.uint8)
    yield top, left, cv2.erode(region, _DISK)


def split(class_map: np.ndarray) -> list[Component]:
  """ade_expand_inst.py's components of a (H, W) class map (module docstring, step 1), by class
  and label."""
  components = []
  for class_index in np.unique(class_map):
    class_mask = (class_map == class_index).astype(np.uint8)
    if np.count_nonzero(class_mask) <= MIN_PIXELS:
      continue
    for top, left, closed in _closed_components(class_mask):
      if np.count_nonzero(closed) <= MIN_PIXELS:
        continue
      inside = closed.astype(bool) & class_mask[top:top + closed.shape[0],
                                                left:left + closed.shape[1]].astype(bool)
      rows, columns = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
      if rows.size:
        components.append(Component(
            int(class_index), top + int(rows[0]), left + int(columns[0]),
            inside[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]))
  return components


def crop_box(component: Component, height: int, width: int) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) of the official crop: get_bb_position's inclusive box grown by
  scale_bb_by(0.25), truncated and clamped to the last row and column, its bottom and right
  then used as exclusive ends (so the crop never holds the image's last row or column)."""
  first_row, first_column = component.top, component.left
  last_row = first_row + component.mask.shape[0] - 1
  last_column = first_column + component.mask.shape[1] - 1
  row_growth = BOX_GROWTH * (last_row - first_row) / 2
  column_growth = BOX_GROWTH * (last_column - first_column) / 2
  top, left = int(max(0, first_row - row_growth)), int(max(0, first_column - column_growth))
  bottom = max(top, int(min(height - 1, last_row + row_growth)))
  right = max(left, int(min(width - 1, last_column + column_growth)))
  return top, bottom, left, right


def crop_mask(component: Component, box: tuple[int, int, int, int]) -> np.ndarray:
  """The component's input mask inside `box`, uint8 0 / 255 (the official _seg.png crop)."""
  top, bottom, left, right = box
  crop = np.zeros((bottom - top, right - left), np.uint8)
  # The box starts at or before the component's first row and column; it may end before its
  # last ones.
  rows = min(component.mask.shape[0], bottom - component.top)
  columns = min(component.mask.shape[1], right - component.left)
  row, column = component.top - top, component.left - left
  crop[row:row + rows, column:column + columns] = component.mask[:rows, :columns] * np.uint8(255)
  return crop


def fits(height: int, width: int, L: int) -> bool:  # pylint: disable=invalid-name
  """Whether a crop keeps a row and a column through process_im_single_pass's resizes: down
  to L (from MIN_SIZE when it was resized up first, which only an L below it allows)."""
  if max(height, width) <= L:
    return True
  if max(height, width) < MIN_SIZE:
    height, width = refinement.max_side_size(height, width, MIN_SIZE)
  return min(refinement.max_side_size(height, width, L)) >= 1


def single_pass(forward, image: np.ndarray, mask: np.ndarray,
                L: int) -> np.ndarray:  # pylint: disable=invalid-name  (the official name)
  """eval_helper.py's process_im_single_pass(model, im, seg, 224, para) with para['L'] = L:
  uint8 image crop (h, w, 3) RGB and mask crop (h, w) 0 / 255 -> float32 (h, w) in [0, 1]."""
  image, mask = refinement.normalize(image, mask)
  height, width = image.shape[:2]
  longest = max(height, width)
  if longest < MIN_SIZE:
    image = refinement.resize_max_side(image, MIN_SIZE, 'bicubic')
    mask = refinement.resize_max_side(mask, MIN_SIZE, 'bilinear')
  # Area down to L when the crop's own long side is over L (after any resize up to MIN_SIZE,
  # as the official code does), else as it is: global_step resizes to any other side.
  side = L if longest > L else max(image.shape[:2])
  prediction, _ = refinement.global_step(forward, image, mask, side)
  if longest < MIN_SIZE:
    prediction = refinement.resize_area(prediction, height, width)
  elif longest > L:
    prediction = refinement.resize_bilinear(prediction, height, width)
  return prediction[..., 0]


def recombine(class_map: np.ndarray, refined: Iterable[tuple[int, tuple, np.ndarray]],
              stuff_classes=()) -> np.ndarray:
  """eval_post_ade.py's recombination: `refined` yields (class, box, uint8 probability of the
  box's size) per component, in order (module docstring, step 3)."""
  result = np.array(class_map, copy=True)
  confidence = np.full(class_map.shape, START_CONFIDENCE)
  stuff = set(int(index) for index in stuff_classes)
  for class_index, (top, bottom, left, right), probability in refined:
    # As eval_post_ade.py reads the mask back: float64 / 255, through PIL's float32 image.
    probability = (probability / 255.0).astype(np.float32)
    if class_index in stuff:
      probability = probability * STUFF_SCALE
    window = confidence[top:bottom, left:right]
    classes = result[top:bottom, left:right]
    classes[probability > window] = class_index
    np.maximum(window, probability, out=window)
  return result


def refine_scene_with(forward, image: np.ndarray, class_map: np.ndarray, *, L: int = 900,
                      stuff_classes=()) -> np.ndarray:  # pylint: disable=invalid-name
  """`refine_scene` over `forward` (`refinement.refine_with`'s)."""
  height, width = class_map.shape
  if image.shape[:2] != (height, width):
    raise ValueError(f'image {image.shape[:2]} and class map {class_map.shape} differ in size')

  def refined():
    for component in split(class_map):
      box = crop_box(component, height, width)
      top, bottom, left, right = box
      mask = crop_mask(component, box)
      if not mask.any() or not fits(bottom - top, right - left, L):
        continue
      probability = single_pass(forward, image[top:bottom, left:right], mask, L)
      yield component.class_index, box, refinement.to_uint8(probability)

  return recombine(class_map, refined(), stuff_classes)


def refine_scene(refiner: refinement.Refiner, image: np.ndarray, class_map: np.ndarray, *,
                 L: int = 900, stuff_classes=()) -> np.ndarray:  # pylint: disable=invalid-name
  """CascadePSP's refinement of a class map (module docstring): image uint8 (H, W, 3) RGB,
  class map (H, W) -> the refined class map, of the class map's dtype. L: the largest long
  side a component's crop is refined at (eval.py's --L). stuff_classes: classes whose
  probabilities count 0.51 times (ADE20K_STUFF_CLASSES for ADE20K)."""
  # The Refiner's forward runs a single image (the global step's pass) on its first device.
  return refine_scene_with(refiner.forward, image, class_map, L=L, stuff_classes=stuff_classes)


def stuff_classes_of(dataset: str) -> tuple[int, ...]:
  """The classes weighted as stuff for a dataset (config.data.name): ADE20K's official list,
  none for the others (the official code refines ADE20K only)."""
  return ADE20K_STUFF_CLASSES if dataset == 'ade20k' else ()


class SceneRefiner:
  """`refine_scene` with one refiner and its settings: `scene_refiner(image, class_map)`, what
  the predict and evaluate commands call with `--refine_workdir`."""

  def __init__(self, refiner: refinement.Refiner, *, L: int, stuff_classes=(),
               settings: dict | None = None):  # pylint: disable=invalid-name
    self._refine = functools.partial(refine_scene, refiner, L=L,
                                     stuff_classes=tuple(stuff_classes))
    self.settings = {**(settings or {}), 'L': L, 'min_size': MIN_SIZE,
                     'stuff_classes': list(stuff_classes)}

  @classmethod
  def from_workdir(cls, workdir: str, config=None, *, dataset: str,
                   step: int | None = None) -> 'SceneRefiner':
    """The CascadePSP checkpoint `step` (default: the latest) of `workdir`, with its config:
    `config` (a ConfigDict, or a FILE.py[:VARIANT] or .json for `configuration.load_config`),
    or else the workdir's config.json (a training run's); its refine.L is L (the official
    eval.py's --L). `dataset` (the segmentation config's data.name) picks the stuff classes
    (`stuff_classes_of`)."""
    # Imported here: checkpoint imports orbax, which the refinement itself does not need.
    from pspnet_jax import checkpoint, configuration  # pylint: disable=import-outside-toplevel
    if isinstance(config, str):
      config = configuration.load_config(config)
    config = configuration.workdir_config(workdir, config, example='configs/cascadepsp.py')
    if config.task != 'refinement':
      raise UserError(f'refinement workdir {workdir}: its config is not a CascadePSP one '
                      f'(config.task={config.task!r}, not \'refinement\'); give a CascadePSP '
                      'run and its config, e.g. configs/cascadepsp.py')
    mesh = sharding.make_mesh(jax.local_devices())
    loaded = checkpoint.load_model(config, workdir, step, mesh=mesh)
    refiner = refinement.Refiner.from_model(loaded.model, mesh=mesh,
                                            batch_size=config.refine.batch_size)
    where = workdir if paths.is_remote(workdir) else os.path.realpath(workdir)
    return cls(refiner, L=config.refine.L, stuff_classes=stuff_classes_of(dataset),
               settings={'workdir': where, 'step': loaded.step})

  def __call__(self, image: np.ndarray, class_map: np.ndarray) -> np.ndarray:
    return self._refine(image, class_map)

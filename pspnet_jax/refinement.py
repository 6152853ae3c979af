"""CascadePSP (Cheng et al., CVPR 2020) inference: a coarse mask of an image refined by the
refinement module (models/cascadepsp.py) in a global and a local step.

    refiner = Refiner.from_workdir('runs/cascadepsp', configuration.load_config(
        'configs/cascadepsp.py'))
    refined = refiner.refine(image, mask)          # uint8 HxW, 0..255
    refined = refiner.refine(image, mask, fast=True, L=900)

`Refiner.refine` is the official `segmentation_refinement.Refiner.refine`
(the `segmentation-refinement` 0.6 package on PyPI, whose eval_helper differs
from the repository's): the image (uint8 HxWx3 RGB) is scaled to [0, 1] and
normalized with the ImageNet mean and deviation, the mask (HxW, 0..255) is
thresholded at 127 and scaled to -1 / 1, then

  - global step (`process_im_single_pass`, and the start of
    `process_high_res_im`): the pair resized so its long side is L (`area`
    when larger than L; `bicubic` image and `bilinear` mask when smaller, both
    with torch's scale-factor semantics; as is when equal), padded to a
    multiple of 8 (`safe_forward`: image 0, masks -1; both sides grow when one
    is not a multiple, `(side // 8 + 1) * 8`), one pass of the model, the
    padding cut off. Fast mode ends here: 'pred_224' back to the original size
    (`area` from a larger L, bilinear with align_corners=True to a smaller).
  - local step (`process_high_res_im`): the global 'pred_224' (bilinear,
    thresholded at 0.5, as -1 / 1) and 'pred_56_2' (bilinear, as [-1, 1])
    at the original size; L x L patches every L // 2 - 32 pixels, shifted to
    stay inside (patches are min(H, L) x min(W, L)), each start refined once;
    a patch whose thresholded global prediction is over 90% or under 10%
    foreground is left as it is; the others run through the model with the
    global predictions as the mask and `inter_s8` (no `inter_s4`), their
    'pred_224' without a 16-pixel border (except at the image's edges)
    averaged where they overlap. Pixels no patch covers keep the thresholded
    global prediction. (The official final resize, align_corners=True to the
    size the step already has, is the identity.)

The result (a float in [0, 1], `Refiner.soft_mask`) is returned as
`uint8(result * 255)`, truncated as the official code does.

Host side, the resizes are torch's (F.interpolate on CPU, float32) to the bit,
in numpy: `area` is adaptive average pooling; `bilinear` and `bicubic` given a
scale factor map coordinates with that scale, not with the sizes. Device side,
the model runs under `jax.jit` on a mesh: the global step's single pass on the
first device; the local step's patches, all known after the global step, in
batches of `batch_size` rows (padded with blank patches) split over the
devices. Each patch shape compiles once per batch size. `refine_with` runs the
steps around any forward function of the module's signature (the tests give it
the official torch module).

`find_pairs` and `read_pair` are the command's files: images and masks paired
by name. The library defines no flags; the command is pspnet_jax/refine.py.
"""

import functools
import os

import cv2
import jax
import numpy as np
from flax import nnx

from pspnet_jax import predictions, sharding
from pspnet_jax.errors import MissingFile, UserError

# The official transforms: ToTensor (/ 255) and Normalize with ImageNet's statistics.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# The local step advances L // 2 - 32 pixels: below this it would not advance.
MIN_LOCAL_L = 66
# Of each refined patch, this border is dropped where the patch does not touch the image edge.
_BORDER = 16
# Patches whose thresholded global prediction is more (less) foreground are not refined.
_HIGH, _LOW = np.float32(0.9), np.float32(0.1)
# How many file names an error lists before it counts the rest.
_LISTED = 5
# torch's bilinear CPU kernel for outputs with height + width up to this is another one (the
# channels-last kernel), with its own order of the sums.
_SMALL_BILINEAR = 128
_F32 = np.float32


# ------------------------------------------------------------------------------------------
# torch-exact resizes of (H, W, C) float32 arrays.
#
# torch's CPU kernels are compiled for AVX2 with fused multiply-adds where the compiler chose
# them; `_fma` rounds once as they do (a product of two float32 is exact in float64, and so,
# but for a double rounding that never showed in millions of values, is the sum).


def _fma(a, b, c) -> np.ndarray:
  return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + c).astype(_F32)


def _scale(in_size: int, out_size: int, scale: float | None, align_corners: bool) -> np.float32:
  """torch's `area_pixel_compute_scale`: input pixels per output pixel, in float32."""
  if align_corners:
    return _F32(in_size - 1) / _F32(out_size - 1) if out_size > 1 else _F32(0)
  if scale is not None and scale > 0:
    return _F32(1.0 / scale)      # the given scale, not the sizes: F.interpolate(scale_factor=)
  return _F32(in_size) / _F32(out_size)


def _source(in_size: int, out_size: int, scale, align_corners: bool, cubic: bool) -> np.ndarray:
  """The float32 source coordinate of each output pixel (`area_pixel_compute_source_index`)."""
  ratio = _scale(in_size, out_size, scale, align_corners)
  index = np.arange(out_size, dtype=_F32)
  if align_corners:
    return ratio * index
  source = _fma(ratio, index + _F32(0.5), -0.5)
  return source if cubic else np.maximum(source, _F32(0))


def _guard(source: np.ndarray, in_size: int):
  """torch's `guard_index_and_lambda`: the index below (at most the last) and the remainder."""
  index = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  return index, np.clip(source - index.astype(_F32), 0, 1).astype(_F32)


def _linear_taps(in_size: int, out_size: int, scale, align_corners: bool):
  """(index, next index, weight, next weight) per output pixel. An axis of the same size is
  copied (weights 1 and 0), as torch does even when a scale factor says otherwise."""
  if in_size == out_size:
    index = np.arange(out_size)
    return index, index, np.ones(out_size, _F32), np.zeros(out_size, _F32)
  index, weight = _guard(_source(in_size, out_size, scale, align_corners, cubic=False), in_size)
  return index, index + (index < in_size - 1), _F32(1) - weight, weight


def _interpolate(values: np.ndarray, taps, axis: int) -> np.ndarray:
  """sum_k values[index_k] * weight_k along `axis`, folded as torch's kernels fold it: the
  first product fused onto the second, each further one fused onto the sum."""
  (index, *indices), (weight, *weights) = taps
  shape = (-1,) + (1,) * (values.ndim - 1 - axis)
  gathered = lambda which: np.take(values, which, axis=axis)
  result = _fma(gathered(index), weight.reshape(shape),
                gathered(indices[0]) * weights[0].reshape(shape))
  for index, weight in zip(indices[1:], weights[1:]):
    result = _fma(gathered(index), weight.reshape(shape), result)
  return result


def resize_bilinear(values: np.ndarray, height: int, width: int, *, scale: float | None = None,
                    align_corners: bool = False) -> np.ndarray:
  """F.interpolate(mode='bilinear') of an (h, w, C) float32 array to (height, width, C), to
  the bit. `scale` (align_corners=False only) is the scale_factor F.interpolate was given:
  torch then maps coordinates with it, not with the sizes (floor(side * scale))."""
  rows = _linear_taps(values.shape[0], height, scale, align_corners)
  columns = _linear_taps(values.shape[1], width, scale, align_corners)
  if height + width > _SMALL_BILINEAR:   # the generic kernel: along the width, then the height
    return _interpolate(_interpolate(values, _pair(columns), axis=1), _pair(rows), axis=0)
  # The channels-last kernel: the four corners, each weighted by its product of weights.
  (top, bottom, top_weight, bottom_weight), (left, right, left_weight, right_weight) = (
      rows, columns)
  corners = [(values[row][:, column], (row_weight[:, None] * column_weight)[..., None])
             for row, row_weight in ((top, top_weight), (bottom, bottom_weight))
             for column, column_weight in ((left, left_weight), (right, right_weight))]
  result = _fma(*corners[0], corners[1][0] * corners[1][1])
  for value, weight in corners[2:]:
    result = _fma(value, weight, result)
  return result


def _pair(taps):
  index, following, weight, following_weight = taps
  return (index, following), (weight, following_weight)


_CUBIC_A = _F32(-0.75)


def _cubic_near(x: np.ndarray) -> np.ndarray:
  """torch's cubic_convolution1 (|x| <= 1), rounded where its compiled code rounds."""
  return (_fma(_CUBIC_A + 2, x, -(_CUBIC_A + 3)) * x) * x + _F32(1)


def _cubic_far(x: np.ndarray) -> np.ndarray:
  """torch's cubic_convolution2 (1 <= |x| <= 2), rounded where its compiled code rounds."""
  return _fma(_fma(_CUBIC_A, x, -5 * _CUBIC_A), x, 8 * _CUBIC_A) * x - 4 * _CUBIC_A


def _cubic_taps(in_size: int, out_size: int, scale):
  """Four indices (clamped to the border) and Keys weights (A = -0.75) per output pixel."""
  index, t = _guard(_source(in_size, out_size, scale, False, cubic=True), in_size)
  rest = _F32(1) - t
  weights = [_cubic_far(t + _F32(1)), _cubic_near(t), _cubic_near(rest),
             _cubic_far(rest + _F32(1))]
  return [np.clip(index - 1 + k, 0, in_size - 1) for k in range(4)], weights


def resize_bicubic(values: np.ndarray, height: int, width: int, *,
                   scale: float | None = None) -> np.ndarray:
  """F.interpolate(mode='bicubic', align_corners=False) of an (h, w, C) float32 array, to the
  bit; `scale` as in `resize_bilinear`."""
  values = _interpolate(values, _cubic_taps(values.shape[1], width, scale), axis=1)
  return _interpolate(values, _cubic_taps(values.shape[0], height, scale), axis=0)


def _bins(in_size: int, out_size: int):
  """Adaptive pooling's bins: floor(i * in / out) to ceil((i + 1) * in / out)."""
  index = np.arange(out_size)
  start = index * in_size // out_size
  return start, -(-(index + 1) * in_size // out_size) - start


def resize_area(values: np.ndarray, height: int, width: int) -> np.ndarray:
  """F.interpolate(mode='area'), i.e. adaptive_avg_pool2d, of an (h, w, C) float32 array to
  (height, width, C), to the bit: each bin summed in row-major order, then divided by its
  height and by its width."""
  in_height, in_width = values.shape[:2]
  row_start, row_count = _bins(in_height, height)
  column_start, column_count = _bins(in_width, width)
  total = np.zeros((height, width, values.shape[2]), _F32)
  # A bin shorter than the longest gets zeros past its end, which leave its sum as it is.
  for dy in range(row_count.max()):
    rows = values[np.minimum(row_start + dy, in_height - 1)]
    for dx in range(column_count.max()):
      inside = (dy < row_count)[:, None, None] & (dx < column_count)[None, :, None]
      total += np.where(inside, rows[:, np.minimum(column_start + dx, in_width - 1)], _F32(0))
  return total / row_count[:, None, None].astype(_F32) / column_count[:, None].astype(_F32)


def max_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """The official `resize_max_side`'s output size: floor(side * size / max(height, width))
  per side, as F.interpolate computes it from the scale factor (the long side can come out
  size - 1)."""
  scale = size / max(height, width)
  return int(height * scale), int(width * scale)


def resize_max_side(values: np.ndarray, size: int, method: str) -> np.ndarray:
  """The official `resize_max_side`: F.interpolate with scale_factor=size / max(h, w), which
  `bilinear` and `bicubic` use to map the coordinates (`max_side_size` is the size)."""
  height, width = max_side_size(*values.shape[:2], size)
  scale = size / max(values.shape[:2])
  if method == 'area':
    return resize_area(values, height, width)
  if method == 'bilinear':
    return resize_bilinear(values, height, width, scale=scale)
  if method == 'bicubic':
    return resize_bicubic(values, height, width, scale=scale)
  raise ValueError(f'method {method!r}: one of area, bilinear, bicubic')


# ------------------------------------------------------------------------------------------
# The two steps, over any `forward(images, masks, inter_s8)`: NHWC float32 batches (H, W
# multiples of 8; inter_s8 None in the global step) -> a dict of NHWC arrays holding at least
# 'pred_224' and 'pred_56_2', as the refinement module returns them.


def normalize(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The official transforms: uint8 RGB (H, W, 3) -> float32 (x / 255 - mean) / std; a mask
  (H, W) or (H, W, 1) -> float32 (H, W, 1), 1 where it is over 127, else -1."""
  image, mask = np.asarray(image), np.asarray(mask)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f'image: expected uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}')
  if mask.ndim == 3 and mask.shape[2] == 1:
    mask = mask[..., 0]
  if mask.shape != image.shape[:2]:
    raise ValueError(f'mask: expected {image.shape[:2]} (the image\'s height and width) or '
                     f'{image.shape[:2] + (1,)}, got {mask.shape}')
  scaled = image.astype(_F32) / _F32(255)
  normalized = (scaled - np.asarray(IMAGE_MEAN, _F32)) / np.asarray(IMAGE_STD, _F32)
  return normalized, np.where(mask > 127, _F32(1), _F32(-1))[..., None]


def padded_size(height: int, width: int) -> tuple[int, int]:
  """The official `safe_forward`'s input size: when a side is not a multiple of 8, both grow
  to (side // 8 + 1) * 8 (so a side that was one grows by 8)."""
  if height % 8 or width % 8:
    return (height // 8 + 1) * 8, (width // 8 + 1) * 8
  return height, width


def _safe_forward(forward, images, masks, inter_s8=None) -> dict:
  """`safe_forward` over a batch: padded (images with 0, masks with -1), run, cropped back."""
  height, width = masks.shape[1:3]
  padded_height, padded_width = padded_size(height, width)
  if (padded_height, padded_width) != (height, width):
    pad = ((0, 0), (0, padded_height - height), (0, padded_width - width), (0, 0))
    images = np.pad(images, pad)
    masks = np.pad(masks, pad, constant_values=-1)
    if inter_s8 is not None:
      inter_s8 = np.pad(inter_s8, pad, constant_values=-1)
  outputs = forward(images, masks, inter_s8)
  return {key: np.asarray(value)[:, :height, :width] for key, value in outputs.items()}


def global_step(forward, image: np.ndarray, mask: np.ndarray, L: int):
  """The normalized pair at long side L through the model: ('pred_224', 'pred_56_2'), each
  (h, w, 1) at that size."""
  height, width = image.shape[:2]
  if max(height, width) > L:
    image, mask = resize_max_side(image, L, 'area'), resize_max_side(mask, L, 'area')
  elif max(height, width) < L:
    image, mask = resize_max_side(image, L, 'bicubic'), resize_max_side(mask, L, 'bilinear')
  outputs = _safe_forward(forward, image[None], mask[None])
  return outputs['pred_224'][0], outputs['pred_56_2'][0]


def fast_result(pred_224: np.ndarray, height: int, width: int, L: int) -> np.ndarray:
  """`process_im_single_pass`'s ending: the global prediction at the original size."""
  if max(height, width) < L:
    return resize_area(pred_224, height, width)
  if max(height, width) > L:
    return resize_bilinear(pred_224, height, width, align_corners=True)
  return pred_224


def check_size(height: int, width: int, *, fast: bool, L: int) -> None:
  """ValueError unless the official code can refine an image of this size with this L: the
  local step's patches advance by L // 2 - 32 pixels, and the short side must keep a pixel at
  long side L."""
  if not fast and L < MIN_LOCAL_L:
    raise ValueError(f'L={L}: the local step needs L >= {MIN_LOCAL_L} (its patches advance by '
                     f'L // 2 - {2 * _BORDER} pixels); use a larger L or fast mode')
  if L < 1 or min(max_side_size(height, width, L)) < 1:
    raise ValueError(f'an image of {height}x{width} has no rows or columns left when its long '
                     f'side is resized to L={L}')


def patches(height: int, width: int, L: int) -> list[tuple[int, int, int, int]]:
  """(top, bottom, left, right) of the local step's patches in the official order (columns
  outer), shifted inside the image, each start once."""
  step = L // 2 - 2 * _BORDER
  boxes, seen = [], set()
  for column in range(width // step + 1):
    for row in range(height // step + 1):
      top, left = row * step, column * step
      bottom, right = top + L, left + L
      if bottom > height:
        top, bottom = height - L, height
      if right > width:
        left, right = width - L, width
      top, left = max(top, 0), max(left, 0)
      if (top, left) not in seen:
        seen.add((top, left))
        boxes.append((top, bottom, left, right))
  return boxes


def _worth_refining(coarse_patch: np.ndarray) -> bool:
  """Between 10% and 90% foreground, compared in float32 as the official torch code does."""
  share = _F32(np.count_nonzero(coarse_patch > 0)) / _F32(coarse_patch.size)
  return not (share > _HIGH or share < _LOW)


def local_step(forward, image: np.ndarray, pred_224: np.ndarray, pred_56: np.ndarray, L: int,
               *, batch: int | None = None) -> np.ndarray:
  """`process_high_res_im`'s local step at the image's size: (H, W, 1) in [0, 1]. The patches
  worth refining go to `forward` `batch` at a time (default: all at once)."""
  height, width = image.shape[:2]
  coarse = np.where(resize_bilinear(pred_224, height, width) > 0.5, _F32(1), _F32(-1))
  inter = resize_bilinear(pred_56, height, width) * 2 - 1
  chosen = [box for box in patches(height, width, L)
            if _worth_refining(coarse[box[0]:box[1], box[2]:box[3]])]
  total = np.zeros((height, width, 1), _F32)
  count = np.zeros((height, width, 1), _F32)
  batch = batch or max(len(chosen), 1)
  for first in range(0, len(chosen), batch):
    boxes = chosen[first:first + batch]
    crops = lambda values: np.stack([values[t:b, l:r] for t, b, l, r in boxes])
    refined = _safe_forward(forward, crops(image), crops(coarse), crops(inter))['pred_224']
    for (top, bottom, left, right), prediction in zip(boxes, refined):
      # Each patch without a 16-pixel border, except where it touches the image's edge.
      inner_top, inner_left = top + _BORDER * (top != 0), left + _BORDER * (left != 0)
      inner_bottom = bottom - _BORDER * (bottom != height)
      inner_right = right - _BORDER * (right != width)
      total[inner_top:inner_bottom, inner_left:inner_right] += prediction[
          inner_top - top:inner_bottom - top, inner_left - left:inner_right - left]
      count[inner_top:inner_bottom, inner_left:inner_right] += 1
  # Pixels no patch reached keep the thresholded global prediction, as 0 or 1.
  return np.divide(total, count, out=coarse / 2 + _F32(0.5), where=count > 0)


def refine_with(forward, image: np.ndarray, mask: np.ndarray, *, fast: bool = False,
                L: int = 900, batch: int | None = None) -> np.ndarray:
  """The official `Refiner.refine` before its conversion to uint8, over `forward`: uint8
  image (H, W, 3) RGB and mask (H, W) -> float32 (H, W) in [0, 1]."""
  image, mask = normalize(image, mask)
  check_size(*image.shape[:2], fast=fast, L=L)
  pred_224, pred_56 = global_step(forward, image, mask, L)
  height, width = image.shape[:2]
  if fast:
    return fast_result(pred_224, height, width, L)[..., 0]
  return local_step(forward, image, pred_224, pred_56, L, batch=batch)[..., 0]


def to_uint8(result: np.ndarray) -> np.ndarray:
  """The official conversion: (result * 255) truncated to uint8."""
  return (result * _F32(255)).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# The model on the devices.


def _global_outputs(variables: nnx.State, images, masks, *, graphdef: nnx.GraphDef):
  outputs = nnx.merge(graphdef, variables)(images, masks)
  return {'pred_224': outputs['pred_224'], 'pred_56_2': outputs['pred_56_2']}


def _local_outputs(variables: nnx.State, images, masks, inter_s8, *, graphdef: nnx.GraphDef):
  # The official local step passes inter_s8 alone: the model's second pass still runs.
  return {'pred_224': nnx.merge(graphdef, variables)(images, masks, inter_s8)['pred_224']}


class Refiner:
  """The official `Refiner` over our refinement module: `refine(image, mask, fast, L)`.

  `graphdef` and `variables` are a refinement module's (`nnx.split`; run in
  eval mode whatever mode they were split in), the variables placed
  replicated over `mesh` (default: this process's devices). The global step
  runs on the mesh's first device; the local step's patches in batches of
  `batch_size` rows (0: one per device; a multiple of the device count) split
  over the mesh.
  """

  def __init__(self, graphdef: nnx.GraphDef, variables: nnx.State, *, mesh=None,
               batch_size: int = 0):
    self.mesh = sharding.make_mesh(jax.local_devices()) if mesh is None else mesh
    devices = self.mesh.devices.size
    self.batch_size = batch_size or devices
    if self.batch_size % devices:
      raise ValueError(f'batch_size={batch_size} does not split over the {devices} devices; '
                       f'use a multiple of {devices}')
    replicated, rows = sharding.replicated(self.mesh), sharding.batch_sharded(self.mesh)
    model = nnx.merge(graphdef, jax.device_put(variables, replicated))
    model.eval()   # BatchNorm with its running statistics
    graphdef, self._variables = nnx.split(model)
    # The global step's single image on one device: the replicated variables' copy there.
    self._first_variables = jax.tree.map(lambda array: array.addressable_data(0),
                                         self._variables)
    self._global = jax.jit(functools.partial(_global_outputs, graphdef=graphdef))
    self._local = jax.jit(functools.partial(_local_outputs, graphdef=graphdef),
                          in_shardings=(replicated, rows, rows, rows), out_shardings=rows)

  @classmethod
  def from_model(cls, model: nnx.Module, **options) -> 'Refiner':
    """A Refiner of a refinement module (`models.cascadepsp.RefinementModule`), run in eval
    mode (the module given keeps its mode). `options`: the constructor's."""
    return cls(*nnx.split(model), **options)

  @classmethod
  def from_workdir(cls, workdir: str, config=None, *, step: int | None = None, mesh=None,
                   batch_size: int | None = None) -> 'Refiner':
    """A Refiner of checkpoint `step` (default: the latest) of `workdir`, with its config:
    `config`, or else the `config.json` a training run writes there (an imported checkpoint
    has none: pass `configuration.load_config('configs/cascadepsp.py')`). `batch_size`
    defaults to config.refine.batch_size."""
    # Imported here: checkpoint imports orbax, which the steps themselves do not need.
    from pspnet_jax import checkpoint, configuration  # pylint: disable=import-outside-toplevel
    config = configuration.workdir_config(workdir, config, example='configs/cascadepsp.py')
    if config.task != 'refinement':
      raise UserError(f'config.task={config.task!r}: refinement needs a CascadePSP config '
                      '(configs/cascadepsp.py)')
    mesh = sharding.make_mesh(jax.local_devices()) if mesh is None else mesh
    loaded = checkpoint.load_model(config, workdir, step, mesh=mesh)
    return cls(*nnx.split(loaded.model), mesh=mesh,
               batch_size=config.refine.batch_size if batch_size is None else batch_size)

  def forward(self, images: np.ndarray, masks: np.ndarray, inter_s8) -> dict:
    """`forward` of `refine_with`: the global step's image on the first device; patches padded
    to a multiple of the device count with blank ones and split over the mesh."""
    if inter_s8 is None:
      return jax.device_get(self._global(self._first_variables, images, masks))
    count, devices = len(images), self.mesh.devices.size
    rows = -(-count // devices) * devices
    if rows != count:
      blank = ((0, rows - count), (0, 0), (0, 0), (0, 0))
      images = np.pad(images, blank)
      masks, inter_s8 = (np.pad(values, blank, constant_values=-1) for values in (masks, inter_s8))
    outputs = self._local(self._variables, images, masks, inter_s8)
    return {key: np.asarray(value)[:count] for key, value in outputs.items()}

  def soft_mask(self, image: np.ndarray, mask: np.ndarray, fast: bool = False,
                L: int = 900) -> np.ndarray:  # pylint: disable=invalid-name  (the official name)
    """`refine`'s result before its conversion to uint8: float32 (H, W) in [0, 1]."""
    return refine_with(self.forward, image, mask, fast=fast, L=L, batch=self.batch_size)

  def refine(self, image: np.ndarray, mask: np.ndarray, fast: bool = False,
             L: int = 900) -> np.ndarray:  # pylint: disable=invalid-name  (the official name)
    """The official `Refiner.refine`: image uint8 (H, W, 3) RGB, mask (H, W) 0..255 (over 127
    is foreground) -> the refined mask, uint8 (H, W) 0..255. `fast`: the global step only.
    `L`: the global step's long side and the local step's patch side."""
    return to_uint8(self.soft_mask(image, mask, fast=fast, L=L))


# ------------------------------------------------------------------------------------------
# Files: images and their masks.


def listed(names: list[str]) -> str:
  """The first names, joined, and how many more there are."""
  more = f' and {len(names) - _LISTED} more' if len(names) > _LISTED else ''
  return ', '.join(names[:_LISTED]) + more


def _find(spec: str, what: str, exclude: str | None) -> list[predictions.ImageFile]:
  try:
    return predictions.find_inputs(spec, exclude=exclude)
  except FileNotFoundError as error:
    raise MissingFile(f'{what}: {error}') from error
  except ValueError as error:   # two files that would pair under one name
    raise UserError(f'{what}: {error}') from error


def find_pairs(image_spec: str, mask_spec: str, *,
               exclude: str | None = None) -> list[tuple[str, str, str]]:
  """(name, image path, mask path) of each pair: two files pair with each other (the name is
  the image's stem); otherwise the image files and mask files of `predictions.find_inputs`
  (a file, a folder searched recursively, or a glob; nothing under `exclude`) pair by name,
  the path below the folder without extension. A file without a partner is a UserError
  that names it."""
  images, masks = _find(image_spec, 'images', exclude), _find(mask_spec, 'masks', exclude)
  if os.path.isfile(image_spec) and os.path.isfile(mask_spec):
    return [(images[0].name, images[0].path, masks[0].path)]
  mask_paths = {item.name: item.path for item in masks}
  image_names = {item.name for item in images}
  alone = [('images without a mask', [item.path for item in images
                                      if item.name not in mask_paths]),
           ('masks without an image', [item.path for item in masks
                                       if item.name not in image_names])]
  problems = [f'{what}: {listed(files)}' for what, files in alone if files]
  if problems:
    raise UserError('images and masks pair by name (the path below the folder without '
                    f'extension); {"; ".join(problems)}')
  return [(item.name, item.path, mask_paths[item.name]) for item in images]


def read_pair(image_path: str, mask_path: str) -> tuple[np.ndarray, np.ndarray]:
  """(image (H, W, 3) RGB uint8, mask (H, W) uint8), the mask as grayscale as
  cv2.imread(IMREAD_GRAYSCALE) reads it (the official demo's reader). A UserError names the
  file that cannot be read, or both files when their sizes differ."""
  try:
    image = predictions.read_image(image_path)
    mask = cv2.cvtColor(predictions.read_image(mask_path), cv2.COLOR_RGB2GRAY)
  except predictions.UnreadableImage as error:
    raise UserError(f'cannot read {error}') from error
  if mask.shape != image.shape[:2]:
    raise UserError(f'mask {mask_path} is {mask.shape[0]}x{mask.shape[1]} but its image '
                    f'{image_path} is {image.shape[0]}x{image.shape[1]}: a mask must have its '
                    "image's size")
  return image, mask

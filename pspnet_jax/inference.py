"""Images of any size -> class probabilities, with the official protocols, batched over devices.

Protocols (`Protocol.from_config`, key `eval.protocol`):

  - `slide` is semseg's `tool/test.py`: per scale s of `eval.scales` the float
    RGB image is resized (cv2 linear) so its long side is round(s *
    eval.base_size), padded symmetrically with the mean colour up to at least
    `eval.crop_size`, and cut into crop-sized windows with stride
    ceil(crop * 2/3), ceil((H - crop) / stride) + 1 per axis, the last one
    clamped to the border. Each window's softmax (averaged with its mirror's,
    mirrored back, with `eval.flip`) is summed into the scale's canvas and
    divided by the number of windows that covered each pixel; the padding is
    cut off and the canvas resized (cv2 linear) to the original size. The
    scales' probabilities are averaged.
  - `whole` is the same with a single window: the long side resized to
    eval.crop_size (scale 1), padded to the crop.
  - `mmseg_whole` and `mmseg_slide` are mmsegmentation 1.x's test modes
    (`EncoderDecoder.whole_inference` / `slide_inference`, then
    `postprocess_result`). The image is resized as mmcv's `Resize(keep_ratio)`
    does (cv2 linear on the decoded image: a uint8 image stays uint8, as
    mmseg's, and takes OpenCV's fixed-point path; a float image is resized as
    float32) to the largest size inside the (long, short) box
    `eval.mmseg_scale`, then normalized. Whole: one pass over the whole
    image, any size, no padding. Slide: windows of `eval.mmseg_crop` (H, W)
    every `eval.mmseg_stride`, max(size - crop + stride - 1, 0) // stride + 1
    per axis, the last clamped to the border, smaller than the crop where the
    image is; their *logits* summed and divided by the count. The logits are
    resized to the original size (bilinear, align_corners=False, as torch) and
    the result is their softmax (whose argmax is mmseg's argmax of the
    logits). With `eval.scales` other than (1.0,) or `eval.flip`, mmseg's
    test-time augmentation (`tools/test.py --tta`, `SegTTAModel`) instead:
    for each scale r the *original* image resized by r (mmcv's
    `Resize(scale_factor=r, keep_ratio=True)`), without and (with flip) with
    a horizontal mirror; each augmentation's logits, mirrored back and resized
    to the original size, are softmaxed and the softmaxes averaged.

What is batched: windows, from any number of images and scales, wait in one
queue per window shape (semseg: one shape, the crop; mmseg: crop-sized
windows, smaller windows of small images, and whole images of every size).
Each step runs `batch_size` windows of one shape (padded when fewer wait), so
the step compiles once per shape and every device works on every step. The
mmseg protocols have shapes that few windows share (whole mode: every image
size), so their steps shrink to the smallest of devices x 1, 2, 4, ... up to
`batch_size` rows that holds the windows waiting (`step_rows`), instead of
running mostly padding; that compiles at most log2 more programs per shape. The
host keeps only the images whose windows wait or are in flight, or which wait
to be returned in input order (at most the local batch size per process): one
canvas per augmentation that has started, never a split-wide store.

With several processes each one feeds its own images; every process runs the
same steps with the same shapes in the same order: before each step the
processes gather every process's proposal (its longest queue's shape and
length) and all pick the same shape from it (`choose_shape`); a process
without windows of that shape (or, having run out, without any) sends
padding, so the collectives of the sharded step line up.
"""

import collections
import dataclasses
import functools
import math
from typing import Callable, Iterable, Iterator

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from pspnet_jax import sharding
from pspnet_jax.data import transforms
from pspnet_jax.models import layers

SEMSEG_PROTOCOLS = ('whole', 'slide')
MMSEG_PROTOCOLS = ('mmseg_whole', 'mmseg_slide')
PROTOCOLS = SEMSEG_PROTOCOLS + MMSEG_PROTOCOLS
# OpenCV 5 resizes at most this many channels in one call (OpenCV 4: 512); ADE20K has 150.
_CV_MAX_CHANNELS = 128


@dataclasses.dataclass(frozen=True)
class Protocol:
  """An evaluation protocol and its settings; the fields a protocol does not use are None."""
  name: str                        # one of PROTOCOLS
  crop_size: int | None            # semseg: window side
  base_size: int | None            # semseg slide: the long side at scale 1
  scales: tuple[float, ...]        # semseg: long side round(scale * base_size); mmseg: TTA factors
  flip: bool                       # semseg: each window with its mirror; mmseg: TTA mirrors
  mmseg_scale: tuple[int, int] | None = None    # mmseg: the (long, short) box, without TTA
  mmseg_crop: tuple[int, int] | None = None     # mmseg_slide: window (H, W)
  mmseg_stride: tuple[int, int] | None = None   # mmseg_slide: (H, W)

  @classmethod
  def from_config(cls, config, name: str | None = None) -> 'Protocol':
    """The config's eval protocol (or `name`'s) with its eval.* settings."""
    evaluation = config.eval
    name = name or evaluation.protocol
    if name not in PROTOCOLS:
      raise ValueError(f'config.eval.protocol={name!r}: must be one of {PROTOCOLS}')
    scales = tuple(float(s) for s in evaluation.scales)
    if name == 'whole':
      return cls('whole', evaluation.crop_size, evaluation.crop_size, (1.0,), evaluation.flip)
    if name == 'slide':
      return cls('slide', evaluation.crop_size, evaluation.base_size, scales, evaluation.flip)
    slide = name == 'mmseg_slide'
    pair = lambda value: tuple(int(side) for side in value)
    return cls(name, None, None, scales, bool(evaluation.flip),
               mmseg_scale=pair(evaluation.mmseg_scale),
               mmseg_crop=pair(evaluation.mmseg_crop) if slide else None,
               mmseg_stride=pair(evaluation.mmseg_stride) if slide else None)

  @property
  def is_mmseg(self) -> bool:
    return self.name in MMSEG_PROTOCOLS

  @property
  def mmseg_tta(self) -> bool:
    """mmseg: test-time augmentation (scale factors of the original image, mirrors) rather than
    the plain test pipeline (the image resized into the box)."""
    return self.is_mmseg and (self.scales != (1.0,) or self.flip)

  def settings(self) -> dict:
    """The settings that decide the predictions (recorded beside results), as JSON values."""
    if not self.is_mmseg:
      return {'name': self.name, 'crop_size': self.crop_size, 'base_size': self.base_size,
              'scales': list(self.scales), 'flip': self.flip}
    settings = {'name': self.name, 'scales': list(self.scales), 'flip': self.flip,
                'tta': self.mmseg_tta}
    if not self.mmseg_tta:     # TTA resizes by the scales, never into the box
      settings['mmseg_scale'] = list(self.mmseg_scale)
    if self.name == 'mmseg_slide':
      settings |= {'mmseg_crop': list(self.mmseg_crop), 'mmseg_stride': list(self.mmseg_stride)}
    return settings


def scaled_size(height: int, width: int, long_side: int) -> tuple[int, int]:
  """(new_h, new_w) with the long side `long_side`, the short side rounded as semseg does."""
  if height > width:
    return long_side, max(round(long_side / height * width), 1)
  return max(round(long_side / width * height), 1), long_side


def window_origins(height: int, width: int, crop: int) -> list[tuple[int, int]]:
  """Top-left corners of semseg's windows over a padded image (height, width >= crop)."""
  stride = math.ceil(crop * 2 / 3)

  def starts(size):
    count = math.ceil((size - crop) / stride) + 1
    return [min(index * stride + crop, size) - crop for index in range(count)]

  return [(top, left) for top in starts(height) for left in starts(width)]


def mmseg_window_origins(height: int, width: int, crop, stride
                         ) -> tuple[list[tuple[int, int]], tuple[int, int]]:
  """mmseg's `slide_inference` grid over an (unpadded) image: the windows' top-left corners and
  their one shape, (min(crop_h, height), min(crop_w, width))."""

  def starts(size, crop_side, step):
    count = max(size - crop_side + step - 1, 0) // step + 1
    return [max(min(index * step + crop_side, size) - crop_side, 0) for index in range(count)]

  origins = [(top, left) for top in starts(height, crop[0], stride[0])
             for left in starts(width, crop[1], stride[1])]
  return origins, (min(crop[0], height), min(crop[1], width))


def mmseg_scale_factor_size(height: int, width: int, factor: float) -> tuple[int, int]:
  """mmcv's `Resize(scale_factor=factor, keep_ratio=True)`: the image's (w, h) times the factor,
  each side rounded half up, is the box that `mmcv.rescale_size` then fits the image into (a
  side can come out one pixel off int(side * factor + 0.5))."""
  box = (int(width * factor + 0.5), int(height * factor + 0.5))
  return transforms.mmseg_rescale_size(height, width, box)


def _resize(probabilities: np.ndarray, height: int, width: int) -> np.ndarray:
  """cv2 linear resize of an (h, w, C) array, in slices of the channels cv2 can hold."""
  if probabilities.shape[:2] == (height, width):
    return probabilities
  slices = [cv2.resize(probabilities[..., first:first + _CV_MAX_CHANNELS], (width, height),
                       interpolation=cv2.INTER_LINEAR)
            for first in range(0, probabilities.shape[-1], _CV_MAX_CHANNELS)]
  slices = [s[..., None] if s.ndim == 2 else s for s in slices]   # cv2 drops a last axis of 1
  return np.concatenate(slices, axis=-1)


def _linear_taps(in_size: int, out_size: int):
  """Per output index: the two input indices and float32 weights of torch's bilinear
  (F.interpolate, align_corners=False, size given), computed as torch computes them: in
  float32, the ratio in / out, the source coordinate ratio * (i + 0.5) - 0.5 with one rounding
  (the multiply-add is fused, in torch's CPU kernels built for AVX2 as in CUDA's), clamped at
  0; floor, and the weight of the next index (clamped to the last) the remainder.

  Not `layers._resize_matrix`: its float64 coordinates are the exact ones, while torch's
  float32 ones are off by up to an ulp of the coordinate, which moves a weight by 1e-4 at 2048
  pixels (measured against torch: 7e-4 on unit-scale values at 1024 x 2048 -> 1000 x 1999;
  these taps: 5e-7, the order of the sums)."""
  ratio = np.float32(in_size) / np.float32(out_size)
  centres = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
  # float64 holds the product of two float32 exactly, and the difference with 0.5 too: one
  # rounding to float32, as a fused multiply-add.
  source = (np.float64(ratio) * centres.astype(np.float64) - 0.5).astype(np.float32)
  source = np.maximum(source, np.float32(0.0))
  low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  high_weight = np.clip(source - low.astype(np.float32), 0.0, 1.0).astype(np.float32)
  high = low + (low < in_size - 1)
  return low, high, np.float32(1.0) - high_weight, high_weight


def resize_bilinear_host(values: np.ndarray, height: int, width: int) -> np.ndarray:
  """F.interpolate(mode='bilinear', align_corners=False) of an (h, w, C) float32 array to
  (height, width, C), in numpy: two taps per axis (`_linear_taps`), not dense maps (an
  ADE20K canvas is 512 x 2048 x 150), and no compile per image size. Along W first, then H,
  torch's order of the sums; an axis of the right size is left as it is (torch copies it). A
  new array, unless the size is already right (then `values` itself)."""
  if values.shape[1] != width:
    values = _lerp(values, *_linear_taps(values.shape[1], width), axis=1)
  if values.shape[0] != height:
    values = _lerp(values, *_linear_taps(values.shape[0], height), axis=0)
  return values


def _lerp(values, low, high, low_weight, high_weight, *, axis: int) -> np.ndarray:
  """values[low] * low_weight + values[high] * high_weight along `axis`, with two
  temporaries of the result's size (the gathers), multiplied in place."""
  weight_shape = (-1,) + (1,) * (values.ndim - 1 - axis)
  resized = np.take(values, low, axis=axis)
  resized *= low_weight.reshape(weight_shape)
  high_part = np.take(values, high, axis=axis)
  high_part *= high_weight.reshape(weight_shape)
  resized += high_part
  return resized


def _softmax(logits: np.ndarray) -> np.ndarray:
  """Softmax over the last axis into one new float32 array (the input stays untouched: it may
  be a read-only row of a step's result)."""
  result = logits - logits.max(axis=-1, keepdims=True)
  np.exp(result, out=result)
  result /= result.sum(axis=-1, keepdims=True)
  return result


class _Canvas:
  """One augmented copy of one image (a semseg scale, an mmseg augmentation): its normalized
  input, its windows (all of one shape) and the sums of their outputs with the number of
  windows over each pixel. `finish(average)` turns the averaged canvas into probabilities at
  the original image's size."""

  def __init__(self, image: np.ndarray, origins, window_shape: tuple[int, int],
               finish: Callable[[np.ndarray], np.ndarray]):
    self.image = image
    self.origins = origins
    self.window_shape = tuple(window_shape)
    self.finish = finish
    self.sums = None
    self.counts = None
    self.pending = len(origins)
    self.job = None         # the _ImageJob it belongs to

  def window(self, index: int) -> np.ndarray:
    top, left = self.origins[index]
    height, width = self.window_shape
    return self.image[top:top + height, left:left + width]

  def add(self, index: int, values: np.ndarray) -> None:
    self.pending -= 1
    if len(self.origins) == 1 and self.window_shape == self.image.shape[:2]:
      # One window over everything (whole modes): its values are the average as they are; no
      # canvas. The canvas finishes in the step that brought the values.
      self.sums = values
      return
    if self.sums is None:
      self.sums = np.zeros(self.image.shape[:2] + values.shape[-1:], np.float32)
      self.counts = np.zeros(self.image.shape[:2], np.float32)
    top, left = self.origins[index]
    height, width = self.window_shape
    self.sums[top:top + height, left:left + width] += values
    self.counts[top:top + height, left:left + width] += 1

  def result(self) -> np.ndarray:
    """finish() of the average of the windows' outputs."""
    if self.counts is not None:
      # In place: a canvas of a large image is hundreds of megabytes.
      self.sums /= self.counts[..., None]
    average, self.sums, self.image = self.sums, None, None
    return self.finish(average)


class _SemsegRecipe:
  """semseg's `test.py` (protocols slide and whole): per scale, the long side resized, padded
  with the mean to the crop, square windows; the step returns softmaxes (with the mirror's)."""

  def __init__(self, protocol: Protocol, mean, std):
    self.protocol, self.mean, self.std = protocol, mean, std
    self.step_options = dict(probabilities=True, flip=protocol.flip, align_corners=True)

  def prepare(self, image) -> np.ndarray:
    return np.asarray(image, np.float32)    # semseg resizes the float image

  def augmentations(self, height: int, width: int) -> list:
    return [round(s * self.protocol.base_size) for s in self.protocol.scales]

  def canvas(self, image: np.ndarray, long_side: int) -> _Canvas:
    height, width = image.shape[:2]
    new_h, new_w = scaled_size(height, width, long_side)
    scaled = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    crop = self.protocol.crop_size
    pad_h, pad_w = max(crop - new_h, 0), max(crop - new_w, 0)
    top, left = pad_h // 2, pad_w // 2
    padded = cv2.copyMakeBorder(scaled, top, pad_h - top, left, pad_w - left,
                                cv2.BORDER_CONSTANT, value=tuple(float(m) for m in self.mean))
    # The mean colour becomes exactly 0, as semseg's padding does after its normalization.
    normalized = transforms.normalize(padded, self.mean, self.std)

    def finish(average):   # the padding cut off, cv2 linear back to the original size
      kept = average[top:top + new_h, left:left + new_w]
      if (new_h, new_w) == (height, width):
        return kept.copy()   # `average` may be a read-only row of a step's result
      return _resize(kept, height, width)

    return _Canvas(normalized, window_origins(*padded.shape[:2], crop), (crop, crop), finish)


class _MmsegRecipe:
  """mmseg's whole / slide modes, plain or with TTA: the image resized as mmcv, never padded;
  the step returns logits, which the canvas averages and `finish` mirrors back, resizes to the
  original size and softmaxes."""

  def __init__(self, protocol: Protocol, mean, std):
    self.protocol, self.mean, self.std = protocol, mean, std
    # mmseg mirrors the whole resized image, whose windows are not the mirrors of the
    # unmirrored image's windows: a mirror is an augmentation of its own, not a step option.
    self.step_options = dict(probabilities=False, flip=False, align_corners=False)

  def prepare(self, image) -> np.ndarray:
    image = np.asarray(image)
    # uint8 stays uint8: mmcv resizes the decoded image, on OpenCV's 8-bit path.
    return image if image.dtype == np.uint8 else image.astype(np.float32)

  def augmentations(self, height: int, width: int) -> list:
    """(resized height, resized width, mirrored) of each augmentation, in mmseg's order."""
    protocol = self.protocol
    if not protocol.mmseg_tta:
      return [(*transforms.mmseg_rescale_size(height, width, protocol.mmseg_scale), False)]
    mirrors = (False, True) if protocol.flip else (False,)
    return [(*mmseg_scale_factor_size(height, width, factor), mirrored)
            for factor in protocol.scales for mirrored in mirrors]

  def canvas(self, image: np.ndarray, augmentation) -> _Canvas:
    height, width = image.shape[:2]
    new_h, new_w, mirrored = augmentation
    if (new_h, new_w) != (height, width):
      image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if mirrored:
      image = image[:, ::-1]
    normalized = transforms.normalize(image, self.mean, self.std)
    if self.protocol.name == 'mmseg_slide':
      origins, window_shape = mmseg_window_origins(new_h, new_w, self.protocol.mmseg_crop,
                                                   self.protocol.mmseg_stride)
    else:
      origins, window_shape = [(0, 0)], (new_h, new_w)

    def finish(logits):   # postprocess_result: mirrored back, resized; then the softmax
      return _softmax(resize_bilinear_host(logits[:, ::-1] if mirrored else logits,
                                           height, width))

    return _Canvas(normalized, origins, window_shape, finish)


def _recipe(protocol: Protocol, mean, std):
  return (_MmsegRecipe if protocol.is_mmseg else _SemsegRecipe)(protocol, mean, std)


class _ImageJob:
  """One image on its way through its augmentations (canvases made one at a time, when the
  previous one's windows are queued); `total` sums their probabilities."""

  def __init__(self, key, image, recipe):
    self.key = key
    self.image = recipe.prepare(image)
    self.recipe = recipe
    self.augmentations = recipe.augmentations(*self.image.shape[:2])
    self.started = 0
    self.finished = 0
    self.total = None

  def has_next(self) -> bool:
    return self.started < len(self.augmentations)

  def next_canvas(self) -> _Canvas:
    canvas = self.recipe.canvas(self.image, self.augmentations[self.started])
    canvas.job = self
    self.started += 1
    if not self.has_next():
      self.image = None     # every canvas holds its own resized copy
    return canvas

  def finish(self, canvas: _Canvas) -> None:
    probabilities = canvas.result()
    if self.total is None:
      self.total = probabilities
    else:
      self.total += probabilities
    self.finished += 1

  @property
  def done(self) -> bool:
    return self.finished == len(self.augmentations)

  def probabilities(self) -> np.ndarray:
    count = len(self.augmentations)
    return self.total if count == 1 else self.total / count


class _WindowQueues:
  """Windows waiting for a step, one first-in-first-out queue per window shape."""

  def __init__(self):
    self.queues = {}        # shape -> deque of (serial number, canvas, window index)
    self.serial = 0

  def put(self, canvas: _Canvas) -> None:
    queue = self.queues.setdefault(canvas.window_shape, collections.deque())
    for index in range(len(canvas.origins)):
      queue.append((self.serial, canvas, index))
      self.serial += 1

  def longest(self) -> int:
    return max((len(queue) for queue in self.queues.values()), default=0)

  def proposal(self) -> np.ndarray:
    """(height, width, count) of the longest queue, ties to the one whose head waited longest;
    zeros when nothing waits."""
    if not self.queues:
      return np.zeros(3, np.int32)
    shape, queue = max(self.queues.items(), key=lambda item: (len(item[1]), -item[1][0][0]))
    return np.array([*shape, len(queue)], np.int32)

  def take(self, shape, count: int) -> list:
    """Up to `count` windows of `shape`, oldest first."""
    queue = self.queues.get(shape)
    if queue is None:
      return []
    taken = [queue.popleft()[1:] for _ in range(min(count, len(queue)))]
    if not queue:
      del self.queues[shape]
    return taken


def choose_shape(proposals: np.ndarray) -> tuple[int, int] | None:
  """The next step's window shape from every process's proposal (rows of (height, width,
  count), in process order): the shape with the most windows proposed, summed over the
  processes that propose it, ties to the lowest process's; None when no process has windows.
  Every process computes it from the same gathered rows, so all pick the same."""
  totals = {}
  for height, width, count in np.asarray(proposals).tolist():
    if count > 0:
      totals[(height, width)] = totals.get((height, width), 0) + count
  if not totals:
    return None
  return max(totals, key=totals.get)   # the first of the largest: the lowest process's


def step_rows(proposals: np.ndarray, shape, local_batch: int, local_devices: int) -> int:
  """Rows per process of a step of `shape`: the smallest local_devices * 2**k (at most
  local_batch) that holds the most windows of `shape` any process proposed. Computed from
  the gathered proposals, so every process picks the same."""
  waiting = max(count for height, width, count in np.asarray(proposals).tolist()
                if (height, width) == tuple(shape))
  rows = local_devices
  while rows < min(waiting, local_batch):
    rows *= 2
  return min(rows, local_batch)


def _gather_proposals(proposal: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return proposal[None]
  return np.asarray(multihost_utils.process_allgather(proposal))


def window_outputs(variables: nnx.State, windows: jax.Array, *, graphdef: nnx.GraphDef,
                   probabilities: bool, flip: bool, align_corners: bool) -> jax.Array:
  """The eval-mode model on (B, h, w, 3) windows: logits or softmaxes at the window size.

  Logits not at the window size are resized to it (bilinear; semseg's
  `net_process` with align_corners=True, mmseg's `predict_by_feat` with
  False). `probabilities` (semseg): the softmax, averaged with the mirrored
  window's (mirrored back) with `flip`, the mirrors going through the model in
  the same batch. Otherwise (mmseg) the float32 logits.
  """
  if flip and not probabilities:
    raise ValueError('flip averages softmaxes: it needs probabilities=True')
  model = nnx.merge(graphdef, variables)
  count = windows.shape[0]
  inputs = jnp.concatenate([windows, windows[:, :, ::-1]]) if flip else windows
  logits = model(inputs).astype(jnp.float32)
  if logits.shape[1:3] != windows.shape[1:3]:
    logits = layers.resize_bilinear(logits, windows.shape[1:3], align_corners=align_corners)
  if not probabilities:
    return logits
  outputs = jax.nn.softmax(logits, axis=-1)
  if flip:
    outputs = (outputs[:count] + outputs[count:, :, ::-1]) / 2
  return outputs


def jit_window_outputs(mesh, *, graphdef: nnx.GraphDef, **options):
  """window_outputs under jit: variables replicated, windows and results split over `data`.
  jit compiles once per window shape."""
  step = functools.partial(window_outputs, graphdef=graphdef, **options)
  return jax.jit(step, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=sharding.batch_sharded(mesh))


class Predictor:
  """A model and a protocol: images in, probabilities at the images' own size out.

  `variables` are the model's (replicated over `mesh`), `graphdef` its
  eval-mode graph. `batch_size` is the global number of windows per step
  (a multiple of the device count).
  """

  def __init__(self, graphdef: nnx.GraphDef, variables: nnx.State, protocol: Protocol, *,
               mean, std, batch_size: int, mesh=None):
    self.mesh = sharding.make_mesh() if mesh is None else mesh
    self.protocol = protocol
    self.mean, self.std = mean, std
    self.local_batch = sharding.local_batch_size(batch_size, self.mesh)
    self._local_devices = len(self.mesh.local_devices)
    self._recipe = _recipe(protocol, mean, std)
    self._variables = variables
    self._step = jit_window_outputs(self.mesh, graphdef=graphdef, **self._recipe.step_options)

  @classmethod
  def from_model(cls, model: nnx.Module, config, *, protocol: Protocol | None = None,
                 batch_size: int | None = None, mesh=None) -> 'Predictor':
    """A Predictor of an eval-mode model (e.g. `checkpoint.load_model(...).model`)."""
    graphdef, variables = nnx.split(model)
    return cls(graphdef, variables, protocol or Protocol.from_config(config),
               mean=config.data.mean, std=config.data.std,
               batch_size=batch_size or config.eval.batch_size, mesh=mesh)

  @classmethod
  def from_workdir(cls, workdir: str, config=None, *, step: int | None = None,
                   **options) -> 'Predictor':
    """A Predictor of checkpoint `step` (default: the latest) of `workdir`, with its config:
    `config`, or else the `config.json` a training run writes there (an imported checkpoint
    has none: pass `configuration.load_config('configs/....py')`). `options`: `from_model`'s."""
    # Imported here: checkpoint imports orbax, which inference's other users do not need.
    from pspnet_jax import checkpoint, configuration  # pylint: disable=import-outside-toplevel
    config = configuration.workdir_config(workdir, config)
    loaded = checkpoint.load_model(config, workdir, step)
    return cls.from_model(loaded.model, config, **options)

  def _run(self, windows: np.ndarray) -> np.ndarray:
    """This process's windows through the sharded step; its rows of the result back."""
    global_windows = sharding.to_global({'image': windows}, self.mesh)['image']
    result = self._step(self._variables, global_windows)
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        result, self.mesh, PartitionSpec(sharding.DATA_AXIS)))

  def probabilities(self, images: Iterable) -> Iterator[tuple[object, np.ndarray]]:
    """(key, image HxWx3 RGB) pairs -> (key, probabilities HxWxC float32), in input order.

    Every process must call this (with its own images, possibly none) and
    consume it to the end: the steps are collective.
    """
    source = iter(images)
    jobs = collections.deque()   # images started and not yet yielded, in input order
    queues = _WindowQueues()
    current = None               # the job whose canvases are being queued
    exhausted = False

    def fill():
      """Queues canvases until one shape has a batch of windows, or the input has run out, or
      `local_batch` images are started and not yet yielded (the memory bound: with a single
      shape, as semseg's protocols have, that bound never binds, so the batches are those of
      reading the windows in order)."""
      nonlocal current, exhausted
      while queues.longest() < self.local_batch:
        if current is not None and current.has_next():
          queues.put(current.next_canvas())
          continue
        if exhausted or len(jobs) >= self.local_batch:
          return
        try:
          key, image = next(source)
        except StopIteration:
          exhausted = True
          return
        current = _ImageJob(key, image, self._recipe)
        jobs.append(current)

    while True:
      fill()
      proposals = _gather_proposals(queues.proposal())
      shape = choose_shape(proposals)
      if shape is None:
        break
      rows = (step_rows(proposals, shape, self.local_batch, self._local_devices)
              if self.protocol.is_mmseg else self.local_batch)
      slots = queues.take(shape, rows)
      windows = np.zeros((rows, *shape, 3), np.float32)
      for row, (canvas, index) in enumerate(slots):
        windows[row] = canvas.window(index)
      results = self._run(windows)
      for row, (canvas, index) in enumerate(slots):
        canvas.add(index, results[row])
        if canvas.pending == 0:
          canvas.job.finish(canvas)
      del slots, results    # whole-image canvases hold rows of the results until finished
      while jobs and jobs[0].done:
        job = jobs.popleft()
        yield job.key, job.probabilities()

  def predict(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One image (HxWx3 RGB, uint8 or float) -> (class map HxW uint8/int32, probabilities)."""
    (_, probabilities), = self.probabilities([(None, image)])
    return class_map(probabilities), probabilities


def class_map(probabilities: np.ndarray) -> np.ndarray:
  """argmax over classes, as the smallest integer type that holds the class count."""
  classes = np.argmax(probabilities, axis=-1)
  return classes.astype(np.uint8 if probabilities.shape[-1] <= 256 else np.int32)

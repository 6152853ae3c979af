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

What is batched: windows, from any number of images and scales, are packed
into fixed-shape batches (`batch_size` windows per process, the last one
padded), so the step compiles once per window shape and every device works on
every step. The host keeps only the images whose windows are in flight: one
scale's canvas per image, never a split-wide store.

With several processes each one feeds its own images; every process runs the
same number of steps (a process that has run out sends padding windows while
any other still has work), so the collectives of the sharded step line up.
"""

import dataclasses
import functools
import math
from typing import Iterable, Iterator

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

PROTOCOLS = ('whole', 'slide')
# OpenCV 5 resizes at most this many channels in one call (OpenCV 4: 512); ADE20K has 150.
_CV_MAX_CHANNELS = 128


@dataclasses.dataclass(frozen=True)
class Protocol:
  name: str                  # 'whole' or 'slide'
  crop_size: int             # window side
  base_size: int             # slide: the long side at scale 1
  scales: tuple[float, ...]  # slide: the long side is round(scale * base_size)
  flip: bool                 # average each window's softmax with its mirror's

  @classmethod
  def from_config(cls, config, name: str | None = None) -> 'Protocol':
    """The config's eval protocol (or `name`'s) with its eval.* settings."""
    evaluation = config.eval
    name = name or evaluation.protocol
    if name not in PROTOCOLS:
      raise ValueError(f'config.eval.protocol={name!r}: must be one of {PROTOCOLS}')
    if name == 'whole':
      return cls('whole', evaluation.crop_size, evaluation.crop_size, (1.0,), evaluation.flip)
    return cls('slide', evaluation.crop_size, evaluation.base_size,
               tuple(float(s) for s in evaluation.scales), evaluation.flip)

  def settings(self) -> dict:
    return dataclasses.asdict(self) | {'scales': list(self.scales)}


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


def _resize(probabilities: np.ndarray, height: int, width: int) -> np.ndarray:
  """cv2 linear resize of an (h, w, C) array, in slices of the channels cv2 can hold."""
  if probabilities.shape[:2] == (height, width):
    return probabilities
  slices = [cv2.resize(probabilities[..., first:first + _CV_MAX_CHANNELS], (width, height),
                       interpolation=cv2.INTER_LINEAR)
            for first in range(0, probabilities.shape[-1], _CV_MAX_CHANNELS)]
  slices = [s[..., None] if s.ndim == 2 else s for s in slices]   # cv2 drops a last axis of 1
  return np.concatenate(slices, axis=-1)


class _ScaleCanvas:
  """One scale of one image: its windows, the probability sums and the window counts."""

  def __init__(self, image: np.ndarray, long_side: int, protocol: Protocol, mean, std):
    height, width = image.shape[:2]
    new_h, new_w = scaled_size(height, width, long_side)
    scaled = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    crop = protocol.crop_size
    pad_h, pad_w = max(crop - new_h, 0), max(crop - new_w, 0)
    self.top, self.left = pad_h // 2, pad_w // 2
    self.size = (new_h, new_w)
    padded = cv2.copyMakeBorder(scaled, self.top, pad_h - self.top, self.left,
                                pad_w - self.left, cv2.BORDER_CONSTANT,
                                value=tuple(float(m) for m in mean))
    # The mean colour becomes exactly 0, as semseg's padding does after its normalization.
    self.image = transforms.normalize(padded, mean, std)
    self.origins = window_origins(*padded.shape[:2], crop)
    self.sums = None
    self.counts = np.zeros(padded.shape[:2], np.float32)
    self.pending = len(self.origins)

  def window(self, index: int, crop: int) -> np.ndarray:
    top, left = self.origins[index]
    return self.image[top:top + crop, left:left + crop]

  def add(self, index: int, probabilities: np.ndarray) -> None:
    top, left = self.origins[index]
    crop = probabilities.shape[0]
    if self.sums is None:
      self.sums = np.zeros(self.counts.shape + probabilities.shape[-1:], np.float32)
    self.sums[top:top + crop, left:left + crop] += probabilities
    self.counts[top:top + crop, left:left + crop] += 1
    self.pending -= 1

  def result(self, height: int, width: int) -> np.ndarray:
    """The averaged probabilities without the padding, resized to (height, width)."""
    # In place: a canvas of a large image at a large scale is hundreds of megabytes.
    self.sums /= self.counts[..., None]
    new_h, new_w = self.size
    return _resize(self.sums[self.top:self.top + new_h, self.left:self.left + new_w],
                   height, width)


class _ImageJob:
  """One image on its way through the scales; `total` sums the scales' probabilities."""

  def __init__(self, key, image: np.ndarray, protocol: Protocol, mean, std):
    self.key = key
    self.image = np.asarray(image, np.float32)
    self.long_sides = [round(s * protocol.base_size) for s in protocol.scales]
    self.protocol, self.mean, self.std = protocol, mean, std
    self.total = None
    self.canvas = None      # the scale whose windows are being handed out; None when all are
    self.scale_index = -1
    self.finished_scales = 0

  def next_canvas(self) -> None:
    """Moves `canvas` to the next scale (None after the last)."""
    self.scale_index += 1
    if self.scale_index == len(self.long_sides):
      self.canvas = None
    else:
      self.canvas = _ScaleCanvas(self.image, self.long_sides[self.scale_index], self.protocol,
                                 self.mean, self.std)

  def finish_scale(self, canvas: _ScaleCanvas) -> None:
    height, width = self.image.shape[:2]
    probabilities = canvas.result(height, width)
    self.total = probabilities if self.total is None else self.total + probabilities
    self.finished_scales += 1

  @property
  def done(self) -> bool:
    return self.finished_scales == len(self.long_sides)

  def probabilities(self) -> np.ndarray:
    return self.total / len(self.long_sides)


def window_probabilities(variables: nnx.State, windows: jax.Array, *, graphdef: nnx.GraphDef,
                         flip: bool) -> jax.Array:
  """Softmax of the eval-mode model on (B, crop, crop, 3) windows, averaged with the mirror's.

  As semseg's `net_process`: logits not at the window size are resized to it
  (bilinear, align_corners) before the softmax; the mirrored windows go
  through the model in the same batch.
  """
  model = nnx.merge(graphdef, variables)
  count = windows.shape[0]
  inputs = jnp.concatenate([windows, windows[:, :, ::-1]]) if flip else windows
  logits = model(inputs).astype(jnp.float32)
  if logits.shape[1:3] != windows.shape[1:3]:
    logits = layers.resize_bilinear(logits, windows.shape[1:3], align_corners=True)
  probabilities = jax.nn.softmax(logits, axis=-1)
  if flip:
    probabilities = (probabilities[:count] + probabilities[count:, :, ::-1]) / 2
  return probabilities


def jit_window_probabilities(mesh, *, graphdef: nnx.GraphDef, flip: bool):
  """window_probabilities under jit: variables replicated, windows and results split over `data`."""
  step = functools.partial(window_probabilities, graphdef=graphdef, flip=flip)
  return jax.jit(step, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=sharding.batch_sharded(mesh))


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


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
    self._variables = variables
    self._step = jit_window_probabilities(self.mesh, graphdef=graphdef, flip=protocol.flip)

  @classmethod
  def from_model(cls, model: nnx.Module, config, *, protocol: Protocol | None = None,
                 batch_size: int | None = None, mesh=None) -> 'Predictor':
    """A Predictor of an eval-mode model (e.g. `checkpoint.load_model(...).model`)."""
    graphdef, variables = nnx.split(model)
    return cls(graphdef, variables, protocol or Protocol.from_config(config),
               mean=config.data.mean, std=config.data.std,
               batch_size=batch_size or config.eval.batch_size, mesh=mesh)

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
    crop = self.protocol.crop_size
    source = iter(images)
    jobs = []          # images started and not yet yielded, in input order
    slots = []         # (job, canvas, window index) of the windows in the batch being filled
    current = None     # the job whose windows are being handed out
    next_window = 0
    exhausted = False

    def fill_batch():
      nonlocal current, next_window, exhausted
      while len(slots) < self.local_batch:
        if current is None or current.canvas is None:
          if exhausted:
            return
          try:
            key, image = next(source)
          except StopIteration:
            exhausted = True
            return
          current = _ImageJob(key, image, self.protocol, self.mean, self.std)
          current.next_canvas()
          jobs.append(current)
          next_window = 0
        canvas = current.canvas
        slots.append((current, canvas, next_window))
        next_window += 1
        if next_window == len(canvas.origins):
          current.next_canvas()
          next_window = 0

    while True:
      fill_batch()
      if not _any_process(bool(slots)):
        break
      windows = np.zeros((self.local_batch, crop, crop, 3), np.float32)
      for row, (_, canvas, index) in enumerate(slots):
        windows[row] = canvas.window(index, crop)
      results = self._run(windows)
      for row, (job, canvas, index) in enumerate(slots):
        canvas.add(index, results[row])
        if canvas.pending == 0:
          job.finish_scale(canvas)
      slots.clear()
      while jobs and jobs[0].done:
        job = jobs.pop(0)
        yield job.key, job.probabilities()

  def predict(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One image (HxWx3 RGB, uint8 or float) -> (class map HxW uint8/int32, probabilities)."""
    (_, probabilities), = self.probabilities([(None, image)])
    return class_map(probabilities), probabilities


def class_map(probabilities: np.ndarray) -> np.ndarray:
  """argmax over classes, as the smallest integer type that holds the class count."""
  classes = np.argmax(probabilities, axis=-1)
  return classes.astype(np.uint8 if probabilities.shape[-1] <= 256 else np.int32)

"""Joint image/label augmentation of semseg (`util/transform.py`), and the evaluation resize.

Each step is a pure function of (image HxWx3, label uint8 HxW, rng,
parameters) returning the new pair, with OpenCV doing the geometry exactly as
the official code does (bilinear image, nearest label, the same rotation
matrix and border values, the same padding split), so augmented crops match
the ones the published models were trained on. The official code draws with
Python's `random`; here every draw comes from the `np.random.Generator` Grain
hands each record, so a crop is a function of (seed, record index) only.

`semseg_chain` runs those steps one after the other on the whole image, as
semseg does. Training uses `semseg_augment` instead: the same draws in the
same order, but rotation, blur, flip and normalization computed only for the
pixels the crop keeps (at scale 2 an ADE20K image is ~6x the crop). Without
rotation its labels equal the chain's, and its images too, bitwise unless
blurred: OpenCV's blur sums a window's last pixels in another order (a
float32 ulp). With rotation OpenCV computes a window's sample coordinates from
another origin than the whole image's: image values move by < 0.01 grey levels
and ~1 label pixel in 10^5 takes its neighbour's class
(tests/test_transforms_window.py).

`config.data.augment.recipe = 'mmseg'` selects mmsegmentation's training chain
instead (RandomResize, RandomCrop with cat_max_ratio, RandomFlip,
PhotoMetricDistortion, normalize, pad), reproduced step by step with the
same draws, ranges and rounding as mmseg/mmcv (checked against mmseg 1.x's
`datasets/transforms/transforms.py`, mmcv's `transforms/processing.py` and
`SegDataPreProcessor`), for comparison with models trained there. semseg
works on float32 images from the start; mmseg keeps the decoded uint8 until
it normalizes, so its resize takes OpenCV's 8-bit fixed-point path. Both
recipes take the decoded uint8 image and end in `place_in_crop`: the crop
normalized (data.batch_dtype float32) or as uint8 RGB that the training step
normalizes on the devices (uint8).
"""

import cv2
import numpy as np


def rand_scale(image, label, rng: np.random.Generator, scale_min: float, scale_max: float):
  """RandScale: both sides times one factor uniform in [scale_min, scale_max]."""
  scale = rng.uniform(scale_min, scale_max)
  image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
  label = cv2.resize(label, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
  return image, label


def rand_rotate(image, label, rng: np.random.Generator, degrees: float, prob: float, mean,
                ignore_label: int):
  """RandRotate: with probability `prob`, a rotation about the centre by [-degrees, degrees]."""
  if rng.random() >= prob:
    return image, label
  angle = rng.uniform(-degrees, degrees)
  height, width = label.shape
  matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1)
  image = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(map(float, mean)))
  label = cv2.warpAffine(label, matrix, (width, height), flags=cv2.INTER_NEAREST,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=ignore_label)
  return image, label


def gaussian_blur(image, label, rng: np.random.Generator, prob: float):
  """RandomGaussianBlur: with probability `prob`, OpenCV's 5x5 Gaussian with sigma 0 on the image.

  Sigma 0 with 5 taps makes OpenCV use its fixed binomial kernel [1, 4, 6, 4, 1] / 16
  per axis, not a sampled Gaussian.
  """
  if rng.random() < prob:
    image = cv2.GaussianBlur(image, (5, 5), 0)
  return image, label


def hflip(image, label, rng: np.random.Generator, prob: float):
  """RandomHorizontalFlip with probability `prob`."""
  if rng.random() < prob:
    image, label = cv2.flip(image, 1), cv2.flip(label, 1)
  return image, label


def _as_pair(size) -> tuple[int, int]:
  """An int side -> (side, side); an (H, W) pair as it is."""
  return (size, size) if isinstance(size, int) else tuple(size)


def crop_shape(data) -> tuple[int, int]:
  """(H, W) of the training crop: data.crop_size square, or crop_size x data.crop_width."""
  return data.crop_size, data.crop_width or data.crop_size


def _pad_to(image, label, height, width, mean, ignore_label):
  """Pads (half, rest) on each axis up to height x width: image with the mean, label with ignore."""
  pad_h, pad_w = max(height - label.shape[0], 0), max(width - label.shape[1], 0)
  if pad_h == 0 and pad_w == 0:
    return image, label
  border = (pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
  image = cv2.copyMakeBorder(image, *border, cv2.BORDER_CONSTANT, value=tuple(map(float, mean)))
  label = cv2.copyMakeBorder(label, *border, cv2.BORDER_CONSTANT, value=ignore_label)
  return image, label


def rand_crop(image, label, rng: np.random.Generator, crop_size: int, mean, ignore_label: int):
  """Crop(crop_type='rand'): pad up to crop_size (mean / ignore), then a uniform random window."""
  image, label = _pad_to(image, label, crop_size, crop_size, mean, ignore_label)
  height, width = label.shape
  top = int(rng.integers(0, height - crop_size + 1))
  left = int(rng.integers(0, width - crop_size + 1))
  return (image[top:top + crop_size, left:left + crop_size],
          label[top:top + crop_size, left:left + crop_size])


def normalize(image, mean, std):
  """(image - mean) / std per RGB channel, float32.

  Computed on rows of width x 3 values against the tiled mean and std: numpy
  broadcasting a 3-vector loops 3 values at a time, 8x slower.
  """
  image = np.ascontiguousarray(image, dtype=np.float32)
  height, width = image.shape[:2]
  rows = np.subtract(image.reshape(height, width * 3), np.tile(np.asarray(mean, np.float32), width))
  rows /= np.tile(np.asarray(std, np.float32), width)
  return rows.reshape(image.shape)


def eval_resize(image, label, crop, mean, ignore_label: int):
  """The periodic evaluation's geometry: resized to fit the crop (a side, or (H, W)) keeping
  the aspect ratio (a square crop: the long side to its side), then centred padding to it.

  The resize rounds the other side like semseg's `test.py` (Python's round);
  the label is resized with nearest neighbour, so metrics are computed at the
  network's resolution.
  """
  height, width = label.shape
  crop_h, crop_w = _as_pair(crop)
  if height * crop_w > width * crop_h:  # the height binds
    new_h, new_w = crop_h, round(crop_h / height * width)
  else:
    new_h, new_w = round(crop_w / width * height), crop_w
  new_h, new_w = max(new_h, 1), max(new_w, 1)
  image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
  label = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
  return _pad_to(image, label, crop_h, crop_w, mean, ignore_label)


def mmseg_rescale_size(height: int, width: int, scale) -> tuple[int, int]:
  """mmcv's keep-ratio rescale: the largest size that fits inside the long x short box `scale`.

  The factor is min(long edge / image long side, short edge / image short side),
  and each side rounds half up, as `mmcv.rescale_size`. Returns (height, width).
  """
  long_edge, short_edge = max(scale), min(scale)
  factor = min(long_edge / max(height, width), short_edge / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def mmseg_random_resize(image, label, rng: np.random.Generator, base_scale, ratio_min: float,
                        ratio_max: float):
  """RandomResize(keep_ratio=True): base_scale times a ratio uniform in [ratio_min, ratio_max].

  The scaled box truncates to integers before the rescale, as mmcv's
  `RandomResize`; the image is resized bilinearly, the label with nearest neighbour.
  """
  ratio = rng.uniform(ratio_min, ratio_max)
  scale = (int(base_scale[0] * ratio), int(base_scale[1] * ratio))
  new_h, new_w = mmseg_rescale_size(*label.shape, scale)
  image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
  label = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
  return image, label


def mmseg_random_crop(image, label, rng: np.random.Generator, crop_size,
                      cat_max_ratio: float, ignore_label: int, max_tries: int = 10):
  """RandomCrop: a uniform crop_size (an int, or (H, W)) window (smaller where the image is),
  no padding.

  With cat_max_ratio < 1, up to `max_tries` windows are checked and the first
  that holds at least two classes, none above cat_max_ratio of the valid
  (non-ignore) pixels, is taken; when all fail, the window drawn after the last
  check is taken unchecked, exactly as mmseg does.
  """
  height, width = label.shape
  crop_h, crop_w = _as_pair(crop_size)

  def window():
    top = int(rng.integers(0, max(height - crop_h, 0) + 1))
    left = int(rng.integers(0, max(width - crop_w, 0) + 1))
    return slice(top, top + crop_h), slice(left, left + crop_w)

  rows, cols = window()
  if cat_max_ratio < 1.0:
    for _ in range(max_tries):
      classes, counts = np.unique(label[rows, cols], return_counts=True)
      counts = counts[classes != ignore_label]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      rows, cols = window()
  return image[rows, cols], label[rows, cols]


def _scale_clipped(values, alpha=1.0, beta=0.0):
  """mmseg's `convert`: values * alpha + beta, clipped to [0, 255] and truncated to uint8."""
  return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image, label, rng: np.random.Generator, brightness_delta: float,
                           contrast_range, saturation_range, hue_delta: int):
  """PhotoMetricDistortion: brightness, contrast, saturation, hue, each with probability 0.5.

  Works on uint8 like mmseg, whose images are uint8 when the step runs (each
  step truncates back to uint8). Contrast comes right after brightness or
  last, a coin flip per image; saturation and hue go through OpenCV's 8-bit
  HSV (hue in [0, 180)), the hue shift an integer in [-hue_delta, hue_delta).
  HSV of the RGB image equals mmseg's HSV of the BGR one.
  """
  if image.dtype != np.uint8:
    raise TypeError(f'photometric_distortion works on uint8 images, as mmseg; got {image.dtype}')

  def contrast(image):
    if rng.integers(2):
      image = _scale_clipped(image, alpha=rng.uniform(*contrast_range))
    return image

  if rng.integers(2):
    image = _scale_clipped(image, beta=rng.uniform(-brightness_delta, brightness_delta))
  contrast_first = rng.integers(2)
  if contrast_first:
    image = contrast(image)
  if rng.integers(2):
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = _scale_clipped(hsv[..., 1], alpha=rng.uniform(*saturation_range))
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.integers(2):
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    shift = int(rng.integers(-hue_delta, hue_delta))
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if not contrast_first:
    image = contrast(image)
  return image.astype(np.float32), label


BATCH_DTYPES = ('uint8', 'float32')


def to_uint8(image):
  """Augmented RGB values (float, in [0, 255]) -> the nearest uint8 levels."""
  return np.rint(np.clip(image, 0, 255)).astype(np.uint8)


def place_in_crop(image, label, rows: slice, cols: slice, data):
  """The training crop: `image` (augmented RGB) and `label` at [rows, cols] of a `crop_shape`
  crop padded with the mean colour and data.ignore_label.

  data.batch_dtype 'float32': the image normalized here, the padding exactly 0
  (as semseg's and mmseg's padding after their normalization). 'uint8': RGB
  rounded to uint8 for normalization on the devices (`train.device_images`),
  a quarter of the bytes to copy and to send; the padding is the mean rounded.
  The rounding moves a value by at most half a grey level (0.0087 of the
  smallest std once normalized); mmseg's own chain rounds to uint8 after every
  step, so for its recipe only the padding moves.
  """
  crop = crop_shape(data)
  out_label = np.full(crop, data.ignore_label, np.uint8)
  out_label[rows, cols] = label
  if data.batch_dtype == 'uint8':
    out_image = np.empty((*crop, 3), np.uint8)
    out_image[...] = to_uint8(np.asarray(data.mean))
    out_image[rows, cols] = to_uint8(image)
  else:
    out_image = np.zeros((*crop, 3), np.float32)
    out_image[rows, cols] = normalize(image, data.mean, data.std)
  return out_image, out_label


def semseg_chain(image, label, rng: np.random.Generator, config):
  """semseg's training chain, step by step on the whole image: scale, rotate, blur, flip, crop,
  normalize (config.data.*). The definition `semseg_augment` is held to, and the
  benchmark's "semseg way"."""
  data, augment = config.data, config.data.augment
  image = np.asarray(image, np.float32)  # semseg's SemData: np.float32 right after reading
  image, label = rand_scale(image, label, rng, augment.scale_min, augment.scale_max)
  image, label = rand_rotate(image, label, rng, augment.rotate_degrees, augment.rotate_prob,
                             data.mean, data.ignore_label)
  image, label = gaussian_blur(image, label, rng, augment.blur_prob)
  image, label = hflip(image, label, rng, augment.flip_prob)
  image, label = rand_crop(image, label, rng, data.crop_size, data.mean, data.ignore_label)
  return normalize(image, data.mean, data.std), label


# Half the 5x5 blur kernel: the context a blurred pixel reads on each side.
_BLUR_REACH = 2


def semseg_augment(image, label, rng: np.random.Generator, config):
  """`semseg_chain`'s result, with every step after the scale done only where the crop lands.

  All draws after the scale depend only on the scaled size, so they are made
  first, in the chain's order. The crop window is then mapped back through the
  padding and the flip to a window of the rotated image; only that window
  (plus the blur's reach, where it is inside the image) is rotated, by
  warping with the inverse rotation shifted to the window's corner. Near the
  image border the blur sees the same reflected pixels as on the whole image,
  because the window is clipped exactly there.
  """
  data, augment = config.data, config.data.augment
  crop = data.crop_size
  image = np.asarray(image, np.float32)
  image, label = rand_scale(image, label, rng, augment.scale_min, augment.scale_max)
  height, width = label.shape
  inverse_rotation = None
  if rng.random() < augment.rotate_prob:
    angle = rng.uniform(-augment.rotate_degrees, augment.rotate_degrees)
    rotation = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1)
    inverse_rotation = cv2.invertAffineTransform(rotation)
  blur = rng.random() < augment.blur_prob
  flip = rng.random() < augment.flip_prob
  # rand_crop's window, moved from the padded image (padding split half and
  # rest) to the flipped image: it may start before 0 and end past the image.
  top = int(rng.integers(0, max(height, crop) - crop + 1)) - max(crop - height, 0) // 2
  left = int(rng.integers(0, max(width, crop) - crop + 1)) - max(crop - width, 0) // 2
  row_start, row_stop = max(top, 0), min(top + crop, height)
  flipped_start, flipped_stop = max(left, 0), min(left + crop, width)
  col_start, col_stop = ((width - flipped_stop, width - flipped_start) if flip
                         else (flipped_start, flipped_stop))
  reach = _BLUR_REACH if blur else 0
  rows = slice(max(row_start - reach, 0), min(row_stop + reach, height))
  cols = slice(max(col_start - reach, 0), min(col_stop + reach, width))
  if inverse_rotation is None:
    image, label = image[rows, cols], label[rows, cols]
  else:
    shifted = inverse_rotation.copy()
    shifted[:, 2] += inverse_rotation[:, :2] @ (cols.start, rows.start)
    size = (cols.stop - cols.start, rows.stop - rows.start)
    image = cv2.warpAffine(image, shifted, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(map(float, data.mean)))
    label = cv2.warpAffine(label, shifted, size, flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=data.ignore_label)
  if blur:
    image = cv2.GaussianBlur(image, (5, 5), 0)
  keep = (slice(row_start - rows.start, row_stop - rows.start),
          slice(col_start - cols.start, col_stop - cols.start))
  image, label = image[keep], label[keep]
  if flip:
    image, label = cv2.flip(image, 1), cv2.flip(label, 1)
  return place_in_crop(image, label, slice(row_start - top, row_stop - top),
                       slice(flipped_start - left, flipped_stop - left), data)


def _mmseg_augment(image, label, rng: np.random.Generator, config):
  """mmseg's training chain on the uint8 image: resize, crop, flip, photometric distortion,
  pad (and normalize, `place_in_crop`)."""
  data, augment = config.data, config.data.augment
  if image.dtype != np.uint8:
    raise TypeError(f'the mmseg recipe works on the decoded uint8 image, got {image.dtype}')
  image, label = mmseg_random_resize(image, label, rng, augment.mmseg_base_scale,
                                     augment.mmseg_ratio_min, augment.mmseg_ratio_max)
  image, label = mmseg_random_crop(image, label, rng, crop_shape(data), augment.cat_max_ratio,
                                   data.ignore_label)
  image, label = hflip(image, label, rng, augment.flip_prob)
  image, label = photometric_distortion(
      image, label, rng, augment.brightness_delta,
      (augment.contrast_min, augment.contrast_max),
      (augment.saturation_min, augment.saturation_max), augment.hue_delta)
  # mmseg pads bottom and right.
  height, width = label.shape
  return place_in_crop(image, label, slice(0, height), slice(0, width), data)


RECIPES = {'semseg': semseg_augment, 'mmseg': _mmseg_augment}


def train_augment(image, label, rng: np.random.Generator, config):
  """The augmentation config.data.augment.recipe names: decoded uint8 image, uint8 label ->
  crop in data.batch_dtype (normalized float32, or uint8 RGB; `place_in_crop`), uint8 label."""
  recipe = config.data.augment.recipe
  if recipe not in RECIPES:
    raise ValueError(f'config.data.augment.recipe must be one of {sorted(RECIPES)}, '
                     f'got {recipe!r}')
  return RECIPES[recipe](image, label, rng, config)

"""Joint image/label augmentation of semseg (`util/transform.py`), and the evaluation resize.

Each step is a pure function of (image float32 HxWx3, label uint8 HxW, rng,
parameters) returning the new pair, with OpenCV doing the geometry exactly as
the official code does (bilinear image, nearest label, the same rotation
matrix and border values, the same padding split), so augmented crops match
the ones the published models were trained on. The official code draws with
Python's `random`; here every draw comes from the `np.random.Generator` Grain
hands each record, so a crop is a function of (seed, record index) only.
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
  """(image - mean) / std per RGB channel, float32."""
  return ((image - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def eval_resize(image, label, crop_size: int, mean, ignore_label: int):
  """The periodic evaluation's geometry: long side to crop_size, then centred padding to the crop.

  The resize rounds the short side like semseg's `test.py` (Python's round);
  the label is resized with nearest neighbour, so metrics are computed at the
  network's resolution.
  """
  height, width = label.shape
  if height > width:
    new_h, new_w = crop_size, round(crop_size / height * width)
  else:
    new_h, new_w = round(crop_size / width * height), crop_size
  new_h, new_w = max(new_h, 1), max(new_w, 1)
  image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
  label = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
  return _pad_to(image, label, crop_size, crop_size, mean, ignore_label)


def train_augment(image, label, rng: np.random.Generator, config):
  """semseg's training chain: scale, rotate, blur, flip, crop, normalize (config.data.*)."""
  data, augment = config.data, config.data.augment
  image, label = rand_scale(image, label, rng, augment.scale_min, augment.scale_max)
  image, label = rand_rotate(image, label, rng, augment.rotate_degrees, augment.rotate_prob,
                             data.mean, data.ignore_label)
  image, label = gaussian_blur(image, label, rng, augment.blur_prob)
  image, label = hflip(image, label, rng, augment.flip_prob)
  image, label = rand_crop(image, label, rng, data.crop_size, data.mean, data.ignore_label)
  return normalize(image, data.mean, data.std), label

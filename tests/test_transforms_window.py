"""The training augmentation computed on the crop window only equals semseg's whole-image chain.

`transforms.semseg_chain` (scale, rotate, blur, flip, pad, crop, normalize, each
step on the whole image, unit-tested step by step in test_data.py) is the
reference; `transforms.semseg_augment` is what training runs. Images are decoded-like
uint8 photo content with a colour gradient, labels are blocks with scattered
ignore pixels, on sizes smaller than, straddling and larger than the crop,
with each random step forced on and off.
"""

import itertools

import cv2
import numpy as np
import pytest

from configs import default
from pspnet_jax.data import labels, transforms

CROP = 65
# Rotated windows sample OpenCV's float coordinates from another origin than
# the whole image does (measured: < 0.004 grey levels, ~1 label pixel in 10^5).
ROTATED_IMAGE_TOLERANCE = 0.05 / 57.0  # 0.05 grey levels, in normalized units
ROTATED_LABEL_MISMATCH = 1e-3


def photo_pair(height, width, seed):
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
  image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
  image += np.linspace(0, 40, width, dtype=np.float32)[None, :, None]
  blocks = rng.integers(0, 20, (height // 6 + 1, width // 6 + 1), dtype=np.uint8)
  label = cv2.resize(blocks, (width, height), interpolation=cv2.INTER_NEAREST)
  label[rng.random((height, width)) < 0.02] = labels.IGNORE_LABEL
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def window_config(rotate, blur, flip, scale=(0.5, 2.0)):
  config = default.get_config()
  config.data.crop_size = CROP
  augment = config.data.augment
  augment.rotate_prob, augment.blur_prob, augment.flip_prob = float(rotate), float(blur), float(flip)
  augment.scale_min, augment.scale_max = scale
  return config


def both(image, label, config, seed):
  """Both paths from generators of the same seed; also checks they consumed the same draws."""
  chain_rng, window_rng = np.random.default_rng(seed), np.random.default_rng(seed)
  expected = transforms.semseg_chain(image.copy(), label.copy(), chain_rng, config)
  actual = transforms.semseg_augment(image.copy(), label.copy(), window_rng, config)
  assert chain_rng.random() == window_rng.random(), 'the two paths drew differently'
  for got, want in zip(actual, expected):
    assert got.shape == want.shape and got.dtype == want.dtype
  return actual, expected


SIZES = [(20, 30), (40, 90), (70, 60), (130, 170), (300, 41)]


@pytest.mark.parametrize('blur,flip', list(itertools.product([0, 1], repeat=2)))
def test_without_rotation_the_window_is_the_chain(blur, flip):
  config = window_config(rotate=0, blur=blur, flip=flip)
  for size_index, (height, width) in enumerate(SIZES):
    image, label = photo_pair(height, width, seed=size_index)
    for seed in range(8):
      (image_out, label_out), (image_ref, label_ref) = both(image, label, config, seed)
      np.testing.assert_array_equal(label_out, label_ref)
      if blur:
        # OpenCV's blur sums a row's last few pixels in another order (its
        # vector loop's tail falls elsewhere in a window): a float32 ulp or two.
        np.testing.assert_allclose(image_out, image_ref, rtol=2e-6, atol=1e-6)
      else:
        np.testing.assert_array_equal(image_out, image_ref)


@pytest.mark.parametrize('blur,flip', list(itertools.product([0, 1], repeat=2)))
def test_rotated_windows_match_the_chain_to_opencv_rounding(blur, flip):
  config = window_config(rotate=1, blur=blur, flip=flip)
  mismatched = total = 0
  for size_index, (height, width) in enumerate(SIZES):
    image, label = photo_pair(height, width, seed=10 + size_index)
    for seed in range(8):
      (image_out, label_out), (image_ref, label_ref) = both(image, label, config, seed)
      np.testing.assert_allclose(image_out, image_ref, rtol=0, atol=ROTATED_IMAGE_TOLERANCE)
      mismatched += int((label_out != label_ref).sum())
      total += label_ref.size
      # Wherever they differ, the label is one of the reference's 3x3 neighbours.
      padded = np.pad(label_ref, 1, mode='edge')
      for row, col in zip(*np.nonzero(label_out != label_ref)):
        assert label_out[row, col] in padded[row:row + 3, col:col + 3]
  assert mismatched / total <= ROTATED_LABEL_MISMATCH


def test_the_default_recipe_at_ade20k_sizes():
  """The configured probabilities and scale range, a 512x683 image, a 473 crop."""
  config = default.get_config()
  config.data.crop_size = 473
  image, label = photo_pair(512, 683, seed=3)
  for seed in range(6):
    (image_out, label_out), (image_ref, label_ref) = both(image, label, config, seed)
    np.testing.assert_allclose(image_out, image_ref, rtol=0, atol=ROTATED_IMAGE_TOLERANCE)
    assert (label_out != label_ref).mean() <= ROTATED_LABEL_MISMATCH


def test_train_augment_runs_the_window_path_for_semseg():
  assert transforms.RECIPES['semseg'] is transforms.semseg_augment

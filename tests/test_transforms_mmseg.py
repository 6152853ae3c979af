"""mmsegmentation's training recipe (`config.data.augment.recipe = 'mmseg'`) step by step.

Images are uint8, as decoded, and encode their labels (channel 0 = 10 * class),
so any misalignment of image and label shows; sizes are checked against mmcv's rescale formula
computed here independently.
"""

import cv2
import numpy as np
import pytest

from configs import default
from fake_datasets import block_label
from pspnet_jax.data import labels, transforms

IGNORE = labels.IGNORE_LABEL
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def coded_pair(height, width, classes=(0, 3, 5), block=4, seed=0):
  """A label of random blocks and an image whose channel 0 is 10 * the pixel's class."""
  label = block_label(height, width, classes, block, seed)
  image = np.stack([label * 10, np.full(label.shape, 50), np.full(label.shape, 200)], -1)
  return image.astype(np.uint8), label


def assert_aligned(image, label):
  valid = label != IGNORE
  np.testing.assert_array_equal(image[..., 0][valid], label[valid] * 10.0)


def mmseg_config(crop_size=33, recipe='mmseg'):
  config = default.get_config()
  config.data.crop_size = crop_size
  config.data.mean, config.data.std = MEAN, STD
  config.data.augment.recipe = recipe
  config.data.augment.mmseg_base_scale = (80, 40)
  return config


@pytest.mark.parametrize('height,width,scale', [
    (512, 683, (2048, 512)), (683, 512, (2048, 512)), (375, 500, (1024, 256)),
    (1024, 2048, (2048, 1024)), (100, 1000, (2048, 512)), (45, 50, (57, 28))])
def test_rescale_size_is_mmcvs(height, width, scale):
  # mmcv.rescale_size: factor = min(long / max(h, w), short / min(h, w)), sides int(x + 0.5).
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  expected = (int(height * factor + 0.5), int(width * factor + 0.5))
  assert transforms.mmseg_rescale_size(height, width, scale) == expected
  new_h, new_w = expected
  assert max(new_h, new_w) <= max(scale) + 0.5 and min(new_h, new_w) <= min(scale) + 0.5


def test_rescale_size_hand_computed():
  # An ADE-like 512x683 image under (2048, 512): the short side binds, factor 1.
  assert transforms.mmseg_rescale_size(512, 683, (2048, 512)) == (512, 683)
  # A 100x1000 strip: the long side binds, factor 2.048 -> 204.8 -> 205.
  assert transforms.mmseg_rescale_size(100, 1000, (2048, 512)) == (205, 2048)


def test_random_resize_uses_the_truncated_scaled_box():
  image, label = coded_pair(45, 50)
  for seed in range(5):
    ratio = np.random.default_rng(seed).uniform(0.5, 2.0)
    box = (int(80 * ratio), int(40 * ratio))
    resized, resized_label = transforms.mmseg_random_resize(
        image, label, np.random.default_rng(seed), (80, 40), 0.5, 2.0)
    expected = transforms.mmseg_rescale_size(45, 50, box)
    assert resized_label.shape == expected and resized.shape == expected + (3,)
    assert set(np.unique(resized_label)) <= set(np.unique(label))


def test_random_crop_keeps_alignment_and_size():
  image, label = coded_pair(45, 50)
  for seed in range(10):
    crop, crop_label = transforms.mmseg_random_crop(image, label, np.random.default_rng(seed), 33,
                                                    0.75, IGNORE)
    assert crop.shape == (33, 33, 3) and crop_label.shape == (33, 33)
    assert_aligned(crop, crop_label)
  # Smaller than the crop: mmseg's crop leaves it as it is (padding comes last).
  small, small_label = transforms.mmseg_random_crop(*coded_pair(20, 40), np.random.default_rng(0),
                                                    33, 0.75, IGNORE)
  assert small_label.shape == (20, 33)


def dominated_label():
  """80x80: class 1 with a 35x35 class-2 corner block and a 6-column band of ignore.

  A random 40x40 window holds at least 25% class 2 only when it reaches well
  into the corner, about one draw in four, so most unchecked crops break the
  75% rule while ten checked tries nearly always find a window that keeps it.
  """
  label = np.ones((80, 80), np.uint8)
  label[45:, 45:] = 2
  label[:, :6] = IGNORE
  image = np.stack([label * 10] * 3, -1).astype(np.uint8)
  return image, label


def max_share(label):
  classes, counts = np.unique(label[label != IGNORE], return_counts=True)
  return counts.max() / counts.sum() if len(classes) > 1 else 1.0


def test_cat_max_ratio_holds_when_achievable():
  image, label = dominated_label()
  unchecked = [max_share(transforms.mmseg_random_crop(image, label, np.random.default_rng(seed),
                                                      40, 1.0, IGNORE)[1]) for seed in range(100)]
  assert np.mean(np.array(unchecked) >= 0.75) > 0.6
  checked = [max_share(transforms.mmseg_random_crop(image, label, np.random.default_rng(seed),
                                                    40, 0.75, IGNORE)[1]) for seed in range(100)]
  assert np.mean(np.array(checked) < 0.75) > 0.85


def test_cat_max_ratio_ignores_the_ignore_label():
  # Left half ignore, right half two classes 50/50: every window passes on the first try,
  # so the crop is the very first window drawn.
  label = np.full((40, 40), IGNORE, np.uint8)
  label[:, 20:] = 1
  label[20:, 20:] = 2
  image = np.stack([label * 10] * 3, -1).astype(np.uint8)
  crop_label = transforms.mmseg_random_crop(image, label, np.random.default_rng(3), 40, 0.75,
                                            IGNORE)[1]
  np.testing.assert_array_equal(crop_label, label)


def test_photometric_distortion_touches_only_the_image_and_stays_in_range():
  rng_image = np.random.default_rng(0)
  image = rng_image.integers(0, 256, (30, 30, 3)).astype(np.uint8)
  label = rng_image.integers(0, 6, (30, 30)).astype(np.uint8)
  changed = 0
  for seed in range(20):
    out, out_label = transforms.photometric_distortion(
        image, label.copy(), np.random.default_rng(seed), 32.0, (0.5, 1.5), (0.5, 1.5), 18)
    np.testing.assert_array_equal(out_label, label)
    assert out.shape == image.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255 and (out == np.round(out)).all()
    changed += not np.array_equal(out, image)
  assert changed > 10


def test_photometric_distortion_brightness_alone():
  class Draws:
    """A generator whose coin flips are scripted: brightness on, contrast first, rest off."""

    def __init__(self):
      self.flips = iter([1, 1, 0, 0, 0])

    def integers(self, *_):
      return next(self.flips)

    def uniform(self, low, high):
      return 20.0 if (low, high) == (-32.0, 32.0) else 1.0

  image = np.array([[[0, 100, 250]]], np.uint8)
  out, _ = transforms.photometric_distortion(image, np.zeros((1, 1), np.uint8), Draws(), 32.0,
                                             (0.5, 1.5), (0.5, 1.5), 18)
  np.testing.assert_array_equal(out, [[[20, 120, 255]]])


def pad_bottom_right(image, label, config):
  """mmseg's Pad to the crop, bottom and right (`transforms.place_in_crop` at the corner)."""
  return transforms.place_in_crop(image, label, slice(0, label.shape[0]),
                                  slice(0, label.shape[1]), config.data)


def test_padding_is_the_mean_and_ignore_in_either_batch_dtype():
  image, label = coded_pair(20, 30)
  config = mmseg_config()
  padded, padded_label = pad_bottom_right(image, label, config)
  assert padded.shape == (33, 33, 3) and padded_label.shape == (33, 33)
  assert padded.dtype == np.float32
  np.testing.assert_array_equal(padded[:20, :30], transforms.normalize(image, MEAN, STD))
  np.testing.assert_array_equal(padded_label[:20, :30], label)
  # After mmseg's normalization its zero padding is the mean colour.
  assert (padded[20:] == 0).all() and (padded[:, 30:] == 0).all()
  assert (padded_label[20:] == IGNORE).all() and (padded_label[:, 30:] == IGNORE).all()
  config.data.batch_dtype = 'uint8'
  padded, padded_label = pad_bottom_right(image, label, config)
  assert padded.dtype == np.uint8
  np.testing.assert_array_equal(padded[:20, :30], image)
  assert (padded[20:] == (124, 116, 104)).all() and (padded[:, 30:] == (124, 116, 104)).all()
  assert (padded_label[20:] == IGNORE).all() and (padded_label[:, 30:] == IGNORE).all()


def test_mmseg_recipe_end_to_end():
  config = mmseg_config()
  image, label = coded_pair(45, 50)
  for seed in range(10):
    out, out_label = transforms.train_augment(image, label, np.random.default_rng(seed), config)
    again, again_label = transforms.train_augment(image, label, np.random.default_rng(seed),
                                                  config)
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(out_label, again_label)
    assert out.shape == (33, 33, 3) and out.dtype == np.float32 and out_label.shape == (33, 33)
    # Labels never gain classes; padding is ignore with a zero (normalized mean) image.
    assert set(np.unique(out_label)) <= set(np.unique(label)) | {IGNORE}
    assert (out[out_label == IGNORE] == 0).all()


def test_mmseg_geometry_keeps_image_and_label_aligned():
  # The chain without its photometric step, which is per pixel and checked above: the
  # image's channel 0 still tells each pixel's class wherever resizing did not blend.
  image, label = coded_pair(45, 50, block=8)
  for seed in range(10):
    rng = np.random.default_rng(seed)
    out, out_label = transforms.mmseg_random_resize(image, label, rng, (80, 40), 0.5, 2.0)
    out, out_label = transforms.mmseg_random_crop(out, out_label, rng, 33, 0.75, IGNORE)
    out, out_label = transforms.hflip(out, out_label, rng, 0.5)
    config = mmseg_config()
    config.data.batch_dtype = 'uint8'
    out, out_label = pad_bottom_right(out, out_label, config)
    valid = out_label != IGNORE
    exact = valid & (np.abs(out[..., 0] - out_label * 10.0) < 0.5)
    # Bilinear blending touches only a border of each 8-pixel block.
    assert exact.sum() > 0.6 * valid.sum()
    assert (np.abs(out[..., 0][valid] - out_label[valid] * 10.0) <= 50.0).all()


def test_recipe_dispatch():
  image, label = coded_pair(45, 50)
  assert default.get_config().data.augment.recipe == 'semseg'
  config = mmseg_config(recipe='semseg')
  augment = config.data.augment
  rng = np.random.default_rng(4)
  # semseg works in float32 from the start (test_transforms_window.py holds
  # semseg_augment to this chain).
  pair = transforms.rand_scale(image.astype(np.float32), label, rng, augment.scale_min,
                               augment.scale_max)
  pair = transforms.rand_rotate(*pair, rng, augment.rotate_degrees, augment.rotate_prob, MEAN,
                                IGNORE)
  pair = transforms.gaussian_blur(*pair, rng, augment.blur_prob)
  pair = transforms.hflip(*pair, rng, augment.flip_prob)
  pair = transforms.rand_crop(*pair, rng, 33, MEAN, IGNORE)
  chain = transforms.semseg_chain(image, label, np.random.default_rng(4), config)
  np.testing.assert_array_equal(chain[0], transforms.normalize(pair[0], MEAN, STD))
  np.testing.assert_array_equal(chain[1], pair[1])
  semseg = transforms.train_augment(image, label, np.random.default_rng(4), config)
  window = transforms.semseg_augment(image, label, np.random.default_rng(4), config)
  np.testing.assert_array_equal(semseg[0], window[0])
  np.testing.assert_array_equal(semseg[1], window[1])

  config = mmseg_config()
  rng = np.random.default_rng(4)
  pair = transforms.mmseg_random_resize(image, label, rng, (80, 40), 0.5, 2.0)
  pair = transforms.mmseg_random_crop(*pair, rng, 33, 0.75, IGNORE)
  pair = transforms.hflip(*pair, rng, 0.5)
  pair = transforms.photometric_distortion(*pair, rng, 32.0, (0.5, 1.5), (0.5, 1.5), 18)
  pair = pad_bottom_right(*pair, config)
  mmseg = transforms.train_augment(image, label, np.random.default_rng(4), config)
  np.testing.assert_array_equal(mmseg[0], pair[0])
  np.testing.assert_array_equal(mmseg[1], pair[1])


def test_mmseg_resizes_the_uint8_image_like_mmcv():
  """mmcv resizes the decoded uint8 image: OpenCV's 8-bit fixed-point path, which a float32
  resize rounded afterwards misses by a grey level on ~10% of pixels."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (45, 50, 3)).astype(np.uint8)
  label = np.zeros((45, 50), np.uint8)
  resized, _ = transforms.mmseg_random_resize(image, label, np.random.default_rng(1), (80, 40),
                                              0.5, 2.0)
  new_h, new_w = resized.shape[:2]
  np.testing.assert_array_equal(
      resized, cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR))
  with pytest.raises(TypeError, match='uint8'):
    transforms.train_augment(image.astype(np.float32), label, rng, mmseg_config())


def test_bad_recipe_is_rejected():
  image, label = coded_pair(45, 50)
  with pytest.raises(ValueError, match=r'config\.data\.augment\.recipe.*detectron'):
    transforms.train_augment(image, label, np.random.default_rng(0),
                             mmseg_config(recipe='detectron'))


def test_rectangular_crops_of_the_mmseg_recipe():
  """data.crop_width gives crop_size x crop_width windows (mmseg's Cityscapes 512x1024), padded
  bottom and right where the image is smaller, the image still aligned with its label."""
  config = default.get_config()
  config.data.augment.recipe = 'mmseg'
  config.data.crop_size, config.data.crop_width = 40, 72
  config.data.batch_dtype = 'uint8'
  augment = config.data.augment
  # No resize (ratio 1 in a box of the image's own size) and the photometric distortion at
  # its least (a hue shift of at most 1 remains), so that the crop is a window of the coded
  # image to within a few grey levels (classes are 10 apart).
  augment.mmseg_ratio_min = augment.mmseg_ratio_max = 1.0
  augment.brightness_delta, augment.hue_delta = 0, 1
  augment.contrast_min = augment.contrast_max = augment.saturation_min = 1.0
  augment.saturation_max = 1.0
  for seed, (height, width) in enumerate([(60, 130), (30, 50), (45, 71), (39, 200)]):
    image, label = coded_pair(height, width, seed=seed)
    augment.mmseg_base_scale = (max(height, width), min(height, width))
    crop, crop_label = transforms.train_augment(image, label, np.random.default_rng(seed), config)
    assert crop.shape == (40, 72, 3) and crop_label.shape == (40, 72)
    labelled = crop_label != IGNORE
    assert np.abs(crop[..., 0][labelled] - crop_label[labelled] * 10.0).max() <= 3
    # The window covers min(image, crop) in each direction, from the top left.
    rows, cols = min(height, 40), min(width, 72)
    assert (crop_label[rows:] == IGNORE).all() and (crop_label[:, cols:] == IGNORE).all()


def test_periodic_evaluation_fits_images_into_a_rectangular_crop():
  image, label = coded_pair(100, 300)
  fitted, fitted_label = transforms.eval_resize(image.astype(np.float32), label, (40, 72), MEAN,
                                                IGNORE)
  assert fitted.shape == (40, 72, 3)
  # 100x300 into 40x72: the width binds (72 / 300 < 40 / 100), height round(72 / 300 * 100) = 24,
  # padded 8 above and 8 below with the ignore label.
  assert (fitted_label[:8] == IGNORE).all() and (fitted_label[32:] == IGNORE).all()
  assert (fitted_label[8:32] != IGNORE).all()

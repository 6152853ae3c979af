"""ADE20K-sized image/label files in the official layout, built with the real ADE20K builder,
so that the input benchmark measures ADE20K-like work without the dataset."""

import contextlib
import os
import sys

import cv2
import numpy as np

from pspnet_jax.data import ade20k


def write(root: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
  """`count` training pairs shaped like ADE20K's (about 512 x 683, smooth photo-like content
  that compresses like a photo, piecewise-constant labels 0..150) under root/ in the
  official layout, plus one validation pair; returns the training (image, label) paths."""
  rng = np.random.default_rng(seed)
  pairs = []
  for split, number in (('training', count), ('validation', 1)):
    os.makedirs(os.path.join(root, 'images', split))
    os.makedirs(os.path.join(root, 'annotations', split))
    for index in range(number):
      height, width = (512, int(rng.integers(600, 800))) if index % 2 else (
          int(rng.integers(600, 800)), 512)
      coarse = rng.uniform(0, 255, (height // 32, width // 32, 3)).astype(np.float32)
      image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
      image += rng.normal(0, 8, image.shape)
      regions = rng.integers(0, 151, (height // 64, width // 64), dtype=np.uint8)
      label = cv2.resize(regions, (width, height), interpolation=cv2.INTER_NEAREST)
      stem = f'ADE_{split}_{index:08d}'
      image_path = os.path.join(root, 'images', split, f'{stem}.jpg')
      label_path = os.path.join(root, 'annotations', split, f'{stem}.png')
      cv2.imwrite(image_path, np.clip(image, 0, 255).astype(np.uint8))
      cv2.imwrite(label_path, label)
      if split == 'training':
        pairs.append((image_path, label_path))
  return pairs


def build(config, count: int, scratch: str) -> list[tuple[str, str]]:
  """Writes `count` pairs under scratch/ and builds them with the ADE20K builder into
  scratch/tfds; points `config.data` at that dataset; returns the training pairs."""
  manual_dir = os.path.join(scratch, 'ADEChallengeData2016')
  pairs = write(manual_dir, count)
  config.data.name, config.data.num_classes = 'ade20k', ade20k.NUM_CLASSES
  config.data.data_dir = os.path.join(scratch, 'tfds')
  # TFDS announces the build on stdout, where the benchmark's JSON line must stand alone.
  with contextlib.redirect_stdout(sys.stderr):
    ade20k.Ade20kSemseg(data_dir=config.data.data_dir).build(manual_dir)
  return pairs

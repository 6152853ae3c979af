"""ADE20K / SceneParse150 as a TFDS builder (TFDS name `ade20k_semseg`): 150 classes.

The source is the official challenge release, ADEChallengeData2016.zip,
unpacked: manual_dir is the `ADEChallengeData2016/` folder with
`images/{training,validation}/*.jpg` and `annotations/{training,validation}/*.png`
(20,210 / 2,000 pairs), which become the splits `train` / `validation`.

Labels are shifted at build time as semseg trains on them: 0 (other) -> 255
(ignored), k -> k - 1, so the stored labels are the training labels. Images
keep their JPEG bytes: exact, and much smaller than a lossless PNG re-encoding.
"""

import numpy as np
import tensorflow_datasets as tfds

from pspnet_jax.data import builders, labels, meta

CLASS_NAMES = meta.class_names('ade20k')  # 150
NUM_CLASSES = len(CLASS_NAMES)
# TFDS split -> the release's folder name.
_SOURCE_SPLITS = {'train': 'training', 'validation': 'validation'}


class Ade20kSemseg(builders.ValidatingBuilder):
  """ADE20K scene parsing (SceneParse150), labels 0..149 and 255 = other/ignored."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'ADEChallengeData2016, labels shifted (0 -> 255, k -> k - 1).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip, unzip '
      'it and pass the ADEChallengeData2016 folder as manual_dir.')
  OFFICIAL_SIZES = {'train': 20210, 'validation': 2000}

  def _read_source(self, manual_dir):
    splits = {split: builders.find_pairs(manual_dir, f'images/{folder}',
                                         f'annotations/{folder}', image_suffixes=('.jpg',))
              for split, folder in _SOURCE_SPLITS.items()}
    return builders.Source(splits, CLASS_NAMES)

  def _remap(self, label):
    # uint8 arithmetic would wrap 0 to 255 as well; say it instead.
    return np.where(label == 0, labels.IGNORE_LABEL, label.astype(np.int32) - 1).astype(np.uint8)

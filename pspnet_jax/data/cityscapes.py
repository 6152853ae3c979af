"""Cityscapes as a TFDS builder (TFDS name `cityscapes_semseg`): the 19 trainId classes.

The source is the official release, leftImg8bit_trainvaltest.zip and
gtFine_trainvaltest.zip unpacked into one folder, manual_dir:
`leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png` and
`gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png`, <stem> being
`<city>_<seq>_<frame>` (2,975 / 500 pairs), which become the splits `train` /
`validation`. The test split has no public labels and is not built.

The coarse extra (gtCoarse, train_extra) is not built: the official PSPNet
recipe trains on the fine labels only.

Labels are stored as trainIds (cityscapesScripts' table, `meta.CITYSCAPES_LABEL_TO_TRAIN`),
every other labelId as 255 (ignored). The PNG images keep their bytes (exact).
"""

from etils import epath
import tensorflow_datasets as tfds

from pspnet_jax.data import builders, meta

_IMAGE_SUFFIX = '_leftImg8bit.png'
_LABEL_SUFFIX = '_gtFine_labelIds.png'
# TFDS split -> the release's split folder.
_SPLITS = {'train': 'train', 'validation': 'val'}


def find_pairs(root: epath.Path, folder: str) -> list[builders.Pair]:
  """The pairs of leftImg8bit/<folder>/<city>/ and gtFine/<folder>/<city>/ by stem, sorted.

  Unlike `builders.find_pairs`, images and labels sit in city subfolders and
  their names differ by a suffix; gtFine's other files (_color,
  _instanceIds, _polygons.json, a generated _labelTrainIds) are not labels.
  """
  image_folder, label_folder = builders.require_folders(
      root, root / 'leftImg8bit' / folder, root / 'gtFine' / folder)
  return builders.pair_by_stem(
      root,
      [(p.name.removesuffix(_IMAGE_SUFFIX), p) for p in image_folder.glob(f'*/*{_IMAGE_SUFFIX}')],
      [(p.name.removesuffix(_LABEL_SUFFIX), p) for p in label_folder.glob(f'*/*{_LABEL_SUFFIX}')])


class CityscapesSemseg(builders.ValidatingBuilder):
  """Cityscapes semantic segmentation, trainIds 0..18 and 255 = ignored."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'gtFine labelIds mapped to trainIds.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Log in at https://www.cityscapes-dataset.com/downloads/, download '
      'leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, unzip them into one folder '
      'and pass it (the one holding leftImg8bit/ and gtFine/) as manual_dir.')
  OFFICIAL_SIZES = {'train': 2975, 'validation': 500}

  def _read_source(self, manual_dir):
    return builders.Source(
        {split: find_pairs(manual_dir, folder) for split, folder in _SPLITS.items()},
        meta.class_names('cityscapes'))

  def _remap(self, label):
    return meta.CITYSCAPES_LABEL_TO_TRAIN[label]

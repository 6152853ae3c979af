"""PASCAL VOC 2012 + SBD ("train_aug") as a TFDS builder (TFDS name `voc2012_semseg`): 21 classes.

The standard augmented protocol: `train` is (VOC train ∪ SBD train ∪ SBD val)
minus VOC val, 10,582 images; `validation` is VOC val, 1,449 images. Every
image is VOC's JPEG; a label is VOC's SegmentationClass PNG where VOC has one,
otherwise SBD's annotation.

manual_dir holds VOC 2012 (VOCtrainval_11-May-2012.tar, unpacked):

  VOCdevkit/VOC2012/JPEGImages/<id>.jpg
  VOCdevkit/VOC2012/SegmentationClass/<id>.png        palette PNGs, indices are classes
  VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt  one <id> a line
  VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt

and the SBD labels in one of two forms (the first one present is used):

  a) the common DeepLab release, already converted to PNG:
     VOCdevkit/VOC2012/SegmentationClassAug/<id>.png   grey PNGs, values are classes
     VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt
        one <id> a line, or DeepLab's `/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`
  b) the SBD release itself (benchmark.tgz, unpacked):
     benchmark_RELEASE/dataset/cls/<id>.mat    MATLAB struct GTcls with field Segmentation
     benchmark_RELEASE/dataset/train.txt       one <id> a line
     benchmark_RELEASE/dataset/val.txt

With (a), train is (train_aug.txt ∪ VOC train) minus VOC val, so a list that
includes val images cannot leak them into training.

Labels are stored as they are, no remap: 0 background, 1..20 the classes, 255
the object boundaries (ignored); any other value is reported as a bad file.
"""

import io
import os

from etils import epath
import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from pspnet_jax.data import builders, meta

CLASS_NAMES = meta.class_names('voc2012')  # background + 20
_VOC = 'VOCdevkit/VOC2012'
_LISTS = f'{_VOC}/ImageSets/Segmentation'
_AUG_LABELS = f'{_VOC}/SegmentationClassAug'
_AUG_LIST = f'{_LISTS}/train_aug.txt'
_SBD = 'benchmark_RELEASE/dataset'


class _SbdLabel:
  """An SBD .mat label that reads as PNG bytes, the form `builders.read_example` validates.

  Converting lazily, per example, keeps a bad .mat a skipped file in the report
  (the InvalidExample is raised inside the build's per-example check) and
  writes no converted copies anywhere.
  """

  def __init__(self, path: epath.Path):
    self.path = path

  def __str__(self):
    return str(self.path)  # how a bad label is named in the report

  def __fspath__(self):
    return os.fspath(self.path)  # the file whose size and mtime go into the source digest

  def read_bytes(self) -> bytes:
    try:
      segmentation = scipy.io.loadmat(io.BytesIO(self.path.read_bytes()))['GTcls'][0, 0][
          'Segmentation']
    # What loadmat raises for a truncated or foreign file (MatReadError, ValueError,
    # IndexError), and a file without GTcls.Segmentation (KeyError, ValueError).
    except (scipy.io.matlab.MatReadError, ValueError, IndexError, KeyError) as error:
      raise builders.InvalidExample(f'label .mat does not decode as SBD GTcls.Segmentation '
                                    f'({type(error).__name__}: {error})') from None
    if segmentation.ndim != 2 or not np.issubdtype(segmentation.dtype, np.integer):
      raise builders.InvalidExample(f'label .mat Segmentation is {segmentation.dtype} '
                                    f'{segmentation.shape}, expected a 2-D integer array')
    if segmentation.size and (segmentation.min() < 0 or segmentation.max() > 255):
      raise builders.InvalidExample(f'label values {segmentation.min()}..{segmentation.max()} '
                                    f'do not fit a label image (0..255)')
    return builders.png(segmentation.astype(np.uint8))


def _read_ids(path: epath.Path) -> set[str]:
  """The image ids of a split list: the stem of each line's first path (or the bare id)."""
  if not path.is_file():
    raise builders.BuildError(f'{path} is not a file (expected under manual_dir)')
  return {epath.Path(line.split()[0]).stem for line in path.read_text().splitlines()
          if line.strip()}


def _existing(path: epath.Path) -> epath.Path | None:
  return path if path.exists() else None


class Voc2012Semseg(builders.ValidatingBuilder):
  """PASCAL VOC 2012 + SBD (train_aug), labels 0..20 and 255 = boundary/ignored."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'train_aug (10,582, VOC + SBD) and VOC val (1,449); labels as '
                            'released.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download VOC 2012 (http://host.robots.ox.ac.uk/pascal/VOC/voc2012/'
      'VOCtrainval_11-May-2012.tar) and unpack it into manual_dir, giving '
      'manual_dir/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}. Add '
      'the SBD labels either as the DeepLab SegmentationClassAug.zip unpacked into '
      'manual_dir/VOCdevkit/VOC2012/SegmentationClassAug/ with its list at '
      'manual_dir/VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt, or as SBD itself '
      '(http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/'
      'benchmark.tgz) unpacked into manual_dir, giving manual_dir/benchmark_RELEASE/dataset/'
      '{cls/*.mat,train.txt,val.txt}.')
  OFFICIAL_SIZES = {'train': 10582, 'validation': 1449}

  def _read_source(self, manual_dir):
    voc_train = _read_ids(manual_dir / _LISTS / 'train.txt')
    voc_val = _read_ids(manual_dir / _LISTS / 'val.txt')
    if (manual_dir / _AUG_LABELS).is_dir():
      extra_ids = _read_ids(manual_dir / _AUG_LIST)
      extra_dir, extra_suffix = manual_dir / _AUG_LABELS, '.png'
    elif (manual_dir / _SBD / 'cls').is_dir():
      extra_ids = (_read_ids(manual_dir / _SBD / 'train.txt')
                   | _read_ids(manual_dir / _SBD / 'val.txt'))
      extra_dir, extra_suffix = manual_dir / _SBD / 'cls', '.mat'
    else:
      raise builders.BuildError(f'no SBD labels under manual_dir {manual_dir}: expected '
                                f'{_AUG_LABELS}/ (with {_AUG_LIST}) or {_SBD}/cls/')

    def pair(id_):
      # Named by the image's path even when it is missing, so the report says which.
      name = f'{_VOC}/JPEGImages/{id_}.jpg'
      label = (_existing(manual_dir / _VOC / 'SegmentationClass' / f'{id_}.png')
               or _existing(extra_dir / f'{id_}{extra_suffix}'))
      if label is not None and label.suffix == '.mat':
        label = _SbdLabel(label)
      return builders.Pair(name, _existing(manual_dir / name), label)

    splits = {'train': sorted((voc_train | extra_ids) - voc_val), 'validation': sorted(voc_val)}
    return builders.Source({split: [pair(id_) for id_ in ids] for split, ids in splits.items()},
                           CLASS_NAMES)

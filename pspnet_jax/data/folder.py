"""Your own dataset from a folder, as a TFDS builder (TFDS name `folder_semseg`).

Layout of the folder (manual_dir):

  classes.txt                    one class name per line; line k is class k
  images/train/<stem>.<ext>      jpg, png, bmp, tif or webp
  labels/train/<stem>.png        single-channel: L, or P (palette indices are the classes)
  images/validation/...          the same for the validation split
  labels/validation/...

Label values are used as they are: 0..len(classes)-1, and 255 for pixels to
ignore. Every folder is its own BuilderConfig (`config_name`): the folder's
name for the eye plus a hash of its absolute path, so several folders live
side by side in one data_dir and /a/boats and /b/boats never share a build.
Prepare and training both key the slot on config.data.folder_dir made
absolute, so a relative folder_dir finds the build only from the same working
directory; prepare prints the absolute one. Train with
`--config.data.name=folder --config.data.folder_dir=FOLDER
--config.data.num_classes=N` (prepare prints the line). The class names go
into the build report, so training names the classes even when the folder is
no longer there (`registry.class_names`).
"""

import hashlib
import re

from etils import epath
import tensorflow_datasets as tfds

from pspnet_jax import paths
from pspnet_jax.data import builders, labels

SPLITS = ('train', 'validation')
CLASSES_FILE = 'classes.txt'


def config_name(folder_dir) -> str:
  """The BuilderConfig name of a folder: its base name in [a-z0-9_], and its absolute path's hash.

  Eight hex digits of sha256 make two folders' slots collide once in four
  billion pairs.
  """
  path = paths.absolute(folder_dir)
  base = re.sub(r'[^a-z0-9_]+', '_', epath.Path(path).name.lower()).strip('_')
  return f'{base or "folder"}_{hashlib.sha256(path.encode()).hexdigest()[:8]}'


def read_classes(folder_dir) -> list[str]:
  """The class names of classes.txt (blank lines ignored)."""
  path = epath.Path(folder_dir) / CLASSES_FILE
  if not path.exists():
    raise builders.BuildError(f'{path} is missing: one class name per line')
  names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not 1 <= len(names) <= labels.IGNORE_LABEL:
    raise builders.BuildError(f'{path}: {len(names)} classes, need 1..{labels.IGNORE_LABEL}')
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise builders.BuildError(f'{path}: class names must differ; repeated: {repeated}')
  return names


class FolderSemseg(builders.ValidatingBuilder):
  """A dataset from a folder of images, single-channel PNG labels and classes.txt."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'images/ + labels/ + classes.txt, splits train and validation.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

  def _read_source(self, manual_dir):
    splits = {split: builders.find_pairs(manual_dir, f'images/{split}', f'labels/{split}')
              for split in SPLITS}
    return builders.Source(splits, read_classes(manual_dir))

  @classmethod
  def for_config(cls, config, **kwargs) -> 'FolderSemseg':
    """The builder of config.data.folder_dir's dataset in config.data.data_dir (kwargs: strict)."""
    if not config.data.folder_dir:
      raise ValueError("config.data.name='folder' needs config.data.folder_dir (the folder "
                       "that prepare built from)")
    return builder(config.data.folder_dir, config.data.data_dir, **kwargs)

  @classmethod
  def class_names_for(cls, config) -> tuple[str, ...]:
    """The class names of config's folder dataset: as built (the report), else classes.txt."""
    built = cls.for_config(config)
    # Reports written before they carried class_names fall back to classes.txt too.
    names = (built.report() or {}).get('class_names')
    if names is not None:
      return tuple(names)
    if not (epath.Path(config.data.folder_dir) / CLASSES_FILE).exists():
      raise FileNotFoundError(
          f'no class names for the folder dataset {config.data.folder_dir}: neither its build '
          f'report {built.report_path} nor {CLASSES_FILE} in config.data.folder_dir exists')
    return tuple(read_classes(config.data.folder_dir))


def builder(folder_dir, data_dir=None, **kwargs) -> FolderSemseg:
  """The builder of the dataset from `folder_dir` in `data_dir` (kwargs: strict)."""
  config = tfds.core.BuilderConfig(name=config_name(folder_dir), version=FolderSemseg.VERSION)
  return FolderSemseg(config=config, data_dir=data_dir, **kwargs)

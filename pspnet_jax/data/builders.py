"""What the real-dataset builders share: (image, label) pairs, their validation, the report.

A TFDS build takes any bytes it is given: a truncated JPEG, an empty file or
an RGB label would only fail (or turn the loss into NaN) in the middle of a
training run. So `ValidatingBuilder` checks every pair while it writes:

  - the image decodes (OpenCV, as TFDS decodes it when reading back);
  - the label decodes with PIL and is single-channel ('L', or 'P' whose
    palette indices are the classes: OpenCV would expand a palette to colour);
  - image and label have the same height and width, and after the dataset's
    remap every label value is < num_classes or 255 (`labels.check`, the
    check the loader repeats on every record it reads).

A bad pair is skipped and named with its reason in the build report, or, with
`strict=True`, stops the build at the first one. A split fails when it skips
more than `MAX_SKIPPED_FRACTION` of its files and more than
`TOLERATED_SKIPS`, or writes nothing. When a split has at least as many files
as the official release (`OFFICIAL_SIZES`), it must have exactly as many:
fewer files are a subset (a test tree, a sample) and are not checked.

A failed build leaves no dataset behind: TFDS writes into a temporary folder,
removes it on an error and renames it only when every split generator has
finished.

The report ({dataset, config, num_classes, class_names, manual_dir, splits:
{split: found, official, written, skipped, skipped_files [{file, reason}],
class_pixels {class name: pixels}, ignore_ratio}}) is written as
`build_report.json` into the dataset's version folder, next to TFDS's
dataset_info.json. Its class_names are what a folder dataset's classes.txt said
when it was built, so training can name the classes without the folder.

A dataset subclass provides `_read_source(manual_dir)` (its pairs per split
and its class names) and, when its label files need it, `_remap`.
"""

import abc
import dataclasses
import io
import json

import cv2
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from pspnet_jax.data import labels

REPORT_NAME = 'build_report.json'
# A release usually has a few broken files (ADE20K has some odd JPEGs), and a
# first own folder may have a couple: skip and name them. Many skips mean
# something systematic (labels saved as RGB, the wrong folder), and a model
# trained on what is left would quietly be a different experiment: fail.
MAX_SKIPPED_FRACTION = 0.01
TOLERATED_SKIPS = 5
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
_LABEL_MODES = ('L', 'P')


class BuildError(ValueError):
  """The source tree cannot become the dataset; the message names the file or the rule."""


class InvalidExample(ValueError):
  """One pair fails a check; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class Pair:
  """One example's files; `name` (the image's path under manual_dir) is stored as file_name."""
  name: str
  image: epath.Path | None
  label: epath.Path | None


@dataclasses.dataclass
class Source:
  """What a dataset's manual_dir holds: pairs per TFDS split, and the names of its classes."""
  splits: dict[str, list[Pair]]
  class_names: tuple[str, ...]


def require_folders(root: epath.Path, *folders: epath.Path) -> tuple[epath.Path, ...]:
  """`folders`, or BuildError naming the first one that is missing."""
  for folder in folders:
    if not folder.is_dir():
      raise BuildError(f'{folder} is not a folder (expected under manual_dir {root})')
  return folders


def pair_by_stem(root: epath.Path, images: dict, label_files: dict) -> list[Pair]:
  """{stem: image path} and {stem: label path} -> pairs sorted by stem.

  A stem with only one of the two files is still a pair (with None), so that
  the build reports it instead of silently dropping it.
  """
  return [Pair(str((images.get(stem) or label_files[stem]).relative_to(root)), images.get(stem),
               label_files.get(stem)) for stem in sorted(images.keys() | label_files.keys())]


def find_pairs(root: epath.Path, image_dir: str, label_dir: str,
               image_suffixes=IMAGE_SUFFIXES) -> list[Pair]:
  """Images of root/image_dir and .png labels of root/label_dir matched by stem, sorted."""
  image_folder, label_folder = require_folders(root, root / image_dir, root / label_dir)
  return pair_by_stem(
      root, {p.stem: p for p in image_folder.iterdir() if p.suffix.lower() in image_suffixes},
      {p.stem: p for p in label_folder.iterdir() if p.suffix.lower() == '.png'})


def png(array: np.ndarray) -> bytes:
  """OpenCV PNG bytes (OpenCV's channel order on disk) of `array`."""
  ok, encoded = cv2.imencode('.png', np.ascontiguousarray(array))
  assert ok, 'OpenCV failed to encode a PNG'
  return encoded.tobytes()


def read_example(pair: Pair, remap, num_classes: int) -> tuple[dict, np.ndarray]:
  """(the TFDS example, the remapped label) of `pair`, or InvalidExample / LabelError.

  The image keeps its file's bytes when TFDS reads them back as 8-bit
  3-channel (exact, and a JPEG stays as small as it was); grayscale, alpha,
  16-bit and similar images are converted to 8-bit BGR by OpenCV and stored as
  PNG. The label is always re-encoded: remapped, single-channel PNG.
  """
  if pair.image is None:
    raise InvalidExample('no image with this label')
  if pair.label is None:
    raise InvalidExample('no label with this image')
  image_bytes = pair.image.read_bytes()
  buffer = np.frombuffer(image_bytes, np.uint8)
  # IMREAD_UNCHANGED is how TFDS decodes (no EXIF rotation), so the sizes
  # checked here are the sizes training sees.
  image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
  if image is None:
    raise InvalidExample(f'image does not decode ({len(image_bytes)} bytes)')
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    image_bytes = png(cv2.imdecode(buffer, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION))
  try:
    with Image.open(io.BytesIO(pair.label.read_bytes())) as decoded:
      mode, source = decoded.mode, np.array(decoded)
  except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
    raise InvalidExample(f'label does not decode ({error})') from None
  if mode not in _LABEL_MODES:
    raise InvalidExample(f'label is a {mode} image, expected single-channel (L, or P with '
                         f'class indices)')
  label = remap(source)
  # Raises labels.LabelError, which the build treats as one more InvalidExample.
  labels.check(str(pair.label), image.shape, label, num_classes, before_remap=source)
  example = {'image': image_bytes, 'label': png(label), 'file_name': pair.name}
  return example, label


class ValidatingBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder from a manual_dir of files that validates every pair and writes a report.

  Subclasses set VERSION, MANUAL_DOWNLOAD_INSTRUCTIONS, optionally
  OFFICIAL_SIZES ({split: count}), and implement `_read_source`.
  """

  OFFICIAL_SIZES: dict[str, int] = {}

  def __init__(self, *, strict: bool = False, **kwargs):
    super().__init__(**kwargs)
    self.strict = strict
    self._class_names = ()
    self._reports = {}

  @abc.abstractmethod
  def _read_source(self, manual_dir: epath.Path) -> Source:
    """The pairs of each split under manual_dir and the names of the classes."""

  def _remap(self, label: np.ndarray) -> np.ndarray:
    """Label file values -> training labels; the identity unless the dataset needs one."""
    return label

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=type(self).__doc__,
        features=tfds.features.FeaturesDict({
            # encoding_format only applies to arrays; we pass encoded bytes.
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'file_name': tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    source = self._read_source(epath.Path(dl_manager.manual_dir))
    self._class_names = tuple(source.class_names)
    return {split: self._generate_examples(split, pairs)
            for split, pairs in source.splits.items()}

  def _generate_examples(self, split, pairs):
    official = self.OFFICIAL_SIZES.get(split)
    if official is not None and len(pairs) > official:
      raise BuildError(f'{split}: found {len(pairs)} files, the official release has '
                       f'{official}: is something else mixed into manual_dir?')
    skipped = []
    pixels = np.zeros(256, np.int64)
    for pair in pairs:
      try:
        example, label = read_example(pair, self._remap, len(self._class_names))
      except (InvalidExample, labels.LabelError) as error:
        if self.strict:
          raise BuildError(f'{pair.name}: {error} (strict: the build stops at the first bad '
                           f'example)') from None
        skipped.append({'file': pair.name, 'reason': str(error)})
        continue
      pixels += np.bincount(label.ravel(), minlength=256)
      yield pair.name, example
    found, written = len(pairs), len(pairs) - len(skipped)
    if written == 0 or (len(skipped) > TOLERATED_SKIPS
                        and len(skipped) > MAX_SKIPPED_FRACTION * found):
      reasons = '; '.join(f'{s["file"]}: {s["reason"]}' for s in skipped[:3])
      raise BuildError(f'{split}: {len(skipped)} of {found} examples are bad (at most '
                       f'{MAX_SKIPPED_FRACTION:.0%} or {TOLERATED_SKIPS} may be skipped, and at '
                       f'least one must be good); first: {reasons}')
    self._reports[split] = {
        'found': found, 'official': official, 'written': written, 'skipped': len(skipped),
        'skipped_files': skipped,
        'class_pixels': dict(zip(self._class_names, pixels.tolist())),
        'ignore_ratio': float(pixels[labels.IGNORE_LABEL] / max(1, pixels.sum())),
    }

  @classmethod
  def for_config(cls, config, **kwargs) -> 'ValidatingBuilder':
    """The builder in config.data.data_dir (kwargs: strict); see `registry.builder`."""
    return cls(data_dir=config.data.data_dir, **kwargs)

  @property
  def report_path(self) -> epath.Path:
    return epath.Path(self.data_dir) / REPORT_NAME

  def report(self) -> dict | None:
    """The build report on disk; None when this dataset was never built here."""
    return json.loads(self.report_path.read_text()) if self.report_path.exists() else None

  def build(self, manual_dir) -> dict:
    """Builds from `manual_dir` (a no-op when already built) and returns the build report."""
    self.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    if self._reports:
      report = {'dataset': self.name, 'config': self.builder_config and self.builder_config.name,
                'num_classes': len(self._class_names), 'class_names': list(self._class_names),
                'manual_dir': str(manual_dir), 'splits': self._reports}
      self.report_path.write_text(json.dumps(report, indent=1))
    return self.report()

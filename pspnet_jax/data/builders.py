"""What the real-dataset builders share: (image, label) pairs, their validation, the report.

A TFDS build takes any bytes it is given: a truncated JPEG, an empty file or
an RGB label would only fail (or turn the loss into NaN) in the middle of a
training run. So `ValidatingBuilder` checks every pair while it writes:

  - both files can be read: a folder named like an image (`images/x.jpg/`),
    a symlink loop or an unreadable file is a bad pair, not an OSError that
    ends the build;
  - one image and one label per stem: `dup.jpg` next to `dup.png` is a bad
    pair naming both files, since which one goes with the label is a guess;
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

A build is reused only while its source is unchanged. The report records
`source_digest`, a hash of the class names and of every pair's files (path
under manual_dir, size, modification time); building again from a source whose
digest differs (labels fixed, images added or removed) raises `SourceChanged`
instead of handing back the old report, and `overwrite=True` (prepare's
`--overwrite`) rebuilds. The previous build stays in place until the new one is
complete, and comes back if the rebuild fails.

The report ({dataset, config, num_classes, class_names, manual_dir,
source_digest, splits: {split: found, official, written, skipped, skipped_files
[{file, reason}], class_pixels {class name: pixels}, ignore_ratio}}) is
written as `build_report.json` into the dataset's version folder, next to
TFDS's dataset_info.json. Its class_names are what a folder dataset's
classes.txt said when it was built, so training can name the classes without
the folder.

A dataset subclass provides `_read_source(manual_dir)` (its pairs per split
and its class names) and, when its label files need it, `_remap`.
"""

import abc
import collections
import dataclasses
import hashlib
import io
import json
import os

from absl import logging
import cv2
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from pspnet_jax import paths
from pspnet_jax.errors import UserError
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


class BuildError(UserError):
  """The source tree cannot become the dataset; the message names the file or the rule."""


class SourceChanged(BuildError):
  """manual_dir is no longer what the existing build was built from."""


class InvalidExample(ValueError):
  """One pair fails a check; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class Pair:
  """One example's files; `name` (the image's path under manual_dir) is stored as file_name.

  `problem`, when set, is why the pair is bad before any file is read (two
  images for one stem): the build skips it with that reason like any other.
  """
  name: str
  image: epath.Path | None
  label: epath.Path | None
  problem: str | None = None


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


def pair_by_stem(root: epath.Path, images, label_files) -> list[Pair]:
  """(stem, path) of every image and of every label -> one pair per stem, sorted by stem.

  The build reports what it cannot pair instead of silently dropping a file: a
  stem with only one of the two files is still a pair (with None), and a stem
  that two images (or two labels) share is a pair whose `problem` names them.
  """
  images_of, labels_of = collections.defaultdict(list), collections.defaultdict(list)
  for stem, path in images:
    images_of[stem].append(path)
  for stem, path in label_files:
    labels_of[stem].append(path)
  pairs = []
  for stem in sorted(images_of.keys() | labels_of.keys()):
    image_paths, label_paths = sorted(images_of[stem], key=str), sorted(labels_of[stem], key=str)
    problems = [f'{len(paths)} {kind} files share the stem {stem!r} '
                f'({", ".join(str(path.relative_to(root)) for path in paths)}); keep one'
                for kind, paths in (('image', image_paths), ('label', label_paths))
                if len(paths) > 1]
    image, label = (paths[0] if paths else None for paths in (image_paths, label_paths))
    pairs.append(Pair(str((image or label).relative_to(root)), image, label,
                      '; '.join(problems) or None))
  return pairs


def find_pairs(root: epath.Path, image_dir: str, label_dir: str,
               image_suffixes=IMAGE_SUFFIXES) -> list[Pair]:
  """Images of root/image_dir and .png labels of root/label_dir matched by stem, sorted."""
  image_folder, label_folder = require_folders(root, root / image_dir, root / label_dir)
  return pair_by_stem(
      root, [(p.stem, p) for p in image_folder.iterdir() if p.suffix.lower() in image_suffixes],
      [(p.stem, p) for p in label_folder.iterdir() if p.suffix.lower() == '.png'])


def _file_state(root: epath.Path, file) -> list | None:
  """[path under root, size, modification time] of a pair's file, or [path, why not]."""
  if file is None:
    return None
  path = os.fspath(file)
  remote = paths.is_remote(path)
  name = path if remote else os.path.relpath(path, root)
  try:
    if remote:  # GCS and other etils backends report whole seconds
      stat = epath.Path(path).stat()
      return [name, stat.length, stat.mtime]
    stat = os.stat(path)  # nanoseconds: a label fixed in the second it was built still counts
    return [name, stat.st_size, stat.st_mtime_ns]
  except OSError as error:
    return [name, error.strerror or str(error)]


def source_digest(root: epath.Path, source: Source) -> str:
  """A hash of what `source` would build from: class names, pairs, each file's size and mtime.

  Paths are taken under root, so moving the whole manual_dir keeps its digest.
  """
  digest = hashlib.sha256(json.dumps(list(source.class_names)).encode())
  for split in sorted(source.splits):
    for pair in source.splits[split]:
      digest.update(json.dumps([split, pair.name, pair.problem, _file_state(root, pair.image),
                                _file_state(root, pair.label)]).encode())
  return digest.hexdigest()


def png(array: np.ndarray) -> bytes:
  """OpenCV PNG bytes (OpenCV's channel order on disk) of `array`."""
  ok, encoded = cv2.imencode('.png', np.ascontiguousarray(array))
  assert ok, 'OpenCV failed to encode a PNG'
  return encoded.tobytes()


def _read(file, role: str) -> bytes:
  """The bytes of a pair's `role` file ('image', 'label'), or InvalidExample saying why not."""
  try:
    return file.read_bytes()
  except IsADirectoryError:
    raise InvalidExample(f'{role} is a folder, not a file') from None
  except OSError as error:  # a symlink loop, a dangling link, no permission
    raise InvalidExample(f'{role} cannot be read ({error.strerror or error})') from None


def read_example(pair: Pair, remap, num_classes: int) -> tuple[dict, np.ndarray]:
  """(the TFDS example, the remapped label) of `pair`, or InvalidExample / LabelError.

  The image keeps its file's bytes when TFDS reads them back as 8-bit
  3-channel (exact, and a JPEG stays as small as it was); grayscale, alpha,
  16-bit and similar images are converted to 8-bit BGR by OpenCV and stored as
  PNG. The label is always re-encoded: remapped, single-channel PNG.
  """
  if pair.problem:
    raise InvalidExample(pair.problem)
  if pair.image is None:
    raise InvalidExample('no image with this label')
  # Read before asking for the label: a folder named like an image has none,
  # and "no label" would hide what it is.
  image_bytes = _read(pair.image, 'image')
  if pair.label is None:
    raise InvalidExample('no label with this image')
  buffer = np.frombuffer(image_bytes, np.uint8)
  # IMREAD_UNCHANGED is how TFDS decodes (no EXIF rotation), so the sizes
  # checked here are the sizes training sees.
  image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
  if image is None:
    raise InvalidExample(f'image does not decode ({len(image_bytes)} bytes)')
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    image_bytes = png(cv2.imdecode(buffer, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION))
  label_bytes = _read(pair.label, 'label')
  try:
    with Image.open(io.BytesIO(label_bytes)) as decoded:
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


class LocalBuild:
  """Mixin for our TFDS builders: a build into an object store fails at once, saying what to do.

  array_record's writer opens local files only (its reader also takes gs://),
  so TFDS would fail on the first shard with "open() failed ... Failed to
  create the file header". A dataset already there is read as usual.
  """

  def download_and_prepare(self, *args, **kwargs):
    if paths.is_remote(self.data_dir) and not self.is_prepared():
      root = os.fspath(self.data_dir_root)
      raise BuildError(
          f'{self.name} is not built in {root}, and ArrayRecord files can only be written to '
          f'local folders: build it into a local data_dir, copy that folder up (gcloud storage '
          f'cp -r LOCAL_DATA_DIR/{self.name} {root}/), then read it from data.data_dir={root}')
    return super().download_and_prepare(*args, **kwargs)

  # TFDS prints "Downloading and preparing dataset Unknown size (download: Unknown size, ...)"
  # and a "downloaded and prepared" line for every build; ours download nothing.
  def _log_download_bytes(self) -> None:
    logging.info('building %s into %s', self.info.full_name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info('built %s in %s', self.info.full_name, self.data_dir)


class ValidatingBuilder(LocalBuild, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder from a manual_dir of files that validates every pair and writes a report.

  Subclasses set VERSION, MANUAL_DOWNLOAD_INSTRUCTIONS, optionally
  OFFICIAL_SIZES ({split: count}), and implement `_read_source`.
  """

  OFFICIAL_SIZES: dict[str, int] = {}

  def __init__(self, *, strict: bool = False, **kwargs):
    super().__init__(**kwargs)
    self.strict = strict
    self._class_names = ()
    self._source_digest = None
    self._reports = {}

  @abc.abstractmethod
  def _read_source(self, manual_dir: epath.Path) -> Source:
    """The pairs of each split under manual_dir and the names of the classes."""

  def _remap(self, label: np.ndarray) -> np.ndarray:
    """Label file values -> training labels; the identity unless the dataset needs one."""
    return label

  def _read_pair(self, pair: Pair) -> tuple[dict, np.ndarray]:
    """(the TFDS example of `pair`, its class map for the report's pixel counts); raises
    InvalidExample or labels.LabelError for a pair to skip."""
    return read_example(pair, self._remap, len(self._class_names))

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
    manual_dir = epath.Path(dl_manager.manual_dir)
    source = self._read_source(manual_dir)
    self._class_names = tuple(source.class_names)
    # Hashed before any file is read: a file changed during the build makes
    # the next build see a changed source, never the other way round.
    self._source_digest = source_digest(manual_dir, source)
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
        example, label = self._read_pair(pair)
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

  def build(self, manual_dir, *, overwrite: bool = False) -> dict:
    """Builds from `manual_dir` and returns the build report.

    An existing build is reused while its source is unchanged (same
    `source_digest`); a changed source raises SourceChanged, and
    `overwrite=True` rebuilds whatever is there. The previous build is set
    aside as `<version>.previous` during a rebuild and put back if it fails;
    after a rebuild killed outright, the next call puts it back.
    """
    manual_dir = epath.Path(paths.absolute(manual_dir))
    previous = self.data_path.parent / f'{self.data_path.name}.previous'
    if previous.exists():  # an earlier rebuild was killed
      if self.data_path.exists():
        previous.rmtree()  # ... after TFDS finished it: the new build is complete
      else:
        previous.rename(self.data_path)  # ... midway: the old build comes back
    if self.is_prepared() and not overwrite:
      self._check_source(manual_dir)
      return self.report()
    # Anything at data_path, a build or an unfinished leftover, would make TFDS reuse it.
    if not self.data_path.exists():
      return self._generate(manual_dir)
    self.data_path.rename(previous)
    try:
      # This builder has read the old build's dataset info, which TFDS refuses
      # to overwrite; one made now sees an empty slot.
      report = type(self)(data_dir=str(self.data_dir_root), config=self.builder_config,
                          version=str(self.version), strict=self.strict)._generate(manual_dir)
    except BaseException:
      previous.rename(self.data_path)
      raise
    previous.rmtree()
    return report

  def _generate(self, manual_dir: epath.Path) -> dict:
    """Writes the dataset and its report into the empty data_path; returns the report."""
    self.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    report = {'dataset': self.name, 'config': self.builder_config and self.builder_config.name,
              'num_classes': len(self._class_names), 'class_names': list(self._class_names),
              'manual_dir': str(manual_dir), 'source_digest': self._source_digest,
              'splits': self._reports}
    self.report_path.write_text(json.dumps(report, indent=1))
    return report

  def _check_source(self, manual_dir: epath.Path):
    """SourceChanged unless the build here was built from what manual_dir holds now."""
    report = self.report() or {}
    source = self._read_source(manual_dir)
    if report.get('source_digest') == source_digest(manual_dir, source):
      return
    where = f'the build in {self.data_dir}'
    if 'source_digest' not in report:
      raise SourceChanged(f'{where} records no digest of its source (built by an older '
                          f'prepare), so whether {manual_dir} changed since is unknown: rebuild '
                          f'it with --overwrite')
    then = {split: numbers['found'] for split, numbers in report['splits'].items()}
    now = {split: len(pairs) for split, pairs in source.splits.items()}
    counts = [f'{split}: {then.get(split, 0)} files then, {now.get(split, 0)} now'
              for split in sorted(then.keys() | now.keys()) if then.get(split) != now.get(split)]
    what = ', '.join(counts) or 'files or class names modified'
    raise SourceChanged(f'{manual_dir} changed since {where} was made from it ({what}): the build '
                        f'is stale; rebuild it with --overwrite')

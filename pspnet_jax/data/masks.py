"""Binary-mask datasets for CascadePSP refinement, and the refinement training transform.

Every example is {'image': uint8 HxWx3 RGB, 'mask': uint8 HxWx1 ground truth,
'input_mask': uint8 HxWx1 coarse mask to refine, 'file_name': text}. The mask
keeps its grey levels 0..255: the official loss takes gt/255 as a soft target
(and gt > 0.5, any nonzero level, as the binary one), so anti-aliased edges of
the saliency releases stay as drawn. The input mask is a `_seg` file given
with the example where the source has one, else the ground truth through
`perturb.modify_boundary` with a generator drawn from (INPUT_SEED, file_name):
the same coarse mask at every build. Training does not read it: it perturbs
every crop afresh (`refinement_augment`), as the official online dataset.

Three builders (class names background / foreground):

  cascadepsp_mix    the official training mix (`train.py`, `docs/training.md`), from
                    manual_dir holding any of DUTS-TR/, DUTS-TE/, ecssd/, MSRA_10K/,
                    DUT-OMRON/ (flat <name>.jpg + <name>.png) and fss/<class>/<n>.jpg +
                    <n>.png (train.py reads all but DUT-OMRON, which docs/training.md
                    lists; it is taken when present). The official code trains on
                    everything; here, sorted by path, every VALIDATION_EVERY-th pair
                    from the first on is held out as the validation split (1%, for a
                    loss and IoU to watch), the rest is train. An FSS image without
                    its mask is one bad pair (the official code drops its whole class). The official evaluation sets (BIG, relabeled
                    PASCAL) come with their own coarse inputs: build them as a
                    mask_folder.
  mask_folder       a folder in the official test-set layout (`docs/testing_segmentation.md`):
                    manual_dir/<split>/<stem>_im.<jpg|png|...>, <stem>_gt.png and optionally
                    <stem>_seg.png (the coarse input), for split in train, validation, test
                    (those present). One BuilderConfig per folder, as `folder`.
  synthetic_masks   generated on first use: one object of curved and cornered outline on a
                    textured background of a nearby colour, for a CPU demo.

Masks must be grey: 8-bit 'L' or '1', or a palette or RGB(A) image whose colours
are all grey (FSS-1000 saves its masks as RGB), read as PIL's convert('L'),
which is how the official code reads them. Images and masks must have the
same height and width; a bad pair is skipped and named in the build report
(`builders.ValidatingBuilder`), or stops the build with --strict.
"""

import dataclasses
import hashlib
import io
import json

import cv2
from etils import epath
import numpy as np
from PIL import Image, ImageEnhance
import tensorflow_datasets as tfds

from pspnet_jax.data import builders, folder, perturb, synthetic

CLASS_NAMES = ('background', 'foreground')
PALETTE = np.array([[0, 0, 0], [255, 255, 255]], np.uint8)
# The build-time coarse inputs: a generator per file from (INPUT_SEED, file name), and an IoU
# target uniform in INPUT_IOU_RANGE, the official training range.
INPUT_SEED = 0
INPUT_IOU_RANGE = (0.8, 1.0)
# cascadepsp_mix: pairs 0, VALIDATION_EVERY, 2 * VALIDATION_EVERY, ... (sorted by path) validate.
VALIDATION_EVERY = 100
MIX_FOLDERS = ('DUTS-TR', 'DUTS-TE', 'ecssd', 'MSRA_10K', 'DUT-OMRON')
FSS_FOLDER = 'fss'
MASK_FOLDER_SPLITS = ('train', 'validation', 'test')
# mask_folder's file name endings: image (any of builders.IMAGE_SUFFIXES), mask, coarse input.
IMAGE_TAG, MASK_TAG, INPUT_TAG = '_im', '_gt', '_seg'
_GREY_MODES = ('1', 'L', 'LA')
_COLOUR_MODES = ('P', 'RGB', 'RGBA')


def _features(image_format: str | None) -> tfds.features.FeaturesDict:
  """The example features; `image_format` None keeps the bytes each image is given in."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
      'mask': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
      'input_mask': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
      'file_name': tfds.features.Text(),
  })


def file_rng(seed: int, file_name: str) -> np.random.Generator:
  """The generator of `file_name`'s build-time draws."""
  digest = np.frombuffer(hashlib.sha256(file_name.encode()).digest(), np.uint32)
  return np.random.default_rng([seed, *digest.tolist()])


def coarse_input(mask: np.ndarray, rng: np.random.Generator,
                 iou_range=INPUT_IOU_RANGE) -> np.ndarray:
  """The official training input of a grey mask: its nonzero pixels (the official gt > 0.5 on
  uint8) through `perturb.modify_boundary` to an IoU target uniform in `iou_range`."""
  binary = np.where(mask > 0, 255, 0).astype(np.uint8)
  return perturb.modify_boundary(binary, rng, iou_target=rng.uniform(*iou_range))


# ---------------------------------------------------------------------------------------------
# The training transform (dataset/online_dataset.py with perturb=True).


def _pad_and_crop(image, gt, rng: np.random.Generator, crop: int):
  """torchvision's RandomCrop(crop, pad_if_needed=True) with one window for both: a side
  shorter than `crop` is padded with zeros by the shortfall on both ends, then a uniform
  window (so the whole image lands at a uniform offset inside the crop)."""
  short_h, short_w = max(crop - gt.shape[0], 0), max(crop - gt.shape[1], 0)
  if short_h or short_w:
    image = np.pad(image, ((short_h, short_h), (short_w, short_w), (0, 0)))
    gt = np.pad(gt, ((short_h, short_h), (short_w, short_w)))
  top = int(rng.integers(gt.shape[0] - crop + 1))
  left = int(rng.integers(gt.shape[1] - crop + 1))
  return image[top:top + crop, left:left + crop], gt[top:top + crop, left:left + crop]


# ColorJitter's adjustments on PIL images, as torchvision's functional_pil applies them.
_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float,
                 contrast: float, saturation: float) -> np.ndarray:
  """torchvision's ColorJitter(brightness, contrast, saturation, hue=0) of a uint8 RGB image.

  The three adjustments in a random order, each (when its amount is > 0) by a factor
  uniform in [max(0, 1 - amount), 1 + amount], with PIL's ImageEnhance (blends with
  black, with the mean grey, with the luma image; truncated to uint8 after each).
  """
  picture = Image.fromarray(image)
  amounts = (brightness, contrast, saturation)
  for index in rng.permutation(len(amounts)):
    if amounts[index] > 0:
      factor = rng.uniform(max(0.0, 1.0 - amounts[index]), 1.0 + amounts[index])
      picture = _ENHANCERS[index](picture).enhance(factor)
  return np.array(picture)  # writable, unlike np.asarray of a PIL image


def grayscale(image: np.ndarray) -> np.ndarray:
  """RandomGrayscale's image: PIL's ITU-R 601-2 luma (convert('L')) in all three channels."""
  return np.repeat(np.asarray(Image.fromarray(image).convert('L'))[..., None], 3, axis=2)


def refinement_augment(image: np.ndarray, gt: np.ndarray, rng: np.random.Generator,
                       augment_config, crop: int):
  """CascadePSP's training example of (uint8 HxWx3 RGB image, uint8 HxW grey ground truth):
  (image, input_mask in {0, 255}, gt), each crop x crop, uint8.

  The official online dataset: one random crop window for image and ground truth (zero
  padding where a side is shorter than `crop`), a horizontal flip of both with
  probability `flip_prob`, colour jitter (`jitter_brightness`, `jitter_contrast`,
  `jitter_saturation`) and with probability `grayscale_prob` grey of the image, and the
  input mask made from the cropped ground truth by `coarse_input` with an IoU target
  uniform in [perturb_iou_min, perturb_iou_max]. Every draw comes from `rng`.
  """
  image, gt = _pad_and_crop(image, gt, rng, crop)
  if rng.random() < augment_config.flip_prob:
    image, gt = image[:, ::-1], gt[:, ::-1]
  image = color_jitter(np.ascontiguousarray(image), rng, augment_config.jitter_brightness,
                       augment_config.jitter_contrast, augment_config.jitter_saturation)
  if rng.random() < augment_config.grayscale_prob:
    image = grayscale(image)
  gt = np.ascontiguousarray(gt)
  input_mask = coarse_input(gt, rng, (augment_config.perturb_iou_min,
                                      augment_config.perturb_iou_max))
  return np.ascontiguousarray(image), input_mask, gt


# ---------------------------------------------------------------------------------------------
# Builders from files.


@dataclasses.dataclass(frozen=True)
class MaskPair(builders.Pair):
  """A pair whose `label` is the ground-truth mask, with its coarse input file when given."""
  input_mask: epath.Path | None = None


def _read(file, role: str) -> bytes:
  try:
    return file.read_bytes()
  except OSError as error:  # a folder, a dangling link, no permission
    raise builders.InvalidExample(f'{role} cannot be read ({error.strerror or error})') from None


def _read_grey(file, role: str, shape) -> np.ndarray:
  """The grey levels of a mask file of image size `shape`, or InvalidExample saying why not."""
  data = _read(file, role)
  try:
    with Image.open(io.BytesIO(data)) as decoded:
      mode = decoded.mode
      grey = np.array(decoded.convert('L')) if mode in _GREY_MODES else None
      colour = np.array(decoded.convert('RGB')) if mode in _COLOUR_MODES else None
  except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
    raise builders.InvalidExample(f'{role} does not decode ({error})') from None
  if colour is not None:
    if (colour != colour[..., :1]).any():
      raise builders.InvalidExample(f'{role} is a colour image (mode {mode} with colours that '
                                    f'are not grey), expected a grey mask')
    grey = colour[..., 0]
  if grey is None:
    raise builders.InvalidExample(f'{role} is a {mode} image, expected an 8-bit grey mask')
  if grey.shape != tuple(shape[:2]):
    raise builders.InvalidExample(f'image is {shape[0]}x{shape[1]} but {role} is '
                                  f'{grey.shape[0]}x{grey.shape[1]}')
  return grey


def read_mask_example(pair: MaskPair, seed: int = INPUT_SEED) -> tuple[dict, np.ndarray]:
  """(the TFDS example of `pair`, its grey mask), or InvalidExample.

  The image keeps its file's bytes when it decodes to 8-bit 3-channel, as in
  `builders.read_example`; other images are stored as PNG of OpenCV's colour decode.
  """
  if pair.problem:
    raise builders.InvalidExample(pair.problem)
  if pair.image is None:
    raise builders.InvalidExample('no image with this mask')
  image_bytes = _read(pair.image, 'image')
  if pair.label is None:
    raise builders.InvalidExample('no mask with this image')
  buffer = np.frombuffer(image_bytes, np.uint8)
  image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
  if image is None:
    raise builders.InvalidExample(f'image does not decode ({len(image_bytes)} bytes)')
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    image_bytes = builders.png(cv2.imdecode(buffer,
                                            cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION))
  mask = _read_grey(pair.label, 'mask', image.shape)
  if pair.input_mask is not None:
    input_mask = _read_grey(pair.input_mask, 'input mask', image.shape)
  else:
    input_mask = coarse_input(mask, file_rng(seed, pair.name))
  return {'image': image_bytes, 'mask': builders.png(mask), 'input_mask': builders.png(input_mask),
          'file_name': pair.name}, mask


class MaskBuilder(builders.ValidatingBuilder, skip_registration=True):
  """A binary-mask dataset from files: `builders.ValidatingBuilder`'s checks, build and report
  ({background, foreground} pixels: zero and nonzero mask levels; no ignored pixels)."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=type(self).__doc__,
                                 features=_features(None))

  def _read_pair(self, pair):
    example, mask = read_mask_example(pair)
    return example, (mask > 0).astype(np.uint8)


def _flat_pairs(root: epath.Path, folder_path: epath.Path) -> list[MaskPair]:
  """The <name>.jpg images and <name>.png masks of one folder, paired by name."""
  files = list(folder_path.iterdir())
  pairs = builders.pair_by_stem(
      root, [(path.stem, path) for path in files if path.suffix.lower() == '.jpg'],
      [(path.stem, path) for path in files if path.suffix.lower() == '.png'])
  return [MaskPair(**vars(pair)) for pair in pairs]


class CascadepspMix(MaskBuilder):
  """CascadePSP's training mix of saliency and few-shot segmentation sets (see `masks`)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'DUTS-TR/TE, ECSSD, MSRA-10K, DUT-OMRON, FSS-1000; 1% validation.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'The folder that CascadePSP/scripts/download_training_dataset.py makes (CascadePSP/data/): '
      f'any of {", ".join(MIX_FOLDERS)} with <name>.jpg + <name>.png, and '
      f'{FSS_FOLDER}/<class>/<n>.jpg + <n>.png.')

  def _read_source(self, manual_dir):
    folders = [manual_dir / name for name in MIX_FOLDERS if (manual_dir / name).is_dir()]
    fss = manual_dir / FSS_FOLDER
    if fss.is_dir():
      folders += sorted((path for path in fss.iterdir() if path.is_dir()), key=str)
    if not folders:
      raise builders.BuildError(f'{manual_dir} holds none of {", ".join(MIX_FOLDERS)} or '
                                f'{FSS_FOLDER}/<class>/: {self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    pairs = sorted((pair for path in folders for pair in _flat_pairs(manual_dir, path)),
                   key=lambda pair: pair.name)
    validation = set(range(0, len(pairs), VALIDATION_EVERY))
    splits = {'train': [pair for i, pair in enumerate(pairs) if i not in validation],
              'validation': [pairs[i] for i in sorted(validation)]}
    return builders.Source(splits, CLASS_NAMES)


def _tagged(path: epath.Path, tag: str) -> str | None:
  """The stem of `path` when its name without the suffix ends in `tag` (x_gt.png -> x)."""
  stem = path.stem
  return stem[:-len(tag)] if stem.endswith(tag) and len(stem) > len(tag) else None


def _triples(root: epath.Path, split_dir: epath.Path) -> list[MaskPair]:
  """<stem>_im.* + <stem>_gt.png (+ <stem>_seg.png) of one split folder, paired by stem."""
  files = list(split_dir.iterdir())

  def tagged(tag, suffixes):
    return [(_tagged(path, tag), path) for path in files
            if _tagged(path, tag) and path.suffix.lower() in suffixes]

  inputs = dict(tagged(INPUT_TAG, ('.png',)))
  pairs = builders.pair_by_stem(root, tagged(IMAGE_TAG, builders.IMAGE_SUFFIXES),
                                tagged(MASK_TAG, ('.png',)))
  # A pair is named by its image, or by its mask when the image is missing.
  stems = [_tagged(epath.Path(pair.name), IMAGE_TAG) or _tagged(epath.Path(pair.name), MASK_TAG)
           for pair in pairs]
  return [MaskPair(**vars(pair), input_mask=inputs.get(stem)) for pair, stem in zip(pairs, stems)]


def _inputs_digest(root: epath.Path, source: builders.Source) -> str:
  """`builders.source_digest` of the coarse input files: which are given, their sizes and
  times (the images' and masks' are in the build's own digest)."""
  inputs = {split: [builders.Pair(pair.name, pair.input_mask, None) for pair in pairs]
            for split, pairs in source.splits.items()}
  return builders.source_digest(root, builders.Source(inputs, ()))


class MaskFolder(MaskBuilder):
  """A folder of images, ground-truth masks and optional coarse input masks (see `masks`)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': '<split>/<stem>_im.*, <stem>_gt.png, optional <stem>_seg.png.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'A folder with any of {", ".join(MASK_FOLDER_SPLITS)}/, each holding <stem>_im.jpg (or '
      f'another image format), <stem>_gt.png (grey mask) and optionally <stem>_seg.png (the '
      f'coarse mask to refine), the layout of the official BIG and relabeled PASCAL sets.')

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._input_digest = None

  def _read_source(self, manual_dir):
    present = [split for split in MASK_FOLDER_SPLITS if (manual_dir / split).is_dir()]
    if not present:
      raise builders.BuildError(f'{manual_dir} has none of the folders '
                                f'{", ".join(MASK_FOLDER_SPLITS)}: '
                                f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return builders.Source({split: _triples(manual_dir, manual_dir / split) for split in present},
                           CLASS_NAMES)

  # A rebuild is due when the coarse inputs change too: their digest goes into the report.
  def _split_generators(self, dl_manager):
    generators = super()._split_generators(dl_manager)
    # Before any example is read (the generators have not started), as the source digest.
    manual_dir = epath.Path(dl_manager.manual_dir)
    self._input_digest = _inputs_digest(manual_dir, self._read_source(manual_dir))
    return generators

  def _generate(self, manual_dir):
    report = super()._generate(manual_dir)
    report['input_digest'] = self._input_digest
    self.report_path.write_text(json.dumps(report, indent=1))
    return report

  def _check_source(self, manual_dir):
    super()._check_source(manual_dir)
    if (self.report() or {}).get('input_digest') != _inputs_digest(
        manual_dir, self._read_source(manual_dir)):
      raise builders.SourceChanged(
          f'the coarse input masks (*{INPUT_TAG}.png) under {manual_dir} changed since the build '
          f'in {self.data_dir} was made from them: the build is stale; rebuild it with '
          f'--overwrite')

  @classmethod
  def for_config(cls, config, **kwargs) -> 'MaskFolder':
    """The builder of config.data.folder_dir's masks in config.data.data_dir (kwargs: strict)."""
    if not config.data.folder_dir:
      raise ValueError("config.data.name='mask_folder' needs config.data.folder_dir (the folder "
                       "that prepare built from)")
    builder_config = tfds.core.BuilderConfig(name=folder.config_name(config.data.folder_dir),
                                             version=cls.VERSION)
    return cls(config=builder_config, data_dir=config.data.data_dir, **kwargs)


# ---------------------------------------------------------------------------------------------
# The generated dataset.

# How far the object's colour is from the background's (RGB distance): the outline is plain
# to see, a few times what the background's blotches vary by, so that a small module
# trained from scratch on a CPU learns to follow it in minutes.
_COLOUR_DISTANCE = (60.0, 100.0)
_PIXEL_NOISE = 3.0
# Smaller images leave the object a few pixels, which the perturbation erases.
_MIN_SIDE = 32


def _object_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A blob of smooth outline (a wobbly circle) joined with a polygon of 3-5 sharp corners."""
  side = min(height, width)
  centre = np.array([rng.uniform(0.35, 0.65) * width, rng.uniform(0.35, 0.65) * height])
  radius = rng.uniform(0.18, 0.3) * side
  angles = np.linspace(0.0, 2 * np.pi, 90, endpoint=False)
  wobble = sum(rng.uniform(0.0, 0.12) * np.cos(k * angles + rng.uniform(0.0, 2 * np.pi))
               for k in (2, 3, 4))
  blob = centre + (radius * (1 + wobble))[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
  corners = np.sort(rng.uniform(0.0, 2 * np.pi, int(rng.integers(3, 6))))
  reach = radius * rng.uniform(0.8, 1.5, len(corners))[:, None]
  polygon = (centre + rng.uniform(-0.3, 0.3, 2) * radius
             + reach * np.stack([np.cos(corners), np.sin(corners)], 1))
  mask = np.zeros((height, width), np.uint8)
  # One at a time: fillPoly of both at once would leave their overlap empty (even-odd).
  for outline in (blob, polygon):
    cv2.fillPoly(mask, [np.rint(outline).astype(np.int32)], 255)
  return mask


def render_object(rng: np.random.Generator, height: int,
                  width: int) -> tuple[np.ndarray, np.ndarray]:
  """One example: (image uint8 HxWx3 RGB, mask uint8 HxW in {0, 255})."""
  # One stream per layer, as `synthetic.render_example`: a change to how one layer draws
  # leaves the others as they were.
  shape_rng, colour_rng, texture_rng, noise_rng = (np.random.default_rng(s)
                                                   for s in rng.integers(2**63, size=4))
  mask = _object_mask(shape_rng, height, width)
  background = colour_rng.uniform(50.0, 205.0, 3)
  direction = colour_rng.normal(size=3)
  foreground = np.clip(background + colour_rng.uniform(*_COLOUR_DISTANCE) * direction
                       / np.linalg.norm(direction), 0.0, 255.0)
  rows, cols = np.mgrid[:height, :width].astype(np.float32)
  # Background: blotches at two scales. Object: fainter blotches and stripes of a random
  # period and direction, so texture tells them apart as well as colour.
  back = (background + 18.0 * synthetic.smooth_noise(texture_rng, height, width, 4)
          + 8.0 * synthetic.smooth_noise(texture_rng, height, width, 12))
  angle, period = texture_rng.uniform(0.0, np.pi), texture_rng.uniform(4.0, 9.0)
  stripes = np.sin(2 * np.pi * (cols * np.cos(angle) + rows * np.sin(angle)) / period)
  front = (foreground + 8.0 * stripes[..., None]
           + 8.0 * synthetic.smooth_noise(texture_rng, height, width, 6))
  image = np.where(mask[..., None] > 0, front, back).astype(np.float32)
  # A camera's softness: the outline spreads over a pixel or two, as in photographs.
  image = cv2.GaussianBlur(image, (3, 3), 0)
  image += noise_rng.normal(0.0, _PIXEL_NOISE, image.shape)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


@dataclasses.dataclass(eq=False)
class SyntheticMasksConfig(tfds.core.BuilderConfig):
  """Generation parameters; `for_config` puts all of them into the name (the folder on disk)."""
  seed: int = 0
  num_train: int = 400
  num_validation: int = 100
  min_size: int = 96
  max_size: int = 160

  @classmethod
  def for_config(cls, config) -> 'SyntheticMasksConfig':
    """From config.seed and config.data.synthetic (num_train, num_validation, min_size,
    max_size), the keys of the other generated dataset."""
    name, params = synthetic.generation_params(config, min_side=_MIN_SIDE,
                                               dataset='synthetic_masks')
    return cls(name=name, version=SyntheticMasks.VERSION, **params)


class SyntheticMasks(builders.LocalBuild, tfds.core.GeneratorBasedBuilder):
  """Generated refinement examples: one textured object per image (TFDS name `synthetic_masks`)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'One blob-and-polygon object per image, coarse inputs per example.',
                   '1.1.0': 'Object colours 60-100 (was 35-60) from the background.'}

  @classmethod
  def for_config(cls, config) -> 'SyntheticMasks':
    """The builder of `config`'s parameters in config.data.data_dir, not built yet."""
    return cls(config=SyntheticMasksConfig.for_config(config), data_dir=config.data.data_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=_features('png'))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    params = self.builder_config
    return {'train': self._generate_examples('train', params.num_train),
            'validation': self._generate_examples('validation', params.num_validation)}

  def _generate_examples(self, split, count):
    params = self.builder_config
    for index in range(count):
      rng = synthetic.example_rng(params.seed, split, index)
      height, width = (int(v) for v in rng.integers(params.min_size, params.max_size + 1, size=2))
      image_rng, input_rng = (np.random.default_rng(s) for s in rng.integers(2**63, size=2))
      image, mask = render_object(image_rng, height, width)
      file_name = f'{split}/{index:06d}.png'
      # OpenCV writes BGR arrays as RGB files.
      yield file_name, {'image': builders.png(image[..., ::-1]), 'mask': builders.png(mask),
                        'input_mask': builders.png(coarse_input(mask, input_rng)),
                        'file_name': file_name}

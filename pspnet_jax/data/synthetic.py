"""A procedural scene-parsing dataset where two classes differ only by distant global context.

The PSPNet paper motivates pyramid pooling with a boat that a local model calls
a car: the object alone is ambiguous, the water around it is not. This dataset
reproduces that failure in miniature, small enough to train on a CPU:

  0 ground   neutral mottled texture, the background of every image
  1 water    harbour scenes: a rippled blue band along one image edge
  2 road     street scenes: a grey band with dashed lane marks along one edge
  3 boat     harbour scenes only
  4 car      street scenes only
  5 tree     overlapping green discs, any scene, anywhere
  6 marker   a few 3-8 px squares or discs, any scene, anywhere (small objects)
  255        an ellipse of random colours that the loss and metrics ignore

The band covers 10-15% of the side it runs along. Boats and cars are drawn by
the same code from the same random stream (a hull trapezoid under a cabin, one
of a few colours, a window stripe) and lie entirely in the 40% of the image
farthest from the band, so at least 45% of the image separates every
boat/car pixel from the only pixels that tell the two apart. A model whose
receptive field or context aggregation does not reach that far can do no
better than guess between classes 3 and 4 (`CONTEXT_CLASSES`).

Every example is a pure function of (seed, split, index), and every layer of a
scene draws from its own random stream, so `render_example` with the scene
forced the other way changes the band and the boat/car label and nothing
else: that is how the tests prove boats and cars look alike.

The dataset is a TFDS `GeneratorBasedBuilder` written as ArrayRecord, so it
goes through the loader of the real datasets. Its `BuilderConfig` name encodes
seed, sizes and counts, so different parameters never share files. On
several hosts, give each its own `data.data_dir` (or build once beforehand):
TFDS builds into a temporary folder and renames it, but two hosts racing on
one shared folder is not something it arbitrates. An object store (gs://)
takes a copy of a local build (`builders.LocalBuild`).
"""

import dataclasses

import cv2
import numpy as np
import tensorflow_datasets as tfds

from pspnet_jax.data import builders, labels

CLASS_NAMES = ('ground', 'water', 'road', 'boat', 'car', 'tree', 'marker')
NUM_CLASSES = len(CLASS_NAMES)
# The pair that only the global scene tells apart.
CONTEXT_CLASSES = (3, 4)
# scene -> (band class, vehicle class)
SCENES = {'harbour': (1, 3), 'street': (2, 4)}
# Part of the per-example seed, so train and validation never share an image.
SPLIT_IDS = {'train': 0, 'validation': 1}

_GROUND = (125.0, 115.0, 95.0)
_WATER = (35.0, 85.0, 150.0)
_ROAD = (78.0, 78.0, 84.0)
_LANE = (230.0, 210.0, 90.0)
_TREE = (45.0, 120.0, 45.0)
_MARKER = (210.0, 60.0, 200.0)
# Boat/car hull colours: none of them close to the water or road colour, so the
# band stays the only cue.
_VEHICLE_COLOURS = ((215.0, 55.0, 45.0), (235.0, 195.0, 60.0), (235.0, 235.0, 230.0),
                    (200.0, 115.0, 40.0))
_PIXEL_NOISE = 5.0


def smooth_noise(rng, height, width, cells):
  """Low-frequency texture in about [-1, 1]: a coarse random grid, bilinearly upsampled."""
  grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
  return cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR)[..., None]


def _paint(image, label, mask, cls, colour):
  mask = mask.astype(bool)
  image[mask] = colour[mask] if np.ndim(colour) == 3 else colour
  label[mask] = cls


def _far_part(edge, height, width):
  """(row0, row1, col0, col1) of the image's far 40% from the band's edge."""
  near_rows, near_cols = height * 3 // 5, width * 3 // 5
  if edge == 0:  # band at the top
    return near_rows, height, 0, width
  if edge == 1:  # bottom
    return 0, height - near_rows, 0, width
  if edge == 2:  # left
    return 0, height, near_cols, width
  return 0, height, 0, width - near_cols  # right


def _vehicle_mask(rng, region, height, width):
  """One boat/car silhouette inside `region`, and the mask of its window stripe."""
  row0, row1, col0, col1 = region
  length = max(6, int(rng.uniform(0.2, 0.35) * min(height, width)))
  length = min(length, col1 - col0)
  tall = min(max(4, int(length * rng.uniform(0.4, 0.55))), row1 - row0)
  top = int(rng.integers(row0, row1 - tall + 1))
  left = int(rng.integers(col0, col1 - length + 1))
  right, bottom = left + length - 1, top + tall - 1
  deck = top + tall * 2 // 5
  inset = max(1, length // 6)
  hull = np.array([[left, deck], [right, deck], [right - inset, bottom], [left + inset, bottom]],
                  np.int32)
  cabin_start = rng.uniform(0.15, 0.45)
  cabin_left = left + int(cabin_start * length)
  cabin_right = left + int((cabin_start + 0.4) * length)
  if rng.random() < 0.5:  # cabin towards either end
    cabin_left, cabin_right = right - (cabin_right - left), right - (cabin_left - left)
  mask = np.zeros((height, width), np.uint8)
  cv2.fillPoly(mask, [hull], 1)
  cv2.rectangle(mask, (cabin_left, top), (cabin_right, deck), 1, thickness=-1)
  window = np.zeros_like(mask)
  window_row = (top + deck) // 2
  cv2.rectangle(window, (cabin_left + 1, window_row), (cabin_right - 1, window_row), 1,
                thickness=-1)
  return mask, window


def render_example(rng: np.random.Generator, height: int, width: int, *,
                   scene: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One scene: (image uint8 HxWx3 RGB, label uint8 HxW); `scene` forces harbour/street."""
  # One stream per layer: forcing the scene (or changing how one layer draws)
  # leaves every other layer's pixels as they were.
  (layout_rng, ground_rng, band_rng, ignore_rng, tree_rng, vehicle_rng, marker_rng,
   noise_rng) = (np.random.default_rng(s) for s in rng.integers(2**63, size=8))
  drawn_scene = 'harbour' if layout_rng.random() < 0.5 else 'street'
  scene = scene or drawn_scene
  band_class, vehicle_class = SCENES[scene]
  edge = int(layout_rng.integers(4))
  band_fraction = layout_rng.uniform(0.1, 0.15)
  min_side = min(height, width)

  rows, cols = np.mgrid[:height, :width]
  # Distance from the band's edge, the band's thickness axis, and the coordinate along it.
  depth, side, along = {0: (rows, height, cols), 1: (height - 1 - rows, height, cols),
                        2: (cols, width, rows), 3: (width - 1 - cols, width, rows)}[edge]

  image = np.empty((height, width, 3), np.float32)
  label = np.zeros((height, width), np.uint8)
  image[:] = (np.asarray(_GROUND) + 18.0 * smooth_noise(ground_rng, height, width, 6)
              + 6.0 * smooth_noise(ground_rng, height, width, 12))

  thickness = max(2, int(band_fraction * side))
  band = depth < thickness
  if scene == 'harbour':
    period = band_rng.uniform(3.0, 6.0)
    ripples = np.sin(2 * np.pi * depth / period + band_rng.uniform(0, 2 * np.pi))[..., None]
    colour = np.asarray(_WATER) + 20.0 * ripples + 10.0 * smooth_noise(band_rng, height, width, 8)
  else:
    colour = np.broadcast_to(np.asarray(_ROAD) + 12.0 * band_rng.standard_normal(
        (height, width, 1)), (height, width, 3)).copy()
    dash = int(band_rng.integers(3, 7))
    lane = ((np.abs(depth - thickness // 2) <= max(0, thickness // 8))
            & ((along + int(band_rng.integers(dash))) // dash % 2 == 0))
    colour[lane] = _LANE
  _paint(image, label, band, band_class, colour.astype(np.float32))

  if ignore_rng.random() < 0.8:
    mask = np.zeros((height, width), np.uint8)
    centre = (int(ignore_rng.integers(width)), int(ignore_rng.integers(height)))
    axes = tuple(max(2, int(ignore_rng.uniform(0.05, 0.15) * s)) for s in (width, height))
    cv2.ellipse(mask, centre, axes, ignore_rng.uniform(0, 180), 0, 360, 1, thickness=-1)
    _paint(image, label, mask, labels.IGNORE_LABEL,
           ignore_rng.uniform(0, 255, (height, width, 3)))

  for _ in range(int(tree_rng.integers(0, 3))):
    mask = np.zeros((height, width), np.uint8)
    cx, cy = int(tree_rng.integers(width)), int(tree_rng.integers(height))
    radius = max(2, int(tree_rng.uniform(0.04, 0.08) * min_side))
    for _ in range(int(tree_rng.integers(3, 6))):
      offset = tree_rng.integers(-radius, radius + 1, size=2)
      cv2.circle(mask, (cx + int(offset[0]), cy + int(offset[1])), radius, 1, thickness=-1)
    colour = np.asarray(_TREE) + 30.0 * smooth_noise(tree_rng, height, width, 16)
    _paint(image, label, mask, 5, colour.astype(np.float32))

  region = _far_part(edge, height, width)
  for _ in range(int(vehicle_rng.integers(1, 3))):
    mask, window = _vehicle_mask(vehicle_rng, region, height, width)
    colour = np.asarray(_VEHICLE_COLOURS[int(vehicle_rng.integers(len(_VEHICLE_COLOURS)))])
    shade = np.where(window[..., None] > 0, 0.45, 1.0) * colour
    _paint(image, label, mask, vehicle_class, np.broadcast_to(shade, (height, width, 3)))

  for _ in range(int(marker_rng.integers(2, 7))):
    mask = np.zeros((height, width), np.uint8)
    size = int(marker_rng.integers(3, 9))
    x, y = int(marker_rng.integers(width - size + 1)), int(marker_rng.integers(height - size + 1))
    if marker_rng.random() < 0.5:
      cv2.rectangle(mask, (x, y), (x + size - 1, y + size - 1), 1, thickness=-1)
    else:
      cv2.circle(mask, (x + size // 2, y + size // 2), size // 2, 1, thickness=-1)
    _paint(image, label, mask, 6, _MARKER)

  image += noise_rng.normal(0.0, _PIXEL_NOISE, image.shape)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of example `index` of `split` for dataset seed `seed`."""
  return np.random.default_rng([seed, SPLIT_IDS[split], index])


def generation_params(config, *, min_side: int, dataset: str) -> tuple[str, dict]:
  """(BuilderConfig name, parameters) of a generated dataset from config.seed and
  config.data.synthetic (num_train, num_validation, min_size, max_size): every parameter goes
  into the name, so different ones never share files. Raises ValueError naming the key for
  sizes below `min_side` or out of order and for a negative seed (`dataset` names the
  dataset in that message)."""
  synthetic = config.data.synthetic
  params = dict(seed=config.seed, num_train=synthetic.num_train,
                num_validation=synthetic.num_validation, min_size=synthetic.min_size,
                max_size=synthetic.max_size)
  if not min_side <= params['min_size'] <= params['max_size']:
    raise ValueError(f'config.data.synthetic.min_size={params["min_size"]} and max_size='
                     f'{params["max_size"]}: need {min_side} <= min_size <= max_size')
  if params['seed'] < 0:
    raise ValueError(f'config.seed={params["seed"]}: {dataset} needs a seed >= 0')
  name = ('seed{seed}-train{num_train}-val{num_validation}-size{min_size}-{max_size}'
          .format(**params))
  return name, params


@dataclasses.dataclass(eq=False)
class SyntheticContextConfig(tfds.core.BuilderConfig):
  """Generation parameters; `for_config` puts all of them into the name (the folder on disk)."""
  seed: int = 0
  num_train: int = 400
  num_validation: int = 100
  min_size: int = 129
  max_size: int = 257

  @classmethod
  def for_config(cls, config) -> 'SyntheticContextConfig':
    name, params = generation_params(config, min_side=1, dataset='the synthetic dataset')
    return cls(name=name, version=SyntheticContext.VERSION, **params)


class SyntheticContext(builders.LocalBuild, tfds.core.GeneratorBasedBuilder):
  """The context dataset as a TFDS builder (TFDS name `synthetic_context`)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Boats and cars told apart by a distant water or road band.'}

  @classmethod
  def for_config(cls, config) -> 'SyntheticContext':
    """The builder of `config`'s parameters in config.data.data_dir, not built yet."""
    return cls(config=SyntheticContextConfig.for_config(config), data_dir=config.data.data_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
            'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'file_name': tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    params = self.builder_config
    return {'train': self._generate_examples('train', params.num_train),
            'validation': self._generate_examples('validation', params.num_validation)}

  def _generate_examples(self, split, count):
    params = self.builder_config
    for index in range(count):
      rng = example_rng(params.seed, split, index)
      height, width = (int(v) for v in rng.integers(params.min_size, params.max_size + 1, size=2))
      image, label = render_example(rng, height, width)
      file_name = f'{split}/{index:06d}.png'
      # PNG bytes from OpenCV (BGR order on disk, as OpenCV writes and TFDS's
      # OpenCV decoder reads) are much faster than TFDS's TensorFlow encoder.
      yield file_name, {'image': _png(image[..., ::-1]), 'label': _png(label),
                        'file_name': file_name}


def _png(array: np.ndarray) -> bytes:
  ok, encoded = cv2.imencode('.png', np.ascontiguousarray(array))
  assert ok, 'OpenCV failed to encode a PNG'
  return encoded.tobytes()


def prepare(config) -> SyntheticContext:
  """The builder for `config` (seed, data.synthetic.*), built into data.data_dir on first use."""
  builder = SyntheticContext.for_config(config)
  # A no-op when this exact configuration is already on disk.
  builder.download_and_prepare(file_format='array_record')
  return builder

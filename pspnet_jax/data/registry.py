"""The supported datasets, one entry each: what the rest of the code asks about a dataset.

`DATASETS` maps `config.data.name` to a `Dataset`: its TFDS builder class (and
through it the TFDS name and the official split sizes the builder validates
against), its class names and palette (the tables are transcribed in `meta`),
the numbers of its official training recipe that the configs use, and the
other names users know it by. The loader (`pipeline`), the prepare command,
the configs and training all read this table, so a new dataset is a builder
module, its names in `meta`, one entry here and a one-line `configs/<name>.py`.

A folder dataset (`folder`) brings its own class names: `class_names(config)`
reads them from its build report, which keeps them after the source folder is
gone, or else from the folder's classes.txt.

The CascadePSP datasets (`masks`: cascadepsp_mix, mask_folder, synthetic_masks)
hold binary masks, classes background and foreground, and share
configs/cascadepsp.py.
"""

import dataclasses
import shlex

import numpy as np
import tensorflow_datasets as tfds

from pspnet_jax.data import ade20k, builders, cityscapes, folder, masks, meta, synthetic, voc_aug
from pspnet_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The dataset-dependent numbers of the official recipe (semseg's config/<dataset>/*.yaml)."""
  crop_size: int
  num_epochs: int
  # Sliding-window evaluation resizes the long side to scale * eval_base_size.
  eval_base_size: int
  # mmseg's RandomResize box (_base_/datasets/<dataset>.py), for data.augment.recipe='mmseg'.
  mmseg_base_scale: tuple[int, int] = (2048, 512)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One supported dataset; `name` is its config.data.name."""
  name: str
  # The TFDS builder class; `builder(config)` makes one with `builder.for_config`.
  builder: type[tfds.core.DatasetBuilder]
  # Index k names class k; None: the dataset brings its own (`builder.class_names_for`).
  class_names: tuple[str, ...] | None
  # (classes, 3) uint8 RGB, read-only; None: the VOC palette of the dataset's class count.
  palette: np.ndarray | None
  # None: no official recipe, the schema's defaults (configs/default.py) apply.
  recipe: Recipe | None
  # The config file that trains on it; None: configs/default.py with the dataset's keys.
  config_file: str | None
  # Other names `python -m pspnet_jax.data.prepare --dataset=` accepts for it.
  aliases: tuple[str, ...] = ()
  # True: built per config.data.folder_dir (one TFDS BuilderConfig per folder).
  per_folder: bool = False

  @property
  def tfds_name(self) -> str:
    return self.builder.name

  @property
  def official_sizes(self) -> dict[str, int]:
    """{split: examples} of the official release, which the builder validates against."""
    return dict(getattr(self.builder, 'OFFICIAL_SIZES', {}))

  @property
  def num_classes(self) -> int | None:
    return None if self.class_names is None else len(self.class_names)

  @property
  def generated(self) -> bool:
    """True: generated into data_dir on first use; False: built from files by prepare."""
    return not issubclass(self.builder, builders.ValidatingBuilder)


def _read_only(array: np.ndarray) -> np.ndarray:
  array.flags.writeable = False
  return array


def _named(name: str, builder, recipe: Recipe | None, config_file: str,
           aliases: tuple[str, ...] = ()) -> Dataset:
  """An entry whose names and palette are `meta`'s tables."""
  return Dataset(name, builder, meta.class_names(name), _read_only(meta.palette(name)), recipe,
                 config_file, aliases)


def _masks(name: str, builder, per_folder: bool = False) -> Dataset:
  """An entry of a CascadePSP mask dataset (`masks`)."""
  return Dataset(name, builder, masks.CLASS_NAMES, _read_only(masks.PALETTE.copy()), None,
                 'configs/cascadepsp.py', per_folder=per_folder)


DATASETS = {dataset.name: dataset for dataset in (
    _named('synthetic', synthetic.SyntheticContext, None, 'configs/demo.py'),
    _named('ade20k', ade20k.Ade20kSemseg, Recipe(crop_size=473, num_epochs=100,
                                                 eval_base_size=512), 'configs/ade20k.py'),
    _named('cityscapes', cityscapes.CityscapesSemseg,
           Recipe(crop_size=713, num_epochs=200, eval_base_size=2048,
                  mmseg_base_scale=(2048, 1024)), 'configs/cityscapes.py'),
    _named('voc2012', voc_aug.Voc2012Semseg, Recipe(crop_size=473, num_epochs=50,
                                                    eval_base_size=512), 'configs/voc2012.py',
           aliases=('voc_aug',)),
    Dataset('folder', folder.FolderSemseg, class_names=None, palette=None, recipe=None,
            config_file=None, per_folder=True),
    _masks('cascadepsp_mix', masks.CascadepspMix),
    _masks('mask_folder', masks.MaskFolder, per_folder=True),
    _masks('synthetic_masks', masks.SyntheticMasks),
)}
# Another name -> config.data.name.
ALIASES = {alias: dataset.name for dataset in DATASETS.values() for alias in dataset.aliases}


def get(name: str) -> Dataset:
  """The entry of config.data.name `name` (or one of its aliases)."""
  dataset = DATASETS.get(ALIASES.get(name, name))
  if dataset is None:
    raise UserError(f'config.data.name={name!r}: must be one of {sorted(DATASETS)} (or an alias: '
                    f'{sorted(ALIASES)})')
  return dataset


def builder(config, **kwargs) -> tfds.core.DatasetBuilder:
  """The TFDS builder of config.data.name in config.data.data_dir, built or not (kwargs: strict)."""
  return get(config.data.name).builder.for_config(config, **kwargs)


def class_names(config) -> tuple[str, ...]:
  """The names of config.data.name's classes, index k naming class k.

  Raises ValueError when config.data.num_classes is not their number: the
  model would predict classes that have no name, or miss some.
  """
  dataset = get(config.data.name)
  names = dataset.class_names or dataset.builder.class_names_for(config)
  if config.data.num_classes != len(names):
    raise UserError(f'config.data.num_classes={config.data.num_classes}, but dataset '
                    f'{dataset.name!r} has {len(names)} classes: set '
                    f'--config.data.num_classes={len(names)}')
  return names


def palette(config) -> np.ndarray:
  """(classes, 3) uint8 RGB colours of config.data.name's classes; a fresh array to edit.

  Checks config.data.num_classes as `class_names` does.
  """
  dataset = get(config.data.name)
  count = len(class_names(config))
  return meta.voc_palette(count) if dataset.palette is None else dataset.palette.copy()


# configs/default.py's train.batch_size and eval.batch_size (semseg's global batch), which
# every dataset's config keeps.
RECIPE_BATCH_SIZE = 16


def small_set_batch_sizes(num_train: int, num_devices: int) -> dict[str, int]:
  """The batch-size overrides that training on `num_train` images over `num_devices` needs.

  Training takes global batches of at most the training images (`pipeline.GlobalOrder`)
  that split evenly over the devices (`sharding.local_batch_size`, for train.batch_size and
  eval.batch_size alike). With RECIPE_BATCH_SIZE or more images nothing changes; with fewer,
  train.batch_size becomes the largest multiple of the devices within the images (absent
  when the images are fewer than the devices: no batch fits) and eval.batch_size a multiple
  of the devices near the recipe's.
  """
  if num_train >= RECIPE_BATCH_SIZE:
    return {}
  sizes = {}
  batch = num_train // num_devices * num_devices
  if batch:
    sizes['train.batch_size'] = batch
  eval_batch = max(num_devices, RECIPE_BATCH_SIZE // num_devices * num_devices)
  if eval_batch != RECIPE_BATCH_SIZE:
    sizes['eval.batch_size'] = eval_batch
  return sizes


def training_flags(config, num_classes: int, *, num_train: int | None = None,
                   num_devices: int = 1) -> str:
  """The pspnet_jax.main flags that train on the built dataset `config` (data.*) names.

  `num_train`: the images of its train split; fewer than RECIPE_BATCH_SIZE add the batch
  sizes that fit them on `num_devices` devices (`small_set_batch_sizes`).
  """
  dataset = get(config.data.name)
  # Without a config file: the schema's defaults (semseg's recipe, crop 473).
  config_file = dataset.config_file or 'configs/default.py'
  arguments = [f'--config={config_file}']
  # A dataset's own config file trains on it; a shared one (or the schema) is told which.
  if config_file != f'configs/{dataset.name}.py':
    arguments.append(f'--config.data.name={dataset.name}')
  if dataset.per_folder:
    arguments.append(f'--config.data.folder_dir={config.data.folder_dir}')
  if dataset.class_names is None:
    arguments.append(f'--config.data.num_classes={num_classes}')
  if config.data.data_dir:
    arguments.append(f'--config.data.data_dir={config.data.data_dir}')
  if num_train is not None:
    arguments += [f'--config.{key}={value}'
                  for key, value in small_set_batch_sizes(num_train, num_devices).items()]
  # Quoted, so that a folder name with spaces pastes into a shell as one flag.
  return ' '.join(map(shlex.quote, arguments))

"""Class names, palettes and the Cityscapes labelId -> trainId table against the official lists;
the dataset registry that indexes them, complete and consistent with the configs."""

import importlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pspnet_jax.data import builders, masks, meta, registry, synthetic

COUNTS = {'ade20k': 150, 'cityscapes': 19, 'voc2012': 21, 'synthetic': 7}


@pytest.mark.parametrize('name', sorted(COUNTS))
def test_names_and_palettes_have_one_entry_per_class(name):
  names, colours = meta.class_names(name), meta.palette(name)
  assert len(names) == COUNTS[name] and len(set(names)) == COUNTS[name]
  assert all(isinstance(n, str) and n == n.strip() and n for n in names)
  assert colours.shape == (COUNTS[name], 3) and colours.dtype == np.uint8


@pytest.mark.parametrize('name', ['cityscapes', 'voc2012', 'synthetic'])
def test_palettes_have_distinct_colours(name):
  assert len(np.unique(meta.palette(name), axis=0)) == COUNTS[name]


def test_ade_palette_repeats_only_the_published_grey():
  colours, counts = np.unique(meta.palette('ade20k'), axis=0, return_counts=True)
  np.testing.assert_array_equal(colours[counts > 1], [[140, 140, 140]])
  repeated = np.flatnonzero((meta.palette('ade20k') == 140).all(1))
  assert [meta.class_names('ade20k')[i] for i in repeated] == ['road', 'skyscraper']


@pytest.mark.parametrize('name,index,expected', [
    ('ade20k', 0, 'wall'), ('ade20k', 2, 'sky'), ('ade20k', 12, 'person'),
    ('ade20k', 20, 'car'), ('ade20k', 149, 'flag'),
    ('cityscapes', 0, 'road'), ('cityscapes', 10, 'sky'), ('cityscapes', 13, 'car'),
    ('cityscapes', 18, 'bicycle'),
    ('voc2012', 0, 'background'), ('voc2012', 1, 'aeroplane'), ('voc2012', 15, 'person'),
    ('voc2012', 20, 'tvmonitor'),
])
def test_spot_names(name, index, expected):
  assert meta.class_names(name)[index] == expected


def test_synthetic_names_are_the_datasets():
  assert meta.class_names('synthetic') == tuple(synthetic.CLASS_NAMES)


def test_spot_colours():
  assert tuple(meta.palette('ade20k')[0]) == (120, 120, 120)
  assert tuple(meta.palette('ade20k')[149]) == (92, 0, 255)
  assert tuple(meta.palette('cityscapes')[0]) == (128, 64, 128)
  assert tuple(meta.palette('cityscapes')[18]) == (119, 11, 32)


def test_voc_palette_matches_the_hand_written_entries():
  voc = meta.palette('voc2012')
  expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
              8: (64, 0, 0), 15: (192, 128, 128), 20: (0, 64, 128)}
  for index, colour in expected.items():
    assert tuple(voc[index]) == colour
  # The 256-entry palette of the VOC PNGs ends with the boundary colour of label 255.
  assert tuple(meta.voc_palette(256)[255]) == (224, 224, 192)


def test_cityscapes_label_to_train():
  table = meta.CITYSCAPES_LABEL_TO_TRAIN
  assert table.shape == (256,) and table.dtype == np.uint8
  assert table[7] == 0 and table[26] == 13 and table[33] == 18
  assert table[0] == 255 and table[9] == 255 and table[34] == 255 and table[255] == 255
  # Each of the 19 trainIds comes from exactly one labelId.
  assert sorted(table[table != 255]) == list(range(19))
  label_ids = np.array([[7, 8], [26, 3]], np.uint8)
  np.testing.assert_array_equal(table[label_ids], [[0, 1], [13, 255]])


def test_palette_is_a_copy():
  meta.palette('voc2012')[1] = 0
  assert tuple(meta.palette('voc2012')[1]) == (128, 0, 0)


def test_unknown_dataset_is_rejected():
  with pytest.raises(ValueError, match='known: ade20k'):
    meta.class_names('coco')
  with pytest.raises(ValueError, match='coco'):
    meta.palette('coco')


def dataset_config(dataset):
  """The config of `dataset`'s own config file."""
  module = dataset.config_file.removesuffix('.py').replace('/', '.')
  return importlib.import_module(module).get_config()


@pytest.mark.parametrize('name', sorted(registry.DATASETS))
def test_every_dataset_has_a_builder_and_matching_names_and_palette(name):
  dataset = registry.get(name)
  assert dataset.name == name
  assert issubclass(dataset.builder, tfds.core.DatasetBuilder)
  assert callable(dataset.builder.for_config)
  if dataset.class_names is None:  # the folder: its own classes.txt
    assert dataset.palette is None and dataset.config_file is None
    return
  assert dataset.palette.shape == (dataset.num_classes, 3)
  config = dataset_config(dataset)
  if dataset.config_file == 'configs/cascadepsp.py':
    # CascadePSP's mask datasets: one config (its data.name the official training mix), two
    # classes, any of them selected by data.name.
    assert dataset.class_names == masks.CLASS_NAMES == ('background', 'foreground')
    assert config.task == 'refinement' and config.data.num_classes == 2
    config.data.name = name
    assert registry.class_names(config) == dataset.class_names
    return
  assert dataset.class_names == meta.class_names(name) and len(dataset.class_names) == COUNTS[name]
  assert config.data.name == name
  assert registry.class_names(config) == dataset.class_names
  np.testing.assert_array_equal(registry.palette(config), meta.palette(name))


def test_tfds_names_and_official_sizes():
  assert len({d.tfds_name for d in registry.DATASETS.values()}) == len(registry.DATASETS)
  sizes = {name: d.official_sizes for name, d in registry.DATASETS.items() if d.official_sizes}
  # The releases' split sizes (ADEChallengeData2016, Cityscapes gtFine, VOC train_aug / val).
  assert sizes == {'ade20k': {'train': 20210, 'validation': 2000},
                   'cityscapes': {'train': 2975, 'validation': 500},
                   'voc2012': {'train': 10582, 'validation': 1449}}
  # Only the synthetic datasets are generated; the others are validated builds from files.
  assert [d.name for d in registry.DATASETS.values() if d.generated] == ['synthetic',
                                                                          'synthetic_masks']
  assert all(issubclass(d.builder, builders.ValidatingBuilder)
             for d in registry.DATASETS.values() if not d.generated)


def test_aliases_and_unknown_names():
  assert registry.get('voc_aug') is registry.get('voc2012')
  with pytest.raises(ValueError, match="config.data.name='coco'"):
    registry.get('coco')


@pytest.mark.parametrize('name', ['ade20k', 'synthetic'])
def test_num_classes_other_than_the_datasets_is_refused_by_name(name):
  config = dataset_config(registry.get(name))
  config.data.num_classes = 5
  with pytest.raises(ValueError, match=rf'config\.data\.num_classes=5.* {COUNTS[name]} classes'):
    registry.class_names(config)


def test_registry_palette_is_a_copy():
  config = dataset_config(registry.get('voc2012'))
  registry.palette(config)[1] = 0
  assert tuple(registry.palette(config)[1]) == (128, 0, 0)
  with pytest.raises(ValueError, match='read-only'):
    registry.get('voc2012').palette[1] = 0

"""Class names, palettes and the Cityscapes labelId -> trainId table against the official lists."""

import numpy as np
import pytest

from pspnet_jax.data import meta, synthetic

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

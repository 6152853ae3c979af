"""The Cityscapes builder on a tiny fake release: pairing by stem, trainIds, exact images, skips.

The tree has the official layout (city subfolders, _leftImg8bit / _gtFine_labelIds
suffixes, the annotation files that are not labels) with 24x48 PNGs and labelIds
covering 0..33, plus a corrupt image, a size mismatch and an image without a label
in train; the fine build is made once per module.
"""

import json

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import cityscapes as cityscapes_config
from fake_datasets import build, file_name, read_split, write_image
from pspnet_jax.data import builders, cityscapes, meta

HEIGHT, WIDTH = 24, 48
# split folder -> {city: number of good pairs}.
GOOD = {'train': {'aachen': 3, 'bochum': 2}, 'val': {'frankfurt': 2, 'lindau': 1}}
# image path -> the reason the build must give for skipping it.
BAD = {
    'leftImg8bit/train/aachen/aachen_000090_000019_leftImg8bit.png': 'image does not decode',
    'leftImg8bit/train/aachen/aachen_000091_000019_leftImg8bit.png':
        'image is 24x48 but label is 20x48',
    'leftImg8bit/train/bochum/bochum_000099_000019_leftImg8bit.png': 'no label with this image',
}
# cityscapesScripts' labels.py: labelId -> trainId of the 19 evaluated classes; all else ignored.
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
             25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def check_labels(source, examples):
  """Asserts each example's label is the test's own remap of its label file; the pixel counts."""
  table = np.full(256, 255, np.uint8)
  for label_id, train_id in TRAIN_IDS.items():
    table[label_id] = train_id
  pixels = np.zeros(256, np.int64)
  for name, (_, label) in examples.items():
    label_file = name.replace('leftImg8bit', 'gtFine', 1).replace(
        '_leftImg8bit.png', '_gtFine_labelIds.png')
    expected = table[np.array(Image.open(source / label_file))]
    np.testing.assert_array_equal(label, expected, err_msg=name)
    pixels += np.bincount(expected.ravel(), minlength=256)
  return pixels


def write_pair(root, folder, city, stem, rng, label_height=HEIGHT):
  image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8)
  write_image(root / 'leftImg8bit' / folder / city / f'{stem}_leftImg8bit.png', image)
  label_ids = rng.integers(0, 34, (label_height, WIDTH), np.uint8)
  label_ids[0, :34] = np.arange(34)  # every labelId, the ignored ones (0, 1, 9, 14..16, ...) too
  labels = root / 'gtFine' / folder / city
  labels.mkdir(parents=True, exist_ok=True)
  Image.fromarray(label_ids, 'L').save(labels / f'{stem}_gtFine_labelIds.png')
  # The release's other annotation files must not be taken for labels.
  Image.fromarray(label_ids, 'L').save(labels / f'{stem}_gtFine_instanceIds.png')
  Image.fromarray(image).save(labels / f'{stem}_gtFine_color.png')
  (labels / f'{stem}_gtFine_polygons.json').write_text('{}')


def fake_cityscapes(root):
  rng = np.random.default_rng(0)
  for folder, cities in GOOD.items():
    for city, count in cities.items():
      for frame in range(count):
        write_pair(root, folder, city, f'{city}_{frame:06d}_000019', rng)
  write_pair(root, 'train', 'aachen', 'aachen_000090_000019', rng)
  corrupt = root / next(iter(BAD))
  corrupt.write_bytes(corrupt.read_bytes()[:100])
  write_pair(root, 'train', 'aachen', 'aachen_000091_000019', rng, label_height=20)
  write_pair(root, 'train', 'bochum', 'bochum_000099_000019', rng)
  (root / 'gtFine/train/bochum/bochum_000099_000019_gtFine_labelIds.png').unlink()
  return root


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  return build(tmp_path_factory, cityscapes.CityscapesSemseg, fake_cityscapes, 'cityscapes')


def test_counts_and_skip_report(built):
  _, data_dir, report = built
  assert report['dataset'] == 'cityscapes_semseg' and report['config'] is None
  assert report['splits'].keys() == {'train', 'validation'}
  train, validation = report['splits']['train'], report['splits']['validation']
  assert (train['found'], train['written'], train['skipped']) == (8, 5, 3)
  assert (validation['found'], validation['written'], validation['skipped']) == (3, 3, 0)
  assert (train['official'], validation['official']) == (2975, 500)
  reasons = {s['file']: s['reason'] for s in train['skipped_files']}
  assert reasons.keys() == BAD.keys()
  for name, reason in BAD.items():
    assert reason in reasons[name], (name, reasons[name])
  on_disk = json.loads((data_dir / 'cityscapes_semseg/1.0.0' / builders.REPORT_NAME)
                       .read_text())
  assert on_disk == report


def test_labels_are_train_ids_and_images_exact(built):
  source, data_dir, report = built
  config = cityscapes_config.get_config()
  config.data.data_dir = str(data_dir)
  examples = read_split(config, 'validation')
  raw = tfds.builder('cityscapes_semseg', data_dir=str(data_dir)).as_data_source(
      'validation', decoders={'image': tfds.decode.SkipDecoding()})
  assert len(examples) == len(raw) == 3
  for stored in raw:
    name = file_name(stored)
    assert name.startswith('leftImg8bit/val/') and stored['image'] == (source / name).read_bytes()
  assert examples.keys() == {file_name(stored) for stored in raw}
  class_pixels = check_labels(source, examples)
  assert report['splits']['validation']['class_pixels'] == dict(
      zip(meta.class_names('cityscapes'), class_pixels[:19].tolist()))


def test_strict_stops_at_the_corrupt_image(built, tmp_path):
  with pytest.raises(builders.BuildError,
                     match=r'leftImg8bit/train/aachen/aachen_000090_000019_leftImg8bit\.png: '
                     'image does not decode'):
    cityscapes.CityscapesSemseg(data_dir=str(tmp_path), strict=True).build(built[0])
  # No version folder is left behind: nothing to load.
  assert not list((tmp_path / 'cityscapes_semseg').glob('*/dataset_info.json'))

"""The VOC 2012 + SBD (train_aug) builder on tiny fake trees, with SBD as .mat files or as PNGs.

Each tree has the release's layout with 30x40 JPEGs: VOC labels are palette
PNGs (VOC palette, so stored colours differ from the class indices), SBD labels
are MATLAB GTcls.Segmentation structs or grey PNGs. The split lists overlap as
the real ones do (an SBD id in VOC train, another in VOC val). The .mat tree
has a corrupt JPEG, a label value 21 and an unreadable .mat; built once per module.
"""

import os

import cv2
import numpy as np
from PIL import Image
import pytest
import scipy.io

from configs import voc2012
from fake_datasets import build, read_split, run_prepare, write_image, write_label
from pspnet_jax.data import builders, labels, meta, registry, voc_aug

NUM_CLASSES = registry.get('voc2012').num_classes
HEIGHT, WIDTH = 30, 40
VOC = 'VOCdevkit/VOC2012'
VOC_TRAIN, VOC_VAL = ['a0', 'a1', 'a2'], ['v0', 'v1']
# a1 is in SBD too (its VOC label wins), v0 too (VOC val: never trained on).
SBD_TRAIN, SBD_VAL = ['a1', 's0', 's1', 'v0'], ['s2', 's3', 'a2']
# id -> the reason the build must give for skipping it.
BAD = {'s1': 'image does not decode', 's2': 'label values [21]',
       's3': 'label .mat does not decode'}


def write_list(path, lines):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join(f'{line}\n' for line in lines))


def random_label(rng):
  """Classes 0..20 with a row of boundary (255), as VOC and SBD labels have."""
  label = rng.integers(0, NUM_CLASSES, (HEIGHT, WIDTH), np.uint8)
  label[HEIGHT // 2] = labels.IGNORE_LABEL
  return label


def voc_colours():
  """The palette of VOC's label PNGs: the class colours, and the boundary colour for 255."""
  colours = np.zeros((256, 3), np.uint8)
  colours[:NUM_CLASSES] = meta.voc_palette(NUM_CLASSES)
  colours[labels.IGNORE_LABEL] = (224, 224, 192)
  return colours


def write_mat(path, label):
  path.parent.mkdir(parents=True, exist_ok=True)
  scipy.io.savemat(path, {'GTcls': {'Segmentation': label,
                                    'Boundaries': np.zeros((1, 1), np.uint8)}})


def fake_voc(root, rng):
  """VOC 2012's images, SegmentationClass and split lists for VOC and SBD's ids."""
  for id_ in sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL)):
    write_image(root / VOC / 'JPEGImages' / f'{id_}.jpg',
                rng.integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8))
  for id_ in VOC_TRAIN + VOC_VAL:
    write_label(root / VOC / 'SegmentationClass' / f'{id_}.png', random_label(rng), voc_colours())
  write_list(root / VOC / 'ImageSets/Segmentation/train.txt', VOC_TRAIN)
  write_list(root / VOC / 'ImageSets/Segmentation/val.txt', VOC_VAL)


def fake_sbd_mat(root):
  rng = np.random.default_rng(0)
  fake_voc(root, rng)
  cls = root / 'benchmark_RELEASE/dataset/cls'
  for id_ in SBD_TRAIN + SBD_VAL:
    write_mat(cls / f'{id_}.mat', random_label(rng))
  write_list(root / 'benchmark_RELEASE/dataset/train.txt', SBD_TRAIN)
  write_list(root / 'benchmark_RELEASE/dataset/val.txt', SBD_VAL)
  jpeg = root / VOC / 'JPEGImages/s1.jpg'
  jpeg.write_bytes(jpeg.read_bytes()[:200])
  label = random_label(rng)
  label[3, 4] = 21
  write_mat(cls / 's2.mat', label)
  (cls / 's3.mat').write_bytes(b'not a MATLAB file')
  return root


def read_label(path):
  """The class indices of a fake label file: PNG indices, or the .mat's GTcls.Segmentation."""
  if path.suffix == '.mat':
    return scipy.io.loadmat(path)['GTcls'][0, 0]['Segmentation']
  return np.array(Image.open(path))


def load(data_dir, split):
  """{id: (image, label)} of a built split, read back as training reads it."""
  config = voc2012.get_config()
  config.data.data_dir = str(data_dir)
  return {os.path.splitext(os.path.basename(name))[0]: example
          for name, example in read_split(config, split).items()}


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  return build(tmp_path_factory, voc_aug.Voc2012Semseg, fake_sbd_mat)


def test_fake_labels_are_stored_as_the_releases_store_them(built):
  source = built[0]
  voc = Image.open(source / VOC / 'SegmentationClass/a0.png')
  assert voc.mode == 'P'
  # Reading colours instead of indices would give other values.
  assert not np.array_equal(np.array(voc.convert('L')), np.array(voc))
  # The nesting of SBD's own files: a 1x1 struct array with a Segmentation field.
  mat = scipy.io.loadmat(source / 'benchmark_RELEASE/dataset/cls/s0.mat')
  assert mat['GTcls'].shape == (1, 1)
  assert mat['GTcls'][0, 0]['Segmentation'].shape == (HEIGHT, WIDTH)


def test_train_aug_membership_and_skip_report(built):
  _, data_dir, report = built
  train_ids = (set(VOC_TRAIN) | set(SBD_TRAIN) | set(SBD_VAL)) - set(VOC_VAL)
  train, validation = report['splits']['train'], report['splits']['validation']
  assert (train['found'], train['written'], train['skipped']) == (len(train_ids),
                                                                  len(train_ids) - len(BAD),
                                                                  len(BAD))
  assert train['official'] == 10582 and validation['official'] == 1449
  assert (validation['found'], validation['skipped']) == (len(VOC_VAL), 0)
  reasons = {os.path.basename(s['file']).split('.')[0]: s['reason'] for s in train['skipped_files']}
  assert reasons.keys() == BAD.keys()
  for id_, reason in BAD.items():
    assert reason in reasons[id_], (id_, reasons[id_])
  assert load(data_dir, 'train').keys() == train_ids - BAD.keys()
  assert load(data_dir, 'validation').keys() == set(VOC_VAL)


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_labels_are_the_source_indices(built, split):
  source, data_dir, _ = built
  for id_, (image, label) in load(data_dir, split).items():
    voc = source / VOC / 'SegmentationClass' / f'{id_}.png'
    expected = read_label(voc if voc.exists() else
                          source / 'benchmark_RELEASE/dataset/cls' / f'{id_}.mat')
    np.testing.assert_array_equal(label, expected, err_msg=id_)
    assert (label[HEIGHT // 2] == labels.IGNORE_LABEL).all()
    jpeg = np.fromfile(source / VOC / 'JPEGImages' / f'{id_}.jpg', np.uint8)
    np.testing.assert_array_equal(image, cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1])


def test_strict_stops_at_first_bad_file(built, tmp_path):
  with pytest.raises(builders.BuildError, match=r'JPEGImages/s1\.jpg: image does not decode'):
    voc_aug.Voc2012Semseg(data_dir=str(tmp_path), strict=True).build(built[0])
  assert list((tmp_path / 'voc2012_semseg').iterdir()) == []


@pytest.fixture(scope='module')
def aug_release(tmp_path_factory):
  """A tree with SBD as DeepLab's SegmentationClassAug PNGs and train_aug.txt."""
  root = tmp_path_factory.mktemp('aug') / 'src'
  rng = np.random.default_rng(1)
  fake_voc(root, rng)
  for id_ in SBD_TRAIN + SBD_VAL:
    write_label(root / VOC / 'SegmentationClassAug' / f'{id_}.png', random_label(rng))
  # DeepLab's list format; it includes v0 (VOC val), which must stay out of train.
  write_list(root / VOC / 'ImageSets/Segmentation/train_aug.txt',
             [f'/JPEGImages/{id_}.jpg /SegmentationClassAug/{id_}.png'
              for id_ in SBD_TRAIN + SBD_VAL])
  return root


def test_segmentation_class_aug_release(aug_release, tmp_path):
  voc_aug.Voc2012Semseg(data_dir=str(tmp_path)).build(aug_release)
  train = load(tmp_path, 'train')
  assert train.keys() == (set(VOC_TRAIN) | set(SBD_TRAIN + SBD_VAL)) - set(VOC_VAL)
  for id_, (_, label) in train.items():
    voc = aug_release / VOC / 'SegmentationClass' / f'{id_}.png'
    expected = read_label(voc if voc.exists() else aug_release / VOC / 'SegmentationClassAug' /
                          f'{id_}.png')
    np.testing.assert_array_equal(label, expected, err_msg=id_)


@pytest.mark.slow
def test_prepare_builds_it_by_the_sets_usual_name(aug_release, tmp_path):
  output = run_prepare('voc_aug', aug_release, tmp_path)
  assert f'--config=configs/voc2012.py --config.data.data_dir={tmp_path}' in output
  assert 'train: 7 found, official 10582, 7 written, 0 skipped' in output


def test_missing_sbd_labels_fail(tmp_path):
  fake_voc(tmp_path, np.random.default_rng(2))
  with pytest.raises(builders.BuildError, match='no SBD labels under manual_dir'):
    voc_aug.Voc2012Semseg(data_dir=str(tmp_path / 'tfds')).build(tmp_path)

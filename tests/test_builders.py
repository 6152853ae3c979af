"""The real-dataset builders on tiny fake trees: validation, the ADE20K shift, a folder's class
names, prepare, training.

The ADE20K tree has the official layout with 40x50 JPEGs and PNG labels in
0..150, plus one bad file of each kind in train; built once per module.
"""

import json
import os
import shutil
import subprocess
import sys

import cv2
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import default
from fake_datasets import (PAIR_SIZE, REPO, build, fake_folder, read_split, run_prepare,
                           write_image, write_label, write_pairs)
from pspnet_jax import train
from pspnet_jax.data import ade20k, builders, folder, meta, pipeline, registry

HEIGHT, WIDTH = PAIR_SIZE
NUM_TRAIN, NUM_VALIDATION = 6, 3
# file stem -> the reason the build must give for skipping it.
BAD = {'corrupt': 'image does not decode', 'empty': 'image does not decode (0 bytes)',
       'mismatch': 'image is 40x50 but label is 30x50', 'range': 'label values [200]',
       'lonely': 'no label with this image'}


def fake_ade20k(root):
  rng = np.random.default_rng(0)
  for split, count in (('training', NUM_TRAIN), ('validation', NUM_VALIDATION)):
    stems = [f'ADE_{split[:5]}_{i:08d}' for i in range(count)]
    write_pairs(root, f'images/{split}', f'annotations/{split}', stems, 150, rng)
  images, labels = root / 'images/training', root / 'annotations/training'
  write_pairs(root, 'images/training', 'annotations/training', ['corrupt', 'empty', 'mismatch'],
              150, rng)
  (images / 'corrupt.jpg').write_bytes((images / 'corrupt.jpg').read_bytes()[:200])
  (images / 'empty.jpg').write_bytes(b'')
  write_label(labels / 'mismatch.png', np.ones((30, WIDTH), np.uint8))
  write_pairs(root, 'images/training', 'annotations/training', ['range'], 150, rng)
  label = np.ones((HEIGHT, WIDTH), np.uint8)
  label[3, 4] = 200
  write_label(labels / 'range.png', label)
  write_image(images / 'lonely.jpg', np.zeros((HEIGHT, WIDTH, 3), np.uint8))
  return root


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  return build(tmp_path_factory, ade20k.Ade20kSemseg, fake_ade20k, 'ADEChallengeData2016')


def test_ade20k_counts_and_skip_report(built):
  _, data_dir, report = built
  train, validation = report['splits']['train'], report['splits']['validation']
  assert (train['found'], train['written'], train['skipped']) == (NUM_TRAIN + 5, NUM_TRAIN, 5)
  assert (validation['found'], validation['written'], validation['skipped']) == (NUM_VALIDATION,
                                                                                 NUM_VALIDATION, 0)
  reasons = {os.path.basename(s['file']).split('.')[0]: s['reason'] for s in train['skipped_files']}
  assert reasons.keys() == BAD.keys()
  for stem, reason in BAD.items():
    assert reason in reasons[stem], (stem, reasons[stem])
  assert train['official'] == 20210 and list(train['class_pixels']) == list(
      meta.class_names('ade20k'))
  # Uniform labels in 0..150: about 1/151 of the pixels were 0, now ignored.
  assert 0.002 < validation['ignore_ratio'] < 0.02
  assert sum(validation['class_pixels'].values()) + validation['ignore_ratio'] * NUM_VALIDATION * HEIGHT * \
      WIDTH == pytest.approx(NUM_VALIDATION * HEIGHT * WIDTH)
  on_disk = json.loads((data_dir / 'ade20k_semseg/1.0.0' / builders.REPORT_NAME).read_text())
  assert on_disk == report


def test_ade20k_images_exact_and_labels_shifted(built):
  source, data_dir, _ = built
  config = default.get_config()
  config.data.data_dir = str(data_dir)
  examples = read_split(config, 'validation')
  assert len(examples) == NUM_VALIDATION
  for name, (image, label) in examples.items():
    jpeg = np.fromfile(source / name, np.uint8)
    np.testing.assert_array_equal(image, cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1])
    stem = os.path.splitext(os.path.basename(name))[0]
    original = np.array(Image.open(source / 'annotations/validation' / f'{stem}.png'),
                        np.int32)
    np.testing.assert_array_equal(label, np.where(original == 0, 255, original - 1))


def test_strict_stops_at_first_bad_file(built, tmp_path):
  source = built[0]
  with pytest.raises(builders.BuildError, match=r'corrupt\.jpg: image does not decode'):
    ade20k.Ade20kSemseg(data_dir=str(tmp_path), strict=True).build(source)
  assert list((tmp_path / 'ade20k_semseg').iterdir()) == []


def test_more_files_than_the_official_release_fail(built, tmp_path, monkeypatch):
  # A full-size train split with one file too many (a small tree is not checked).
  monkeypatch.setattr(ade20k.Ade20kSemseg, 'OFFICIAL_SIZES',
                      {'train': NUM_TRAIN + 4, 'validation': NUM_VALIDATION})
  with pytest.raises(builders.BuildError, match='train: found 11 files, the official release '
                     'has 10'):
    ade20k.Ade20kSemseg(data_dir=str(tmp_path)).build(built[0])


def test_too_many_bad_files_fail(tmp_path):
  rng = np.random.default_rng(1)
  root = fake_folder(tmp_path / 'many_bad', 'a\nb\n', {split: ['good'] for split in folder.SPLITS},
                     rng)
  write_pairs(root, 'images/train', 'labels/train',
              [f'bad{i}' for i in range(builders.TOLERATED_SKIPS + 1)], 2, rng)
  with pytest.raises(builders.BuildError, match=r'train: 6 of 7 examples are bad.*bad0\.jpg'):
    folder.builder(root, str(tmp_path / 'tfds')).build(root)


def test_repeated_class_names_fail(tmp_path):
  (tmp_path / 'classes.txt').write_text('water\nboat\nwater\n')
  with pytest.raises(builders.BuildError, match=r"repeated: \['water'\]"):
    folder.read_classes(tmp_path)


def test_folder_dataset_with_three_classes(tmp_path):
  # Palette colours that are not the class indices.
  palette = np.random.default_rng(0).integers(0, 256, (256, 3), np.uint8)
  root = fake_folder(tmp_path / 'My Boats', 'water\nboat\n\nsky\n',
                     {'train': ['a', 'b', 'c'], 'validation': ['d']}, np.random.default_rng(2),
                     palette)
  report = folder.builder(root, str(tmp_path / 'tfds')).build(root)
  assert report['num_classes'] == 3 and report['config'].startswith('my_boats_')
  assert list(report['splits']['train']['class_pixels']) == ['water', 'boat', 'sky']
  assert [report['splits'][s]['written'] for s in folder.SPLITS] == [3, 1]
  config = default.get_config()
  config.data.update(name='folder', folder_dir=str(root), data_dir=str(tmp_path / 'tfds'),
                     num_classes=3)
  (example,) = pipeline.load_split(config, 'validation')
  # Palette indices are the classes, not the palette's colours.
  np.testing.assert_array_equal(example['label'][..., 0],
                                np.array(Image.open(root / 'labels/validation/d.png')))


def test_unbuilt_dataset_names_prepare_command(tmp_path):
  config = default.get_config()
  config.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='python -m pspnet_jax.data.prepare '
                     f'--dataset=ade20k --manual_dir=SOURCE_FOLDER --data_dir={tmp_path}'):
    pipeline.load_split(config, 'train')


def test_prepare_prints_flags_a_shell_takes():
  config = ml_collections.ConfigDict({'data': {'name': 'folder', 'data_dir': '/data',
                                               'folder_dir': '/src/My Boats'}})
  assert registry.training_flags(config, 3) == (
      "--config=configs/default.py --config.data.name=folder '--config.data.folder_dir=/src/My "
      "Boats' --config.data.num_classes=3 --config.data.data_dir=/data")


@pytest.mark.slow
def test_prepare_cli_and_two_training_steps(built, tmp_path):
  source = built[0]
  data_dir = tmp_path / 'tfds'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  output = run_prepare('ade20k', source, data_dir, env=env)
  assert 'train: 11 found, official 20210, 6 written, 5 skipped' in output
  assert 'skipped images/training/empty.jpg: image does not decode (0 bytes)' in output
  assert f'--config=configs/ade20k.py --config.data.data_dir={data_dir}' in output
  workdir = tmp_path / 'work'
  result = subprocess.run(
      [sys.executable, '-m', 'pspnet_jax.main', '--config=configs/ade20k.py',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
       '--config.model.backbone=resnet18', '--config.data.crop_size=33',
       '--config.train.batch_size=2', '--config.train.num_steps=2', '--config.eval.batch_size=2',
       '--config.train.log_every=1'],
      cwd=REPO, env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any('eval/mIoU' in row for row in rows)


def test_folder_class_names_come_from_the_build_report(tmp_path):
  root = fake_folder(tmp_path / 'boats', 'water\nboat\nsky\n',
                     {'train': ['a'], 'validation': ['b']}, np.random.default_rng(3))
  config = default.get_config()
  config.data.update(name='folder', folder_dir=str(root), data_dir=str(tmp_path / 'tfds'),
                     num_classes=3)
  # Not built yet: the folder's classes.txt.
  assert registry.class_names(config) == ('water', 'boat', 'sky')
  report = folder.builder(root, config.data.data_dir).build(root)
  assert report['class_names'] == ['water', 'boat', 'sky']
  # Built: the report keeps the names when the source folder is gone.
  shutil.rmtree(root)
  assert registry.class_names(config) == ('water', 'boat', 'sky')
  np.testing.assert_array_equal(registry.palette(config), meta.voc_palette(3))
  config.data.num_classes = 4
  with pytest.raises(ValueError, match=r'config\.data\.num_classes=4.* 3 classes'):
    registry.class_names(config)
  with pytest.raises(ValueError, match=r'config\.data\.num_classes=4.* 3 classes'):
    registry.palette(config)
  # Neither built nor a folder with classes.txt.
  config.data.folder_dir = str(tmp_path / 'other')
  with pytest.raises(FileNotFoundError, match='classes.txt'):
    registry.class_names(config)


@pytest.mark.slow
def test_training_on_a_folder_reports_its_own_class_names(tmp_path):
  """Per-class metrics of a folder dataset carry the names of its classes.txt, not class_k."""
  # Eight training images: one global batch for the 8 test devices.
  root = fake_folder(tmp_path / 'harbour', 'open water\nboat\nsky\n',
                     {'train': list('abcdefgh'), 'validation': ['v']}, np.random.default_rng(5))
  config = default.get_config()
  config.data.update(name='folder', folder_dir=str(root), data_dir=str(tmp_path / 'tfds'),
                     num_classes=3, crop_size=33)
  config.model.backbone = 'resnet18'
  config.train.update(batch_size=8, num_steps=1, log_every=1)  # 8 test devices
  config.eval.batch_size = 8
  folder.builder(root, config.data.data_dir).build(root)
  workdir = tmp_path / 'work'
  train.train_and_evaluate(config, str(workdir))
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  logged = {key for row in rows for key in row if key.startswith('eval/IoU/')}
  assert logged and logged <= {'eval/IoU/open_water', 'eval/IoU/boat', 'eval/IoU/sky'}, logged

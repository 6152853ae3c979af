"""Preparing a dataset again, and files that used to end a build: each case of issue 10 as a repro.

A build is reused only while its source folder is what it was built from
(`source_digest` in the build report): added images or a fixed label are
refused, `overwrite=True` (prepare's `--overwrite`) rebuilds, and a failed
or killed rebuild keeps the old build. Folder datasets with the same base name get their
own slots, and training finds the slot prepare wrote. A symlink loop, a folder
named like an image and two images with one stem are skipped with a reason, or
stop a strict build. Every tree is a tiny generated folder dataset.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from fake_datasets import PAIR_SIZE, REPO, fake_folder, read_split, write_image, write_label
from pspnet_jax.data import builders, folder, registry

CLASSES = 'water\nboat\nsky\n'


def folder_config(root, data_dir):
  """The training config of the folder dataset `root` in `data_dir`, as prepare prints it."""
  config = default.get_config()
  config.data.update(name='folder', folder_dir=str(root), data_dir=str(data_dir), num_classes=3)
  return config


def make_folder(root, train=('a', 'b'), seed=0):
  return fake_folder(root, CLASSES, {'train': list(train), 'validation': ['v']},
                     np.random.default_rng(seed))


def build(config, **kwargs) -> dict:
  """What prepare does: the config's builder builds from its folder."""
  return registry.builder(config).build(config.data.folder_dir, **kwargs)


@pytest.fixture
def built(tmp_path):
  """(config, report) of a two-image folder dataset, built."""
  config = folder_config(make_folder(tmp_path / 'boats'), tmp_path / 'tfds')
  return config, build(config)


def test_added_images_are_refused_then_overwrite_rebuilds(built, tmp_path):
  config, report = built
  root = tmp_path / 'boats'
  write_image(root / 'images/train/c.jpg', np.zeros((*PAIR_SIZE, 3), np.uint8))
  write_label(root / 'labels/train/c.png', np.ones(PAIR_SIZE, np.uint8))
  with pytest.raises(builders.SourceChanged,
                     match=r'changed since .*\(train: 2 files then, 3 now\).*--overwrite'):
    build(config)
  # Refusing touched nothing: the old build and its report are still there.
  assert registry.builder(config).report() == report
  rebuilt = build(config, overwrite=True)
  assert rebuilt['splits']['train']['written'] == 3
  assert rebuilt['source_digest'] != report['source_digest']
  assert sorted(read_split(config, 'train')) == [f'images/train/{s}.jpg' for s in 'abc']


def test_a_fixed_label_is_a_changed_source(built, tmp_path):
  config, _ = built
  fixed = np.full(PAIR_SIZE, 2, np.uint8)
  write_label(tmp_path / 'boats/labels/train/a.png', fixed)
  with pytest.raises(builders.SourceChanged, match=r'\(files or class names modified\)'):
    build(config)
  build(config, overwrite=True)
  np.testing.assert_array_equal(read_split(config, 'train')['images/train/a.jpg'][1], fixed)


def test_an_unchanged_source_reuses_the_build(built):
  config, report = built
  builder = registry.builder(config)
  def written():
    return {path.name: (os.stat(path).st_ino, os.stat(path).st_mtime_ns)
            for path in builder.data_path.glob('*.array_record*')}

  before = written()
  assert before and build(config) == report and written() == before
  # A build from before the digest existed cannot be vouched for.
  stripped = {key: value for key, value in report.items() if key != 'source_digest'}
  builder.report_path.write_text(json.dumps(stripped))
  with pytest.raises(builders.SourceChanged, match=r'records no digest.*--overwrite'):
    build(config)


def test_a_failed_rebuild_keeps_the_previous_build(built, tmp_path):
  config, report = built
  for stem in 'ab':  # no good example left in train: the rebuild fails
    (tmp_path / f'boats/images/train/{stem}.jpg').write_bytes(b'')
  with pytest.raises(builders.BuildError, match='train: 2 of 2 examples are bad'):
    build(config, overwrite=True)
  builder = registry.builder(config)
  assert builder.is_prepared() and builder.report() == report
  assert len(read_split(config, 'train')) == 2
  assert sorted(path.name for path in builder.data_path.parent.iterdir()) == ['1.0.0']


def test_a_rebuild_killed_midway_gives_the_previous_build_back(built):
  config, report = built
  builder = registry.builder(config)
  # Where `build(overwrite=True)` keeps the old build while TFDS writes the new one.
  builder.data_path.rename(builder.data_path.parent / '1.0.0.previous')
  assert not registry.builder(config).is_prepared()
  assert build(config) == report
  assert sorted(path.name for path in builder.data_path.parent.iterdir()) == ['1.0.0']
  assert len(read_split(config, 'train')) == 2


def test_folders_with_one_name_get_their_own_slots(tmp_path, monkeypatch):
  data_dir = tmp_path / 'tfds'
  first = folder_config(make_folder(tmp_path / 'a/boats', train='xy'), data_dir)
  second = folder_config(make_folder(tmp_path / 'b/boats', train='z', seed=1), data_dir)
  build(first)
  build(second)
  assert registry.builder(first).data_dir != registry.builder(second).data_dir
  assert sorted(read_split(first, 'train')) == ['images/train/x.jpg', 'images/train/y.jpg']
  assert sorted(read_split(second, 'train')) == ['images/train/z.jpg']
  # A relative folder_dir is the same folder, so the same slot.
  monkeypatch.chdir(tmp_path / 'a')
  relative = folder_config('boats', data_dir)
  assert registry.builder(relative).data_dir == registry.builder(first).data_dir
  assert registry.builder(relative).is_prepared()


# stem -> the reason the build gives for the entry `write_bad` makes of it.
BAD = {'loop': 'image cannot be read (Too many levels of symbolic links)',
       'folder': 'image is a folder, not a file',
       'dup': "2 image files share the stem 'dup' (images/train/dup.jpg, images/train/dup.png); "
              'keep one'}


def write_bad(root, stem):
  """An entry that used to end the build (a symlink loop, a folder) or vanish (two images)."""
  images = root / 'images/train'
  write_label(root / f'labels/train/{stem}.png', np.ones(PAIR_SIZE, np.uint8))
  if stem == 'loop':
    os.symlink('loop.jpg', images / 'loop.jpg')
  elif stem == 'folder':
    (images / 'folder.jpg').mkdir()
  else:
    for suffix in ('.jpg', '.png'):
      write_image(images / f'dup{suffix}', np.zeros((*PAIR_SIZE, 3), np.uint8))


def test_unreadable_entries_and_repeated_stems_are_named_skips(tmp_path):
  root = make_folder(tmp_path / 'boats')
  for stem in BAD:
    write_bad(root, stem)
  report = folder.builder(root, str(tmp_path / 'tfds')).build(root)
  train = report['splits']['train']
  assert (train['found'], train['written'], train['skipped']) == (5, 2, 3)
  assert {s['file']: s['reason'] for s in train['skipped_files']} == {
      f'images/train/{stem}.jpg': reason for stem, reason in BAD.items()}


@pytest.mark.parametrize('stem', sorted(BAD))
def test_strict_stops_at_unreadable_entries_and_repeated_stems(tmp_path, stem):
  root = make_folder(tmp_path / 'boats')
  write_bad(root, stem)
  with pytest.raises(builders.BuildError,
                     match=re.escape(f'images/train/{stem}.jpg: {BAD[stem]} (strict')):
    folder.builder(root, str(tmp_path / 'tfds'), strict=True).build(root)


def prepare(*flags):
  return subprocess.run([sys.executable, '-m', 'pspnet_jax.data.prepare', '--dataset=folder',
                         *flags], cwd=REPO, capture_output=True, text=True, check=False,
                        env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1'))


def test_prepare_refuses_a_changed_source_in_one_line_and_overwrite_rebuilds(built, tmp_path):
  config, _ = built
  root, data_dir = tmp_path / 'boats', tmp_path / 'tfds'
  (root / 'images/train/b.jpg').unlink()
  (root / 'labels/train/b.png').unlink()
  # Relative to the command's working directory: the printed flags must be absolute.
  flags = [f'--manual_dir={os.path.relpath(root, REPO)}', f'--data_dir={data_dir}']
  refused = prepare(*flags)
  assert refused.returncode == 2 and refused.stdout == ''   # cli.EXIT_USER_ERROR
  assert refused.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'train: 2 files then, 1 now' in refused.stderr and '--overwrite' in refused.stderr
  rebuilt = prepare(*flags, '--overwrite')
  assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
  assert 'train: 1 found, 1 written, 0 skipped' in rebuilt.stdout
  assert f'--config.data.folder_dir={root}' in rebuilt.stdout
  reused = prepare(*flags)
  assert reused.returncode == 0 and reused.stdout.startswith('reused (source unchanged)')
  assert registry.builder(config).report()['splits']['train']['written'] == 1

"""What the data tests share: fake release files, one build per module, reading splits back.

The builder tests write tiny trees in the official layouts (ADE20K, Cityscapes,
VOC + SBD, a folder), build them with the real builders and read them back
through the loader, as training does; the transform tests draw block labels.
"""

import os
import subprocess
import sys

import cv2
import numpy as np
from PIL import Image

from pspnet_jax.data import folder, pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (height, width) of the pairs `write_pairs` writes.
PAIR_SIZE = (40, 50)


def block_label(height, width, classes, block, seed):
  """A uint8 label of block x block squares, each of a class drawn from `classes`."""
  rng = np.random.default_rng(seed)
  blocks = rng.choice(classes, size=(-(-height // block), -(-width // block)))
  return np.kron(blocks, np.ones((block, block), np.uint8))[:height, :width].astype(np.uint8)


def write_bytes(path, data: bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def write_image(path, image):
  """An image file encoded by OpenCV in the format of the path's suffix (.jpg, .png)."""
  write_bytes(path, cv2.imencode(path.suffix, image)[1].tobytes())


def write_label(path, label, palette=None):
  """A label PNG: grey ('L'), or with `palette` (rows of RGB) mode 'P', whose colours are not
  the class indices, as VOC's are."""
  path.parent.mkdir(parents=True, exist_ok=True)
  image = Image.fromarray(label, 'L')
  if palette is not None:
    image = image.convert('P')
    image.putpalette(np.asarray(palette, np.uint8).tobytes())
  image.save(path)


def write_pairs(root, image_dir, label_dir, stems, max_label, rng, palette=None):
  """Random JPEG images and PNG labels in 0..max_label, root/image_dir/<stem>.jpg and
  root/label_dir/<stem>.png."""
  for stem in stems:
    write_image(root / image_dir / f'{stem}.jpg', rng.integers(0, 256, (*PAIR_SIZE, 3), np.uint8))
    write_label(root / label_dir / f'{stem}.png',
                rng.integers(0, max_label + 1, PAIR_SIZE, np.uint8), palette)


def fake_folder(root, classes_text, stems, rng, palette=None):
  """A folder dataset: classes.txt holding `classes_text`, pairs {split: stems} in its classes."""
  write_bytes(root / folder.CLASSES_FILE, classes_text.encode())
  max_label = len(folder.read_classes(root)) - 1
  for split, split_stems in stems.items():
    write_pairs(root, f'images/{split}', f'labels/{split}', split_stems, max_label, rng, palette)
  return root


def build(tmp_path_factory, builder_class, fake_tree, folder_name='src'):
  """(source, data_dir, report): `fake_tree(folder)` built by `builder_class` into a fresh dir."""
  source = fake_tree(tmp_path_factory.mktemp('src') / folder_name)
  data_dir = tmp_path_factory.mktemp('tfds')
  return source, data_dir, builder_class(data_dir=str(data_dir)).build(source)


def file_name(example) -> str:
  name = example['file_name']
  return name.decode() if isinstance(name, bytes) else name


def read_split(config, split):
  """{file_name: (image HxWx3, label HxW)} of a built split, as training reads it."""
  return {file_name(example): (example['image'], example['label'][..., 0])
          for example in pipeline.load_split(config, split)}


def run_prepare(dataset, manual_dir, data_dir, **kwargs) -> str:
  """The output of `python -m pspnet_jax.data.prepare`, which must succeed."""
  result = subprocess.run(
      [sys.executable, '-m', 'pspnet_jax.data.prepare', f'--dataset={dataset}',
       f'--manual_dir={manual_dir}', f'--data_dir={data_dir}'],
      cwd=REPO, capture_output=True, text=True, check=False, **kwargs)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout

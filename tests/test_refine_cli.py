"""`python -m pspnet_jax.refine` end to end: files and folders of images and masks paired by
name, outputs equal to `Refiner.refine`'s on the same pairs, and the user's mistakes as one
line each (exit status 2, no traceback, nothing written).

The checkpoint is a randomly initialized demo refinement module (configs/cascadepsp.py:demo,
ResNet-18); expected outputs come from `Refiner.refine` in this process on the arrays read by
cv2 (the official demo's reader), never from the command.
"""

import os

import cv2
import numpy as np
import pytest
from flax import nnx

from pspnet_jax import checkpoint, configuration, refinement
from pspnet_jax.models import create_model
from test_cli_errors import command, user_error

CONFIG = 'configs/cascadepsp.py:demo'
_L = 80
# name -> (height, width): smaller than L (the global step resizes up), sides that are and
# are not multiples of 8, one in a subfolder.
_SIZES = {'a': (40, 56), 'sub/b': (37, 61)}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('refine_run'))
  config = configuration.load_config(CONFIG)
  model = create_model(config, rngs=nnx.Rngs(0))
  checkpoint.save_model(folder, 0, checkpoint.model_variables(model), {'source': 'test'})
  return folder


def _write_pairs(root) -> None:
  """images/<name>.jpg (or .png for sub/b) and masks/<name>.png: blobs and a rectangle."""
  rng = np.random.default_rng(0)
  for name, (height, width) in _SIZES.items():
    small = rng.integers(0, 256, (height // 8, width // 8, 3)).astype(np.uint8)
    image = cv2.resize(small, (width, height))
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4:3 * height // 4, width // 5:3 * width // 5] = 255
    suffix = '.jpg' if name == 'a' else '.png'
    for path, array in ((root / 'images' / (name + suffix), image),
                        (root / 'masks' / (name + '.png'), mask)):
      path.parent.mkdir(parents=True, exist_ok=True)
      cv2.imwrite(str(path), array)


def _refine(*args):
  return command('pspnet_jax.refine', f'--config={CONFIG}', *args, timeout=300)


def _expected(refiner, image_path, mask_path, **options):
  image = cv2.imread(str(image_path))[..., ::-1]
  return refiner.refine(image, cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE), **options)


def test_refines_folders_paired_by_name_and_single_files(tmp_path, workdir):
  _write_pairs(tmp_path)
  out = tmp_path / 'out'
  folders = (f'--workdir={workdir}', f'--image={tmp_path / "images"}',
             f'--mask={tmp_path / "masks"}', f'--output={out}', f'--L={_L}')
  result = _refine(*folders)
  assert result.returncode == 0, result.stderr[-3000:]
  # Two files pair whatever their names (the output is named after the image); --fast is the
  # global step only; --overwrite replaces an output.
  coarse = tmp_path / 'coarse.png'
  coarse.write_bytes((tmp_path / 'masks' / 'a.png').read_bytes())
  single = (f'--workdir={workdir}', f'--image={tmp_path / "images" / "a.jpg"}',
            f'--mask={coarse}', f'--output={tmp_path / "single"}', f'--L={_L}', '--fast')
  (tmp_path / 'single').mkdir()
  (tmp_path / 'single' / 'a.png').write_bytes(b'old')
  result = _refine(*single, '--overwrite')
  assert result.returncode == 0, result.stderr[-3000:]

  refiner = refinement.Refiner.from_workdir(workdir, configuration.load_config(CONFIG))
  written = sorted(os.path.relpath(os.path.join(folder, name), out)
                   for folder, _, names in os.walk(out) for name in names)
  assert written == ['a.png', 'sub/b.png']
  for name, suffix in (('a', '.jpg'), ('sub/b', '.png')):
    refined = cv2.imread(str(out / f'{name}.png'), cv2.IMREAD_UNCHANGED)
    assert refined.dtype == np.uint8 and refined.shape == _SIZES[name]
    np.testing.assert_array_equal(refined, _expected(
        refiner, tmp_path / 'images' / (name + suffix), tmp_path / 'masks' / f'{name}.png',
        L=_L))
  np.testing.assert_array_equal(cv2.imread(str(tmp_path / 'single' / 'a.png'),
                                           cv2.IMREAD_UNCHANGED),
                                _expected(refiner, tmp_path / 'images' / 'a.jpg', coarse,
                                          fast=True, L=_L))

  # Again into the same folder, without --overwrite: refused, the outputs left as they are.
  before = (out / 'a.png').read_bytes()
  assert user_error(_refine(*folders)) == (
      f'error: {out / "a.png"}, {out / "sub" / "b.png"} exist already; pass --overwrite to '
      'replace them, or choose another --output')
  assert (out / 'a.png').read_bytes() == before


def _mistakes(tmp_path, workdir) -> dict:
  """name -> (the command's arguments, the start of its one-line error)."""
  _write_pairs(tmp_path)
  images, masks, out = tmp_path / 'images', tmp_path / 'masks', tmp_path / 'out'
  (tmp_path / 'lonely').mkdir()
  (tmp_path / 'lonely' / 'a.png').write_bytes((masks / 'a.png').read_bytes())
  (tmp_path / 'broken').mkdir()
  (tmp_path / 'broken' / 'a.png').write_bytes(b'\x89PNG not really')
  small = tmp_path / 'small.png'
  cv2.imwrite(str(small), np.zeros((20, 30), np.uint8))
  usual = (f'--workdir={workdir}', f'--output={out}', f'--L={_L}')
  return {
      'missing image': ((f'--image={images / "nope.jpg"}', f'--mask={masks / "a.png"}', *usual),
                        f'error: images: input {images / "nope.jpg"}: no such file or folder'),
      'image without mask': ((f'--image={images}', f'--mask={tmp_path / "lonely"}', *usual),
                             'error: images and masks pair by name (the path below the folder '
                             'without extension); images without a mask: '
                             f'{images / "sub" / "b.png"}'),
      'unreadable image': ((f'--image={tmp_path / "broken"}', f'--mask={tmp_path / "lonely"}',
                            *usual), f'error: cannot read {tmp_path / "broken" / "a.png"}: '),
      'size mismatch': ((f'--image={images / "a.jpg"}', f'--mask={small}', *usual),
                        f'error: mask {small} is 20x30 but its image {images / "a.jpg"} is '
                        "40x56: a mask must have its image's size"),
      'no checkpoint': ((f'--image={images}', f'--mask={masks}', f'--output={out}',
                         f'--workdir={tmp_path / "empty"}'),
                        f'error: no checkpoint in {tmp_path / "empty" / "checkpoints"}: '),
      'L too small': ((f'--image={images}', f'--mask={masks}', f'--workdir={workdir}',
                       f'--output={out}', '--L=64'),
                      f'error: {images / "a.jpg"}: L=64: the local step needs L >= 66'),
  }


@pytest.mark.parametrize('mistake', ['missing image', 'image without mask', 'unreadable image',
                                     'size mismatch', 'no checkpoint', 'L too small'])
def test_mistakes_are_one_line_and_write_nothing(tmp_path, workdir, mistake):
  arguments, start = _mistakes(tmp_path, workdir)[mistake]
  line = user_error(_refine(*arguments))
  assert line.startswith(start), line
  assert not (tmp_path / 'out').exists()


def test_a_segmentation_config_is_refused(tmp_path):
  result = command('pspnet_jax.refine', '--config=configs/demo.py', f'--workdir={tmp_path}',
                   f'--image={tmp_path}', f'--mask={tmp_path}', f'--output={tmp_path / "out"}')
  assert user_error(result) == ("error: config.task='segmentation': refine needs a CascadePSP "
                                'config (configs/cascadepsp.py)')

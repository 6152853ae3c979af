"""Refines coarse masks with CascadePSP's refinement module from a run directory's checkpoint.

  python -m pspnet_jax.refine --config=configs/cascadepsp.py --workdir=DIR \\
      --image=photo.jpg --mask=coarse.png --output=OUT [--fast] [--L=900] [--step=N]
  python -m pspnet_jax.refine --config=configs/cascadepsp.py --workdir=DIR \\
      --image=photos/ --mask=masks/ --output=OUT [--overwrite]

`--image` and `--mask` are each an image file, a folder (searched
recursively) or a quoted glob, as predict's `--input`. Two files make one
pair; otherwise images and masks pair up by name (the path below the folder
without extension, so photos/a.jpg goes with masks/a.png), and an image
without a mask or a mask without an image stops the command before any work,
naming them. A mask is read as grayscale (over 127 is foreground); an image
as RGB. Every pair is read and checked first: an unreadable file, or a mask
whose size is not its image's, stops the command with one line naming the
files, before the model is loaded and before anything is written.

Each pair gives OUT/<name>.png, the refined mask (single channel, 0-255), as
`refinement.Refiner.refine` returns it: the official global + local steps at
--L (config.refine.L), or the global step only with --fast
(config.refine.fast). Existing outputs are refused unless --overwrite. One
process, on its devices (the local step's patches are split over them,
config.refine.batch_size per step).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pspnet_jax import cli
from pspnet_jax.errors import AlreadyExists, UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory whose checkpoint refines.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_IMAGE = flags.DEFINE_string('image', None, 'Image file, folder (recursive) or glob.')
_MASK = flags.DEFINE_string('mask', None, 'Mask file, folder (recursive) or glob, paired with '
                            'the images by name.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output folder: <name>.png per pair.')
_FAST = flags.DEFINE_bool('fast', None, 'Global step only (default: config.refine.fast).')
_L = flags.DEFINE_integer('L', None, 'Long side of the global step and side of the local '
                          "step's patches (default: config.refine.L).")
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace existing outputs.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Imported here so that --help and flag errors do not pay for importing JAX.
  # pylint: disable=import-outside-toplevel
  import cv2
  from etils import epath
  from pspnet_jax import checkpoint, configuration, paths, refinement
  # pylint: enable=import-outside-toplevel

  config = _CONFIG.value
  configuration.validate(config)
  if config.task != 'refinement':
    raise UserError(f'config.task={config.task!r}: refine needs a CascadePSP config '
                    '(configs/cascadepsp.py)')
  cli.check_batch_sizes(config, 'refine.batch_size')
  fast = config.refine.fast if _FAST.value is None else _FAST.value
  size = config.refine.L if _L.value is None else _L.value
  out = _OUTPUT.value
  found = refinement.find_pairs(_IMAGE.value, _MASK.value, exclude=out)
  for _, image_path, mask_path in found:
    image, _ = refinement.read_pair(image_path, mask_path)
    try:
      refinement.check_size(*image.shape[:2], fast=fast, L=size)
    except ValueError as error:
      raise UserError(f'{image_path}: {error}') from error
  outputs = [os.path.join(out, name + '.png') for name, _, _ in found]
  existing = [path for path in outputs if epath.Path(path).exists()]
  if existing and not _OVERWRITE.value:
    raise AlreadyExists(f'{refinement.listed(existing)} exist already; pass --overwrite to '
                        'replace them, or choose another --output')
  try:
    refiner = refinement.Refiner.from_workdir(_WORKDIR.value, config, step=_STEP.value)
  except checkpoint.DamagedCheckpoint as error:   # a fault of the workdir, named in one line
    logging.error('%s', error)
    sys.exit(1)
  logging.info('refining %d pairs (L=%d, %s) into %s', len(found), size,
               'global step only' if fast else 'global and local steps', out)
  for (name, image_path, mask_path), path in zip(found, outputs):
    refined = refiner.refine(*refinement.read_pair(image_path, mask_path), fast=fast, L=size)
    encoded = cv2.imencode('.png', refined)[1]
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    paths.write_whole(path, encoded.tobytes())
    logging.info('refined %s', name)
  logging.info('wrote %d refined masks into %s', len(found), out)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir', 'image', 'mask', 'output'])
  cli.run(main)

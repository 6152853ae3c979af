"""Predicts the classes of image files with a checkpoint of a run directory.

  python -m pspnet_jax.predict --config=configs/ade20k.py --workdir=DIR \\
      --input=photos/ --output=OUT [--step=N] [--overwrite] [--config.eval.protocol=whole]

`--input` is an image file, a folder (searched recursively) or a quoted glob
(`'photos/*.jpg'`, `'data/**/*.png'`). Each image, of any size, runs through
the config's evaluation protocol (eval.protocol, eval.scales, eval.flip, ...)
and gives OUT/gray/<name>.png (class indices), OUT/color/<name>.png (the
dataset's palette) and OUT/overlay/<name>.jpg; OUT/legend.json and legend.png
name the classes present, OUT/prediction.json records the model, the protocol
and the skipped (unreadable) files. <name> is the path below the input folder
without extension. An output folder written by another checkpoint or protocol
is refused unless `--overwrite` (which clears its outputs first). Details:
pspnet_jax/predictions.py.

On several hosts every process runs the same command (with `--distributed` or
`--coordinator_address`); the images are split between them and OUT must be a
folder all of them see.

`--refine_workdir=CASCADEPSP_DIR [--refine_config=configs/cascadepsp.py]`
refines every prediction with CascadePSP's scene refinement before it is
written (pspnet_jax/scene_refinement.py; the checkpoint of CASCADEPSP_DIR, its
config the given one or its config.json); prediction.json records it with the
protocol.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pspnet_jax import cli, distributed_flags, refine_flags
from pspnet_jax.errors import MissingFile, UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory whose checkpoint predicts.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_INPUT = flags.DEFINE_string('input', None, 'Image file, folder (recursive) or glob.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output folder (gray/, color/, overlay/, legend).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Clear the outputs of OUT first; needed when '
                               'another checkpoint or protocol wrote them.')
flags.adopt_module_key_flags(distributed_flags)   # --help lists the multi-process flags
flags.adopt_module_key_flags(refine_flags)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  refine_flags.check()
  # Imported here so that --help and flag errors do not pay for importing JAX and TF.
  # pylint: disable=import-outside-toplevel
  import jax
  from pspnet_jax import checkpoint, configuration, inference, predictions
  from pspnet_jax.data import registry
  # pylint: enable=import-outside-toplevel

  distributed_flags.initialize()
  config = _CONFIG.value
  configuration.validate(config)
  cli.check_batch_sizes(config, 'eval.batch_size')
  protocol = inference.Protocol.from_config(config)
  class_names, palette = registry.class_names(config), registry.palette(config)
  try:
    inputs = predictions.find_inputs(_INPUT.value, exclude=_OUTPUT.value)
  except FileNotFoundError as error:
    raise MissingFile(str(error)) from error
  except ValueError as error:   # two inputs that would write outputs of one name
    raise UserError(str(error)) from error
  try:
    loaded = checkpoint.load_model(config, _WORKDIR.value, _STEP.value)
    refiner = refine_flags.scene_refiner(config.data.name)
  except checkpoint.DamagedCheckpoint as error:   # a fault of a workdir, named in one line
    logging.error('%s', error)
    sys.exit(1)
  run = predictions.describe_run(config, _WORKDIR.value, loaded.step, protocol,
                                 config_flags.get_config_filename(flags.FLAGS['config']))
  if refiner is not None:   # refined predictions are another protocol's
    run['protocol'] = {**run['protocol'], 'refinement': refiner.settings}
  try:
    predictions.claim_output(_OUTPUT.value, run, overwrite=_OVERWRITE.value)
  except predictions.OutputInUse as error:
    raise UserError(str(error)) from error
  logging.info('step %d of %s, protocol %s: %d images over %d processes', loaded.step,
               _WORKDIR.value, protocol.settings(), len(inputs), jax.process_count())
  predictor = inference.Predictor.from_model(loaded.model, config, protocol=protocol)
  if refiner is not None:
    logging.info('refining the predictions with CascadePSP: %s', refiner.settings)
  results = predictions.predict_files(predictor, inputs, _OUTPUT.value, palette, refine=refiner)
  if jax.process_index() == 0:
    predictions.write_summary(_OUTPUT.value, run, results, class_names, palette)
  logging.info('predicted %d images into %s; skipped %d unreadable', len(results.classes),
               _OUTPUT.value, len(results.skipped))
  if not results.classes:
    logging.error('no input could be read (see %s/%s)', _OUTPUT.value, predictions.RUN_FILE)
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir', 'input', 'output'])
  cli.run(main)

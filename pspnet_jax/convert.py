"""Weights in and out of a run directory (the formats live in `pspnet_jax.weights`).

  python -m pspnet_jax.convert --config=configs/ade20k.py --workdir=DIR \\
      --import_path=train_epoch_100.pth --format=semseg
  python -m pspnet_jax.convert --config=configs/ade20k.py --workdir=DIR \\
      --export_path=pspnet50.pth --format=semseg [--step=N] [--overwrite]

An import becomes checkpoint 0 of an empty workdir (training then starts from
those weights with a fresh optimizer); a file that cannot be read fails with
its name and the reason, and non-float32 weights are converted with a warning.
An export writes the latest (or `--step`) checkpoint; the file appears under
its name only once complete, and an existing file is replaced only with
`--overwrite`. Reading or writing `.pth` needs PyTorch.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from pspnet_jax import configuration, weights

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (ml_collections).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory whose checkpoints are read/written.')
_IMPORT = flags.DEFINE_string('import_path', None, 'Weights file to import as checkpoint 0.')
_EXPORT = flags.DEFINE_string('export_path', None, 'File to write the checkpoint to.')
_FORMAT = flags.DEFINE_string('format', 'semseg', f'import: {weights.IMPORT_FORMATS}; export: '
                              f'{weights.EXPORT_FORMATS}.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Export: replace an existing --export_path '
                               '(refused otherwise).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  config = _CONFIG.value
  configuration.validate(config)
  if bool(_IMPORT.value) == bool(_EXPORT.value):
    raise app.UsageError('give exactly one of --import_path and --export_path')
  if _IMPORT.value:
    if _FORMAT.value not in weights.IMPORT_FORMATS:
      raise app.UsageError(f'--format={_FORMAT.value} cannot be imported; use one of '
                           f'{weights.IMPORT_FORMATS}')
    where = weights.import_weights(config, _WORKDIR.value, _IMPORT.value, _FORMAT.value)
    logging.info('imported %s (%s) as %s', _IMPORT.value, _FORMAT.value, where)
  else:
    if _FORMAT.value not in weights.EXPORT_FORMATS:
      raise app.UsageError(f'--format={_FORMAT.value} cannot be exported; use one of '
                           f'{weights.EXPORT_FORMATS}')
    step = weights.export_weights(config, _WORKDIR.value, _EXPORT.value, _FORMAT.value,
                                  _STEP.value, overwrite=_OVERWRITE.value)
    logging.info('exported step %d of %s to %s (%s)', step, _WORKDIR.value, _EXPORT.value,
                 _FORMAT.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)

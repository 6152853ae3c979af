"""Weights in and out of a run directory (the formats live in `pspnet_jax.weights`).

  python -m pspnet_jax.convert --config=configs/ade20k.py --workdir=DIR \\
      --import_path=train_epoch_100.pth --format=semseg
  python -m pspnet_jax.convert --config=configs/ade20k.py --workdir=DIR \\
      --export_path=pspnet50.pth --format=semseg [--step=N] [--overwrite]
  python -m pspnet_jax.convert --config=configs/ade20k.py --workdir=DIR \\
      --export_path=pspnet50.onnx --format=onnx [--export_size=473[,473]]
  python -m pspnet_jax.convert --config=configs/ade20k.py:arch=mmseg --workdir=DIR \\
      --import_path=pspnet_r50-d8_512x512_160k_ade20k.pth --format=mmseg
  python -m pspnet_jax.convert --config=configs/ade20k.py:arch=mmseg --workdir=DIR \\
      --export_path=pspnet_r50-d8_ade20k.pth --format=mmseg [--step=N] [--overwrite]
  python -m pspnet_jax.convert --config=configs/cascadepsp.py --workdir=DIR \\
      --import_path=model --format=cascadepsp

An import becomes checkpoint 0 of an empty workdir (training then starts from
those weights with a fresh optimizer); a file that cannot be read fails with
its name and the reason, and non-float32 weights are converted with a warning.
An export writes the latest (or `--step`) checkpoint; the file appears under
its name only once complete, and an existing file is replaced only with
`--overwrite`. Reading or writing `.pth` needs PyTorch. mmsegmentation
checkpoints (`mmseg`: model-zoo files, bare state_dicts and training
checkpoints in; out `{'meta', 'state_dict'}`, which mmseg's `load_checkpoint`
loads with strict keys) need the config variant `arch=mmseg`, whose ImageNet
backbone format is `model.pretrained_format=mmseg-resnet` (ResNetV1c). CascadePSP's
refinement module (`cascadepsp`, configs with `task='refinement'`) reads and writes
the released file, named just `model` (so `--format` is needed). The
deployable formats (`pspnet_jax.deploy`: jax, onnx, savedmodel, tflite) write the eval-mode
forward, input `images` float32 NHWC normalized RGB, output `logits` float32
NHWC at the input size, at a fixed H x W (`--export_size`, default the
config's crop; jax: any 8k+1 size unless given).

Without `--format`, the file's extension says it (.pth: semseg, .safetensors,
.onnx, .tflite, .jax; no extension: a SavedModel directory); a `--format`
that the extension contradicts is refused. Mistakes (a missing file, a
workdir without checkpoints, a format that does not fit) are one line and exit
status 2, and a failed import leaves no empty folders behind.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from pspnet_jax import cli, configuration, deploy, weights

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (ml_collections).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory whose checkpoints are read/written.')
_IMPORT = flags.DEFINE_string('import_path', None, 'Weights file to import as checkpoint 0.')
_EXPORT = flags.DEFINE_string('export_path', None, 'File to write the checkpoint to.')
_EXPORT_FORMATS = tuple(dict.fromkeys((*weights.EXPORT_FORMATS, *weights.REFINEMENT_EXPORT_FORMATS,
                                      *deploy.EXPORT_FORMATS)))
_FORMAT = flags.DEFINE_string('format', None, f'import: {weights.IMPORT_FORMATS}; export: '
                              f'{_EXPORT_FORMATS}. Default: from the extension (.pth: semseg).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
_EXPORT_SIZE = flags.DEFINE_string('export_size', None, f'Deployable exports '
                                   f'{deploy.EXPORT_FORMATS}: H or H,W of the input, 8k+1 each '
                                   '(default: data.crop_size; jax: any 8k+1 size).')
_FLOAT16_WEIGHTS = flags.DEFINE_bool('float16_weights', False, 'tflite: store the weights as '
                                     'float16 (half the file; computed in float32).')
_UINT8_INPUT = flags.DEFINE_bool('uint8_input', False, 'Deployable exports: raw uint8 RGB '
                                 'images in, normalized in the graph with data.mean / data.std.')
_CLASS_MAP = flags.DEFINE_bool('class_map', False, 'Deployable exports: output `classes`, the '
                               'int32 class per pixel, instead of `logits`.')
_CHANNELS_FIRST = flags.DEFINE_bool('channels_first', False, 'Deployable exports: NCHW images '
                                    'and logits.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Export: replace an existing --export_path '
                               '(refused otherwise).')


def _export_size() -> tuple[int, int] | None:
  if not _EXPORT_SIZE.value:
    return None
  try:
    sides = [int(side) for side in _EXPORT_SIZE.value.split(',')]
  except ValueError:
    sides = []
  if len(sides) not in (1, 2):
    raise app.UsageError(f'--export_size={_EXPORT_SIZE.value}: expected H or H,W')
  try:
    return deploy.export_size(_CONFIG.value, (sides[0], sides[-1]))
  except ValueError as error:
    raise app.UsageError(f'--export_size={_EXPORT_SIZE.value}: {error}') from error


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  config = _CONFIG.value
  configuration.validate(config)
  if bool(_IMPORT.value) == bool(_EXPORT.value):
    raise app.UsageError('give exactly one of --import_path and --export_path')
  fmt = weights.file_format(_IMPORT.value or _EXPORT.value, _FORMAT.value)
  with cli.no_empty_leftovers(_WORKDIR.value):
    convert(config, fmt)


def convert(config, fmt: str) -> None:
  """The import or the export the flags ask for, in format `fmt`."""
  if _IMPORT.value:
    if fmt not in weights.IMPORT_FORMATS:
      raise app.UsageError(f'--format={fmt} cannot be imported; use one of '
                           f'{weights.IMPORT_FORMATS}')
    where = weights.import_weights(config, _WORKDIR.value, _IMPORT.value, fmt)
    logging.info('imported %s (%s) as %s', _IMPORT.value, fmt, where)
  else:
    if fmt not in _EXPORT_FORMATS:
      raise app.UsageError(f'--format={fmt} cannot be exported; use one of '
                           f'{_EXPORT_FORMATS}')
    if fmt in deploy.EXPORT_FORMATS:
      # The deployable graphs are PSPNet's (images in, logits out).
      weights.check_task(config, fmt, _EXPORT.value)
      step = deploy.export_model(config, _WORKDIR.value, _EXPORT.value, fmt,
                                 _STEP.value, size=_export_size(),
                                 float16_weights=_FLOAT16_WEIGHTS.value,
                                 uint8_input=_UINT8_INPUT.value, class_map=_CLASS_MAP.value,
                                 channels_first=_CHANNELS_FIRST.value,
                                 overwrite=_OVERWRITE.value)
    else:
      given = [flag.name for flag in (_EXPORT_SIZE, _FLOAT16_WEIGHTS, _UINT8_INPUT, _CLASS_MAP,
                                      _CHANNELS_FIRST) if flag.present]
      if given:
        raise app.UsageError(f'--{given[0]} applies to {deploy.EXPORT_FORMATS}, not '
                             f'--format={fmt}')
      step = weights.export_weights(config, _WORKDIR.value, _EXPORT.value, fmt,
                                    _STEP.value, overwrite=_OVERWRITE.value)
    logging.info('exported step %d of %s to %s (%s)', step, _WORKDIR.value, _EXPORT.value, fmt)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)

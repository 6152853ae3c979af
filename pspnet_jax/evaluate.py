"""Evaluates a checkpoint on a dataset split with the config's protocol (semseg's test.py).

  python -m pspnet_jax.evaluate --config=configs/ade20k.py --workdir=DIR [--step=N] \\
      [--split=validation] [--save_predictions=OUT]
  python -m pspnet_jax.evaluate --config=configs/ade20k.py:ms --workdir=DIR   # multi-scale

`eval.protocol` is `slide` (windows of eval.crop_size over the image resized
to eval.base_size times each of eval.scales, with eval.flip) or `whole`; every
image is judged at its original size. Writes
`DIR/eval/<split>-<step>-<protocol>.json` (mIoU, mAcc, allAcc, per class by
name, the protocol's settings, images, seconds) and the confusion matrix
beside it, and logs the per-class table. On several hosts every process runs
the same command (`--distributed` or `--coordinator_address`); each reads its
share of the images.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory whose checkpoint is evaluated.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_SPLIT = flags.DEFINE_string('split', None, 'TFDS split (default: config.data.eval_split).')
_SAVE_PREDICTIONS = flags.DEFINE_string(
    'save_predictions', None, 'Also write the predictions as `predict` does (gray/, color/, '
    'overlay/) into this folder.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'jax.distributed with cluster '
                                 'auto-detection (Cloud TPU, SLURM).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for a hand-started multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --coordinator_address.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --coordinator_address.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Imported here so that --help and flag errors do not pay for importing JAX and TF.
  # pylint: disable=import-outside-toplevel
  import jax
  from pspnet_jax import checkpoint, configuration, evaluation, inference, sharding, writers
  from pspnet_jax.data import registry
  # pylint: enable=import-outside-toplevel

  checkpoint.quiet_orbax_logs()
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  _DISTRIBUTED.value)
  config = _CONFIG.value
  configuration.validate(config)
  protocol = inference.Protocol.from_config(config)
  split = _SPLIT.value or config.data.eval_split
  loaded = checkpoint.load_model(config, _WORKDIR.value, _STEP.value)
  logging.info('evaluating step %d of %s on %s: %s', loaded.step, _WORKDIR.value, split,
               protocol.settings())
  predictor = inference.Predictor.from_model(loaded.model, config, protocol=protocol)
  on_prediction = None
  if _SAVE_PREDICTIONS.value:
    on_prediction = _prediction_saver(config, loaded.step, protocol)
  results = evaluation.evaluate_split(predictor, config, split, on_prediction=on_prediction)
  names = registry.class_names(config)
  if jax.process_index() == 0:
    path = evaluation.results_path(_WORKDIR.value, split, loaded.step, protocol.name)
    evaluation.write_results(path, results, names, protocol.settings())
    writers.log_class_table(f'{split}, step {loaded.step}, {protocol.name}', results, names)
    logging.info('%d images in %.0f s; results in %s', results['num_images'],
                 results['seconds'], path)


def _prediction_saver(config, step, protocol):
  """on_prediction for evaluate_split: each class map written as `predict` writes it."""
  # pylint: disable=import-outside-toplevel
  from pspnet_jax import predictions
  from pspnet_jax.data import registry
  # pylint: enable=import-outside-toplevel
  palette = registry.palette(config)
  out_dir = _SAVE_PREDICTIONS.value

  def save(file_name, image, class_map):
    predictions.save_prediction(out_dir, file_name, image, class_map, palette)

  del step, protocol
  return save


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)

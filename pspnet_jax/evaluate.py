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

  python -m pspnet_jax.evaluate --config=configs/ade20k.py --workdir=DIR \\
      --refine_workdir=CASCADEPSP_DIR [--refine_config=configs/cascadepsp.py]

also refines every prediction with CascadePSP's scene refinement
(pspnet_jax/scene_refinement.py; the checkpoint of CASCADEPSP_DIR, its config
the given one or its config.json) and writes
`DIR/eval/<split>-<step>-<protocol>-cascadepsp.json`: the refined predictions'
metrics, the model's own under 'unrefined', and the refinement's settings and
mIoU change (logged as `mIoU 41.23 -> 41.87 (+0.64) with CascadePSP
refinement`); --save_predictions then writes the refined predictions.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pspnet_jax import cli, distributed_flags, refine_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory whose checkpoint is evaluated.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_SPLIT = flags.DEFINE_string('split', None, 'TFDS split (default: config.data.eval_split).')
_SAVE_PREDICTIONS = flags.DEFINE_string(
    'save_predictions', None, 'Also write the predictions as `predict` does (gray/, color/, '
    'overlay/) into this folder.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'With --save_predictions: clear a folder '
                               'that another checkpoint or protocol wrote.')
flags.adopt_module_key_flags(distributed_flags)   # --help lists the multi-process flags
flags.adopt_module_key_flags(refine_flags)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  refine_flags.check()
  # Imported here so that --help and flag errors do not pay for importing JAX and TF.
  # pylint: disable=import-outside-toplevel
  import jax
  from pspnet_jax import (checkpoint, configuration, evaluation, inference, predictions,
                          writers)
  from pspnet_jax.data import registry
  # pylint: enable=import-outside-toplevel

  distributed_flags.initialize()
  config = _CONFIG.value
  configuration.validate(config)
  cli.check_batch_sizes(config, 'eval.batch_size')
  protocol = inference.Protocol.from_config(config)
  split = _SPLIT.value or config.data.eval_split
  try:
    loaded = checkpoint.load_model(config, _WORKDIR.value, _STEP.value)
    refiner = refine_flags.scene_refiner(config.data.name)
  except checkpoint.DamagedCheckpoint as error:   # a fault of a workdir, named in one line
    logging.error('%s', error)
    sys.exit(1)
  logging.info('evaluating step %d of %s on %s: %s', loaded.step, _WORKDIR.value, split,
               protocol.settings())
  if refiner is not None:
    logging.info('and the predictions refined with CascadePSP: %s', refiner.settings)
  predictor = inference.Predictor.from_model(loaded.model, config, protocol=protocol)
  names = registry.class_names(config)
  saver = None
  if _SAVE_PREDICTIONS.value:
    run = predictions.describe_run(config, _WORKDIR.value, loaded.step, protocol,
                                   config_flags.get_config_filename(flags.FLAGS['config']))
    if refiner is not None:   # refined predictions are another protocol's
      run['protocol'] = {**run['protocol'], 'refinement': refiner.settings}
    predictions.claim_output(_SAVE_PREDICTIONS.value, run, overwrite=_OVERWRITE.value)
    saver = _PredictionSaver(predictions.save_prediction, _SAVE_PREDICTIONS.value,
                             registry.palette(config))
  results = evaluation.evaluate_split(predictor, config, split, on_prediction=saver,
                                      refine=refiner)
  if saver is not None:
    saved = predictions.gather_results(saver.classes, [])
    if jax.process_index() == 0:
      predictions.write_summary(_SAVE_PREDICTIONS.value, run, saved, names, saver.palette)
  if jax.process_index() == 0:
    path = evaluation.results_path(_WORKDIR.value, split, loaded.step, protocol.name)
    evaluation.write_results(path, results, names, protocol.settings())
    writers.log_class_table(f'{split}, step {loaded.step}, {protocol.name}', results, names)
    logging.info('%d images in %.0f s; results in %s', results['num_images'],
                 results['seconds'], path)
    if refiner is not None:
      # The refined predictions' results beside the model's own: the same images and time.
      refined = {**results, **results['refined']}
      change = refined['mIoU'] - results['mIoU']
      refined_path = path.removesuffix('.json') + '-cascadepsp.json'
      evaluation.write_results(refined_path, refined, names, protocol.settings(), extra={
          'unrefined': evaluation.metrics_record(results, names),
          'refinement': {**refiner.settings, 'mIoU_change': change}})
      writers.log_class_table(f'{split}, step {loaded.step}, {protocol.name}, CascadePSP',
                              refined, names)
      logging.info('mIoU %.2f -> %.2f (%+.2f) with CascadePSP refinement; results in %s',
                   100 * results['mIoU'], 100 * refined['mIoU'], 100 * change, refined_path)


class _PredictionSaver:
  """on_prediction of evaluate_split: each class map written as `predict` writes it, named by
  the example's file name without its extension."""

  def __init__(self, save_prediction, out_dir: str, palette):
    self._save = save_prediction   # predictions.save_prediction, imported by main
    self.out_dir, self.palette = out_dir, palette
    self.classes = {}   # name -> classes present, for the legend

  def __call__(self, file_name, image, class_map):
    name = os.path.splitext(file_name)[0]
    self.classes[name] = self._save(self.out_dir, name, image, class_map, self.palette)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)

"""Trains PSPNet with periodic evaluation; restarting the same command resumes.

  python -m pspnet_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m pspnet_jax.main --config=configs/ade20k.py --workdir=runs/ade20k \\
      --config.train.batch_size=8

On several hosts every process runs the same command; with
`--coordinator_address` (or inside a Cloud TPU / SLURM job, detected by
`--distributed`) jax.distributed connects them first.

Exit status: 0 when the run finished or stopped on request (checkpoint saved);
1 for a fault of the run directory (a damaged checkpoint, a failed write);
2 for a mistake in the command line, the config or the data it names (one line
saying what and how to fix it; a run that fails so leaves no new workdir behind);
75 (EX_TEMPFAIL) when another run holds the workdir: a retry may succeed once
that run ends or its lease expires, which launch/tpu.sh watch waits for.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pspnet_jax import cli, distributed_flags, stop_request
from pspnet_jax.errors import MissingFile, UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, metrics, logs.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
    'allow_config_change', [], 'Config keys a resumed run may change from the ones it was '
    'started with (e.g. train.num_steps for a longer schedule); the changes are logged. '
    'Without it a resume refuses changes that alter the computation, naming them.')
flags.adopt_module_key_flags(distributed_flags)   # --help lists the multi-process flags
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # First, so that a signal while JAX starts or the step compiles still ends cleanly.
  stop = stop_request.StopRequest()
  # Imported here so that --help and flag errors do not pay for importing JAX and TF.
  # pylint: disable=import-outside-toplevel
  import jax
  from pspnet_jax import checkpoint, run_lock, train
  from pspnet_jax.data import pipeline
  # pylint: enable=import-outside-toplevel

  distributed_flags.initialize()
  if jax.process_count() > 1:
    stop.hand_over_to_jax()
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  # The mistakes a run can know of before it writes anything: the config's values, batches that
  # do not split over the devices or exceed the training examples. A dataset not prepared is
  # reported by training (its message says how), after a held workdir (exit 75, retried).
  config = _CONFIG.value
  train.validate(config)
  cli.check_batch_sizes(config, 'train.batch_size', 'eval.batch_size')
  try:
    num_examples = pipeline.num_examples(config, config.data.train_split)
  except MissingFile:
    num_examples = None
  if num_examples is not None and config.train.batch_size > num_examples:
    raise UserError(f'config.train.batch_size={config.train.batch_size} is larger than the '
                    f'{num_examples} training examples of {config.data.name}')
  try:
    # A run that fails before it wrote anything leaves no new workdir (process 0 decides: the
    # others must not remove it under a process that is still starting).
    with cli.no_empty_leftovers(_WORKDIR.value if jax.process_index() == 0 else None):
      train.train_and_evaluate(config, _WORKDIR.value,
                               allowed_config_changes=_ALLOW_CONFIG_CHANGE.value, stop=stop)
  except run_lock.WorkdirInUse as error:
    logging.error('%s', error)
    sys.exit(os.EX_TEMPFAIL)
  except (checkpoint.CheckpointWriteError, checkpoint.DamagedCheckpoint) as error:
    # Faults of the run directory: the message says what and where; nothing was lost.
    logging.error('%s', error)
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)

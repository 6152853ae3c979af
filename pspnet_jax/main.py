"""Trains PSPNet with periodic evaluation; restarting the same command resumes.

  python -m pspnet_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m pspnet_jax.main --config=configs/ade20k.py --workdir=runs/ade20k \\
      --config.train.batch_size=8

On several hosts every process runs the same command; with
`--coordinator_address` (or inside a Cloud TPU / SLURM job, detected by
`--distributed`) jax.distributed connects them first.

Exit status: 0 when the run finished or stopped on request (checkpoint saved);
1 for a fault of the run directory (a damaged checkpoint, a failed write);
75 (EX_TEMPFAIL) when another run holds the workdir: a retry may succeed once
that run ends or its lease expires, which launch/tpu.sh watch waits for.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pspnet_jax import distributed_flags, stop_request

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
  import jax  # pylint: disable=import-outside-toplevel
  from pspnet_jax import checkpoint, run_lock, train  # pylint: disable=import-outside-toplevel

  checkpoint.quiet_orbax_logs()
  distributed_flags.initialize()
  if jax.process_count() > 1:
    stop.hand_over_to_jax()
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                             allowed_config_changes=_ALLOW_CONFIG_CHANGE.value, stop=stop)
  except run_lock.WorkdirInUse as error:
    logging.error('%s', error)
    sys.exit(os.EX_TEMPFAIL)
  except (checkpoint.CheckpointWriteError, checkpoint.DamagedCheckpoint) as error:
    # Faults of the run directory: the message says what and where; nothing was lost.
    logging.error('%s', error)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)

"""The multi-process flags every command shares, and jax.distributed from them.

A command-side module: importing it defines absl flags, so only the commands
import it (tests/test_layout.py keeps it out of the libraries). Each command
adopts the flags as its own (`flags.adopt_module_key_flags`), so `--help`
lists them.
"""

from absl import flags

DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() with cluster auto-detection '
    '(Cloud TPU, SLURM); implied by --coordinator_address.')
COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                  'host:port of process 0, for a hand-started multi-process run.')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --coordinator_address.')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --coordinator_address.')


def initialize() -> None:
  """jax.distributed for these flags: a hand-started cluster (--coordinator_address), a
  detected one (--distributed), or none (one process)."""
  import jax  # pylint: disable=import-outside-toplevel  (after flag parsing: --help stays fast)
  if COORDINATOR.value:
    jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
  elif DISTRIBUTED.value:
    jax.distributed.initialize()

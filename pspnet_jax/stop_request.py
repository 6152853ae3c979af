"""Signals that stop a training run cleanly: SIGTERM and Ctrl-C ask it to save and exit.

A `StopRequest` is installed before anything slow (importing JAX, reading
the data, compiling), so a signal in any phase leaves a resumable run and a
clean exit: the training loop reads `requested` before its first step and
after every step. A second Ctrl-C aborts at once, without saving.

With several processes every one must stop at the same step, whichever got
the signal. jax.distributed's preemption notifier takes SIGTERM over when it
starts, and orbax's `reached_preemption` makes all processes agree on the
step; `hand_over_to_jax` turns this object into a forwarder that passes
Ctrl-C, and a signal that came before the notifier existed, on to it as a
SIGTERM, and `requested` then stays False on every process.

Imports nothing heavy: the command installs it before importing JAX.
"""

import os
import signal

from absl import logging


class StopRequest:
  """Handles SIGINT and SIGTERM from construction until `restore`."""

  def __init__(self):
    self.requested = False
    self._interrupted = False
    self._forward = False
    self._previous = {signum: signal.signal(signum, self._handle)
                      for signum in (signal.SIGINT, signal.SIGTERM)}

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self._interrupted:
        raise KeyboardInterrupt('second Ctrl-C: stopped without saving')
      self._interrupted = True
    logging.warning('signal %d: saving a checkpoint after this step, then exiting%s', signum,
                    ' (Ctrl-C again: stop now without saving)' if signum == signal.SIGINT else '')
    if self._forward:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.requested = True

  def hand_over_to_jax(self) -> None:
    """After jax.distributed.initialize with several processes: JAX's notifier owns SIGTERM."""
    # The notifier replaced our SIGTERM handler; putting the old one back later would
    # remove the notifier, so SIGTERM is not ours to restore any more.
    self._previous.pop(signal.SIGTERM)
    self._forward = True
    if self.requested:
      self.requested = False
      os.kill(os.getpid(), signal.SIGTERM)

  def restore(self) -> None:
    """Puts back the handlers found at construction."""
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

"""The one place that talks to orbax: checkpoints of a workdir, saved and restored by step.

A checkpoint is a folder `WORKDIR/checkpoints/<step>/` with named items:
`model` (the model's parameters and BatchNorm statistics as a nested dict,
float32) and `meta` (JSON: where the weights came from, the config, the step
counters). Training adds `opt` (the optimizer state) and writes `num_steps`
into meta, so a restart continues exactly where the run stopped (the data
order is a function of the step, `data.pipeline`); a checkpoint without them
(an imported one) starts the optimizer and the data order afresh from its
weights.
Before restoring, the stored shapes are compared with the ones the config
builds, so a checkpoint of another model fails with the parameter's name
instead of an orbax stack trace.

Every checkpoint's meta carries a digest of each saved array (`digests`,
computed on the devices at save time), and every restore recomputes them: a
flipped byte that orbax would read back without complaint, a truncated or
missing file, a deleted manifest or garbage metadata all raise
`DamagedCheckpoint`, naming the checkpoint, the item and the arrays. A
training run then falls back to the newest intact checkpoint
(`TrainCheckpointer.restore_newest_intact`), moving the damaged ones aside
into `WORKDIR/damaged_checkpoints/`.

A save that cannot write fails fast with one line naming the path and the OS
error (`CheckpointWriteError`): the folder is probed before every save (orbax
itself would wait five minutes for a step folder it could not create), and
the background write's outcome is checked after every training step.

WORKDIR may be a `gs://` URI: orbax writes the arrays with tensorstore and
the rest through etils.epath, as does this module (`pspnet_jax.paths`).
"""

import datetime
import functools
import os
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy

from pspnet_jax import cli, paths, sharding
from pspnet_jax.errors import MissingFile, UserError
from pspnet_jax.models import create_model, dropout_streams

# Key of the eval metric that decides which checkpoint is the best one.
BEST_METRIC = 'eval/mIoU'
# The meta key that marks a training checkpoint (which must have its optimizer item).
TRAINING_META_KEY = 'num_steps'
# Where damaged checkpoints are moved, so that a run can save those steps again.
DAMAGED_DIR = 'damaged_checkpoints'


class DamagedCheckpoint(ValueError):
  """A checkpoint's files cannot be read back as they were written."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the previous one is still the latest."""


def quiet_orbax_logs() -> None:
  """Orbax's routine messages off the console (its INFO lines, dozens per checkpoint, and the
  warnings expected here): `cli.quiet_logs`, which cli.run installs for every command."""
  cli.quiet_logs()


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(paths.absolute(workdir), 'checkpoints')


def model_variables(model: nnx.Module) -> nnx.State:
  """What a checkpoint holds of a model: parameters and BatchNorm statistics (no RNG state)."""
  return nnx.state(model, (nnx.Param, nnx.BatchStat))


def dotted_name(path) -> str:
  """A pytree key path -> 'layer1.0.conv1.kernel' (dict keys, sequence indices, attributes)."""
  def part(entry):
    for attribute in ('key', 'idx', 'name'):
      if hasattr(entry, attribute):
        return str(getattr(entry, attribute))
    return str(entry)
  return '.'.join(part(entry) for entry in path)


def flatten(tree) -> dict:
  """Nested dict -> {'layer1.0.conv1.kernel': leaf}."""
  return {dotted_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# Knuth's multiplicative constant: position weights that make a swap of two values change
# the digest, where a plain sum would not.
_POSITION_MIX = 2654435761


def _array_digest(x: jax.Array) -> jax.Array:
  """Two uint32 sums of the array's bits: plain and position-weighted, both modulo 2**32.

  A change of any one value changes the plain sum (a flipped bit adds or
  subtracts a power of two, never a multiple of 2**32); the weighted sum
  catches values moved around. Integer sums are exact in any order, so the
  digest is the same on every device count and sharding.
  """
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{x.dtype.itemsize * 8}'))
    bits = bits.astype(jnp.uint32)
  bits = bits.ravel()
  positions = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(_POSITION_MIX) + 1
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                    jnp.sum(bits * positions, dtype=jnp.uint32)])


_tree_digests = jax.jit(lambda tree: jax.tree.map(_array_digest, tree))


def digests(tree) -> dict[str, str]:
  """{array name: 16 hex digits} of a tree of arrays, computed where the arrays live."""
  sums = jax.device_get(_tree_digests(tree))
  return {name: f'{int(pair[0]):08x}{int(pair[1]):08x}' for name, pair in flatten(sums).items()}


def _verify(tree, saved: dict[str, str], where: str, item: str) -> None:
  """Raises DamagedCheckpoint naming the arrays of `item` whose digest is not the saved one."""
  now = digests(tree)
  changed = sorted(name for name in saved if now.get(name) != saved[name])
  if changed:
    listed = ', '.join(changed[:5]) + (f' and {len(changed) - 5} more' if len(changed) > 5 else '')
    raise DamagedCheckpoint(f'{where} is damaged: the {item} item reads back different from what '
                            f'was saved ({listed})')


def _read(where: str, item: str, read: Callable):
  """read(), with any failure to read the files of `item` reported as DamagedCheckpoint."""
  try:
    return read()
  except DamagedCheckpoint:
    raise
  except Exception as error:  # pylint: disable=broad-except
    # tensorstore, JSON, missing files, orbax's own checks: all mean the files are not
    # what was written. Only the first line: tensorstore's messages run to pages.
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise DamagedCheckpoint(f'{where} is damaged: its {item} item cannot be read '
                            f'({type(error).__name__}: {reason[:300]})') from error


def _os_error_reason(error: Exception) -> str:
  """The OS error inside an orbax / tensorstore failure ('File too large'), else its first line."""
  for cause in (error, error.__cause__, error.__context__):
    if isinstance(cause, OSError) and cause.strerror:
      return f'{cause.strerror} [errno {cause.errno}]'
  code = re.search(r"os_error_code='(\d+)'", str(error))
  if code:
    return f'{os.strerror(int(code.group(1)))} [errno {code.group(1)}]'
  text = str(error).strip()
  return text.splitlines()[0][:300] if text else type(error).__name__


def _manager(workdir: str, options: ocp.CheckpointManagerOptions | None = None
             ) -> ocp.CheckpointManager:
  # Handlers named up front so that item metadata (shapes) can be read before any restore.
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers={
      'model': ocp.StandardCheckpointHandler(), 'opt': ocp.StandardCheckpointHandler(),
      'meta': ocp.JsonCheckpointHandler()})


def all_steps(workdir: str) -> list[int]:
  if not epath.Path(checkpoint_dir(workdir)).is_dir():
    return []
  with _manager(workdir) as manager:
    return list(manager.all_steps())


def save_model(workdir: str, step: int, variables: nnx.State, meta: dict) -> str:
  """Writes `variables` (see `model_variables`) and `meta` as checkpoint `step`; returns its path."""
  tree = variables.to_pure_dict()
  meta = {**meta, 'digests': {'model': digests(tree)}}
  with _manager(workdir) as manager:
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
  return os.path.join(checkpoint_dir(workdir), str(step))


def _check_shapes(stored_metadata, expected: dict, where: str) -> None:
  stored = {name: tuple(meta.shape) for name, meta in flatten(stored_metadata).items()}
  wanted = {name: tuple(leaf.shape) for name, leaf in flatten(expected).items()}
  problems = [f'{name}: checkpoint has shape {stored[name]}, the config builds {wanted[name]}'
              for name in sorted(stored.keys() & wanted.keys()) if stored[name] != wanted[name]]
  problems += [f'{name}: missing from the checkpoint' for name in sorted(wanted.keys() - stored.keys())]
  problems += [f'{name}: in the checkpoint but not in the model' for name in
               sorted(stored.keys() - wanted.keys())]
  if problems:
    shown = '\n  '.join(problems[:10])
    more = f'\n  ... and {len(problems) - 10} more' if len(problems) > 10 else ''
    raise UserError(f'{where} does not match the model of the config '
                    f'(check model.backbone, model.use_ppm, data.num_classes):\n  {shown}{more}')


def _abstract(tree):
  """The restore target of a tree of arrays: shapes, dtypes and shardings, no data.

  A leaf without a sharding goes to the first local device: orbax would
  otherwise use the saved shardings, which name the devices of the run that
  saved (another process count fails with a topology mismatch).
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, 'sharding', None) or default), tree)


def restore_model(workdir: str, abstract_variables: nnx.State, step: int | None = None):
  """Restores checkpoint `step` (default: the latest) into the structure of `abstract_variables`.

  Returns (variables as nnx.State, step, meta dict).
  """
  # Checked before orbax's manager, which would create an empty checkpoints/ folder.
  steps = all_steps(workdir)
  if not steps:
    raise MissingFile(
        f'no checkpoint in {checkpoint_dir(workdir)}: train there first (python -m '
        f'pspnet_jax.main --workdir={workdir}) or import weights (python -m '
        f'pspnet_jax.convert --workdir={workdir} --import_path=...)')
  if step is not None and step not in steps:
    raise MissingFile(f'no checkpoint for step {step} in {checkpoint_dir(workdir)}; '
                      f'there are {steps}')
  with _manager(workdir) as manager:
    step = manager.latest_step() if step is None else step
    where = f'checkpoint {os.path.join(checkpoint_dir(workdir), str(step))}'
    meta = _restore_item(manager, step, where, 'meta', ocp.args.JsonRestore())
    variables = _restore_model_item(manager, step, where, abstract_variables,
                                    meta.get('digests', {}))
  return variables, step, meta


def _restore_item(manager: ocp.CheckpointManager, step: int, where: str, name: str, args):
  """Item `name` of checkpoint `step`; a failure to read it raises DamagedCheckpoint."""
  return _read(where, name, lambda: manager.restore(
      step, args=ocp.args.Composite(**{name: args}))[name])


def _restore_model_item(manager: ocp.CheckpointManager, step: int, where: str,
                        variables: nnx.State, saved_digests: dict) -> nnx.State:
  """The model item in the shapes and shardings of `variables`: the stored shapes are compared
  with the config's first (a mismatch names the parameter), the digests checked after."""
  target = _abstract(variables.to_pure_dict())
  _check_shapes(_read(where, 'model', lambda: manager.item_metadata(step)['model']), target,
                where)
  model = _restore_item(manager, step, where, 'model', ocp.args.StandardRestore(target))
  _verify(model, saved_digests.get('model', {}), where, 'model')
  restored = nnx.State(variables)
  nnx.replace_by_pure_dict(restored, model)
  return restored


def _best_metric(metrics: dict) -> float:
  return metrics[BEST_METRIC]


class LoadedModel(NamedTuple):
  model: nnx.Module   # eval mode, variables replicated over the mesh
  step: int
  meta: dict          # the checkpoint's meta item (source, config, counters)


def load_model(config, workdir: str, step: int | None = None, *, mesh=None) -> LoadedModel:
  """The model of `config` at checkpoint `step` (default: the latest) of `workdir`.

  The one way every consumer (evaluation, prediction, export, benchmarks)
  gets a trained model: its shapes come from `nnx.eval_shape`, and the
  variables are restored straight into replicated shardings over `mesh`
  (default: all devices), never built at random first.
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  abstract_model = nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(config.seed)))
  graphdef, abstract_variables, _ = nnx.split(abstract_model, (nnx.Param, nnx.BatchStat), ...)
  abstract_variables = sharding.with_sharding(abstract_variables, sharding.replicated(mesh))
  variables, step, meta = restore_model(workdir, abstract_variables, step)
  streams = jax.jit(lambda: dropout_streams(config), out_shardings=sharding.replicated(mesh))()
  model = nnx.merge(graphdef, variables, streams)
  model.eval()
  return LoadedModel(model, step, meta)


class Restored(NamedTuple):
  step: int
  variables: nnx.State
  opt_state: object     # None for a weights-only checkpoint (an import)
  meta: dict


def _all_processes_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (each reads its own shards)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


class TrainCheckpointer:
  """Checkpoints of a training run: asynchronous saves, the latest two and the best kept.

  Orbax writes in the background after copying the arrays off the devices, so
  training goes on while the files are written; every save is atomic (a
  half-written step is never listed, and its temporary folder is removed at
  the next start). Kept: the two latest checkpoints, so that one damaged file
  still leaves an intact one to resume from, and the one with the highest
  `eval/mIoU` (a policy of both; `max_to_keep` with a `best_fn` alone would
  delete the latest). The metric of an evaluated checkpoint is written beside
  it (`<step>/metrics/metrics`, JSON), so the best one is still known, and
  kept, after any number of restarts.
  """

  def __init__(self, workdir: str):
    policy = preservation_policy.AnyPreservationPolicy([
        preservation_policy.LatestN(n=2),
        preservation_policy.BestN(get_metric_fn=_best_metric, n=1,
                                  keep_checkpoints_without_metrics=False)])
    self.workdir = workdir
    self.directory = checkpoint_dir(workdir)
    self._last_save = None      # the step whose background write was started last
    self._failed = False        # a write error was raised already (not raised twice)
    self._probe_writable(step=None)
    # best_fn is what makes orbax write the metrics to disk and read them back when a
    # manager starts; with the policy alone they lived in memory, and after a restart
    # the old best had no score and the next save deleted it.
    self._manager = _manager(workdir, ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_best_metric, enable_async_checkpointing=True,
        cleanup_tmp_directories=True))

  def best_step(self) -> int | None:
    """The kept checkpoint with the highest BEST_METRIC; None when none was evaluated."""
    return self._manager.best_step()

  def metrics(self, step: int) -> dict | None:
    """The evaluation metrics saved with checkpoint `step` (None for other checkpoints)."""
    return self._manager.metrics(step)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def reached_preemption(self, step: int) -> bool:
    """True when the platform announced a preemption (all processes agree on `step`)."""
    return self._manager.reached_preemption(step)

  def _write_error(self, step: int | None, error: Exception) -> CheckpointWriteError:
    self._failed = True
    # Listed from the folder: orbax's own list already holds the step being written.
    on_disk = [int(path.name) for path in epath.Path(self.directory).iterdir()
               if path.name.isdigit() and int(path.name) != step]
    kept = (f'the latest checkpoint is still step {max(on_disk)}' if on_disk else
            'no checkpoint was written')
    what = 'checkpoints cannot' if step is None else f'checkpoint {step} could not'
    return CheckpointWriteError(f'{what} be written to {self.directory}: '
                                f'{_os_error_reason(error)}; {kept}')

  def _probe_writable(self, step: int | None) -> None:
    """Writes and removes a small file: orbax itself hangs for minutes on an unwritable folder."""
    directory = epath.Path(self.directory)
    probe = directory / f'.write-probe-{jax.process_index()}'
    try:
      directory.mkdir(parents=True, exist_ok=True)
      probe.write_text('probe')
      probe.unlink()
    except OSError as error:
      if step is None:
        self._failed = True
        raise CheckpointWriteError(f'checkpoints cannot be written to {self.directory}: '
                                   f'{_os_error_reason(error)}') from error
      raise self._write_error(step, error) from error

  def check_for_errors(self) -> None:
    """Raises CheckpointWriteError when the last background write failed (cheap; call often)."""
    # A background write that failed ends its thread with the error, which only a wait
    # raises (orbax's own check_for_errors is consumed by its finalize thread); waiting
    # on a finished write returns at once.
    if self._last_save is not None and not self._manager.is_saving_in_progress():
      self.wait_until_finished()

  def save(self, step: int, variables: nnx.State, opt_state, meta: dict,
           metrics: dict | None = None) -> None:
    """Starts writing checkpoint `step`; `metrics` (with BEST_METRIC) marks eval checkpoints."""
    self.check_for_errors()
    self._probe_writable(step)
    model_tree = variables.to_pure_dict()
    meta = {**meta, 'digests': {'model': digests(model_tree), 'opt': digests(opt_state)}}
    try:
      self._manager.save(step, args=ocp.args.Composite(
          model=ocp.args.StandardSave(model_tree),
          opt=ocp.args.StandardSave(opt_state),
          meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)
    except Exception as error:  # pylint: disable=broad-except
      raise self._write_error(step, error) from error
    self._last_save = step

  def restore(self, step: int, variables: nnx.State, opt_state,
              check_meta: Callable[[int, dict], None] | None = None):
    """Restores checkpoint `step` into the shapes and shardings of `variables` and `opt_state`.

    Returns (variables, opt_state or None, meta). A checkpoint with only
    weights (written by `convert`) returns None for the optimizer.
    `check_meta(step, meta)` of a training checkpoint runs before any array is
    read (the resume's config comparison). Raises DamagedCheckpoint for files
    that do not read back as written, ValueError for a checkpoint of another
    model.
    """
    where = f'checkpoint {os.path.join(self.directory, str(step))}'
    restore_item = functools.partial(_restore_item, self._manager, step, where)
    meta = restore_item('meta', ocp.args.JsonRestore())
    if not isinstance(meta, dict):
      raise DamagedCheckpoint(f'{where} is damaged: its meta item is not a JSON object')
    # Training writes num_steps into every checkpoint's meta; an import (convert) never
    # does. A training checkpoint without all of its items is damaged: taking it for an
    # import would rerun the schedule from step 0 on trained weights.
    complete = TRAINING_META_KEY in meta
    if complete:
      missing = [item for item in ('model', 'opt')
                 if not (epath.Path(self.directory) / str(step) / item).is_dir()]
      if missing:
        raise DamagedCheckpoint(f'{where} is damaged: this training checkpoint has no '
                                f'{" or ".join(missing)} item')
      if check_meta is not None:
        check_meta(step, meta)
    saved_digests = meta.get('digests', {})
    variables = _restore_model_item(self._manager, step, where, variables, saved_digests)
    opt = None
    if complete:
      opt = restore_item('opt', ocp.args.StandardRestore(_abstract(opt_state)))
      _verify(opt, saved_digests.get('opt', {}), where, 'opt')
    return variables, opt, meta

  def restore_newest_intact(self, variables: nnx.State, opt_state,
                            check_meta: Callable[[int, dict], None] | None = None
                            ) -> Restored | None:
    """`restore` of the newest checkpoint that reads back intact; None when there is none.

    Damaged newer checkpoints are reported (which one, which item), then moved
    to WORKDIR/damaged_checkpoints/ so that the run can write those steps
    again. When every checkpoint is damaged nothing is moved and the run stops:
    starting afresh would throw the run away.
    """
    damaged = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      reason = None
      try:
        result = self.restore(step, variables, opt_state, check_meta)
      except DamagedCheckpoint as error:
        reason = str(error)
      if _all_processes_agree(reason is None):
        if damaged:
          self._set_aside(damaged)
          logging.error('resuming from checkpoint %d, the newest intact one', step)
        return Restored(step, *result)
      logging.error('%s; trying the checkpoint before it', reason or
                    f'another process could not read checkpoint {step}')
      damaged.append(step)
    if damaged:
      raise DamagedCheckpoint(
          f'every checkpoint in {self.directory} is damaged (steps {sorted(damaged)}, reasons '
          f'above). Move them out of it to start the run afresh.')
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged checkpoints out of the checkpoint folder (process 0), loudly."""
    if jax.process_index() == 0:
      aside = epath.Path(self.workdir) / DAMAGED_DIR
      aside.mkdir(parents=True, exist_ok=True)
      stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
      for step in steps:
        destination = aside / f'{step}-{stamp}'
        (epath.Path(self.directory) / str(step)).rename(destination)
        logging.error('moved damaged checkpoint %d to %s', step, destination)
    multihost_utils.sync_global_devices('pspnet_jax: damaged checkpoints set aside')
    self._manager.reload()

  def wait_until_finished(self) -> None:
    """Blocks until the last save is on disk; raises CheckpointWriteError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      raise self._write_error(self._last_save, error) from error

  def close(self) -> None:
    """Finishes the last save and closes; a write error already raised is not raised again."""
    reported = self._failed
    try:
      self.wait_until_finished()
    except CheckpointWriteError:
      if not reported:
        raise
    finally:
      self._manager.close()

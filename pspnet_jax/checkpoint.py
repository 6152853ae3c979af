"""The one place that talks to orbax: checkpoints of a workdir, saved and restored by step.

A checkpoint is a folder `WORKDIR/checkpoints/<step>/` with named items:
`model` (the model's parameters and BatchNorm statistics as a nested dict,
float32) and `meta` (JSON: where the weights came from, the config, the step
counters). Training adds `opt` (the optimizer state) and `data` (the Grain
iterator state of every process), so a restart continues exactly where the run
stopped; a checkpoint without them (an imported one) starts the optimizer and
the data order afresh from its weights.
Before restoring, the stored shapes are compared with the ones the config
builds, so a checkpoint of another model fails with the parameter's name
instead of an orbax stack trace.
"""

import os
from typing import NamedTuple

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy

from pspnet_jax import sharding
from pspnet_jax.models import create_model, dropout_streams

# Key of the eval metric that decides which checkpoint is the best one.
BEST_METRIC = 'eval/mIoU'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def model_variables(model: nnx.Module) -> nnx.State:
  """What a checkpoint holds of a model: parameters and BatchNorm statistics (no RNG state)."""
  return nnx.state(model, (nnx.Param, nnx.BatchStat))


def dotted_name(path) -> str:
  """A pytree key path of nested dicts -> 'layer1.0.conv1.kernel'."""
  return '.'.join(str(entry.key) for entry in path)


def flatten(tree) -> dict:
  """Nested dict -> {'layer1.0.conv1.kernel': leaf}."""
  return {dotted_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _manager(workdir: str, options: ocp.CheckpointManagerOptions | None = None
             ) -> ocp.CheckpointManager:
  # Handlers named up front so that item metadata (shapes) can be read before any restore.
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers={
      'model': ocp.StandardCheckpointHandler(), 'opt': ocp.StandardCheckpointHandler(),
      'data': grain.checkpoint.CheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})


def all_steps(workdir: str) -> list[int]:
  if not os.path.isdir(checkpoint_dir(workdir)):
    return []
  with _manager(workdir) as manager:
    return list(manager.all_steps())


def save_model(workdir: str, step: int, variables: nnx.State, meta: dict) -> str:
  """Writes `variables` (see `model_variables`) and `meta` as checkpoint `step`; returns its path."""
  with _manager(workdir) as manager:
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(variables.to_pure_dict()), meta=ocp.args.JsonSave(meta)))
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
    raise ValueError(f'{where} does not match the model of the config '
                     f'(check model.backbone, model.use_ppm, data.num_classes):\n  {shown}{more}')


def _abstract(tree):
  """The restore target of a tree of arrays: shapes, dtypes and shardings, no data."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
      tree)


def restore_model(workdir: str, abstract_variables: nnx.State, step: int | None = None):
  """Restores checkpoint `step` (default: the latest) into the structure of `abstract_variables`.

  Returns (variables as nnx.State, step, meta dict).
  """
  with _manager(workdir) as manager:
    if step is None:
      step = manager.latest_step()
      if step is None:
        raise FileNotFoundError(
            f'no checkpoint in {checkpoint_dir(workdir)}: train there first (python -m '
            f'pspnet_jax.main --workdir={workdir}) or import weights (python -m '
            f'pspnet_jax.convert --workdir={workdir} --import_path=...)')
    elif step not in manager.all_steps():
      raise FileNotFoundError(f'no checkpoint for step {step} in {checkpoint_dir(workdir)}; '
                              f'there are {list(manager.all_steps())}')
    target = _abstract(abstract_variables.to_pure_dict())
    where = f'checkpoint {os.path.join(checkpoint_dir(workdir), str(step))}'
    _check_shapes(manager.item_metadata(step)['model'], target, where)
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  variables = nnx.State(abstract_variables)
  nnx.replace_by_pure_dict(variables, restored['model'])
  return variables, step, restored['meta']


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


class TrainCheckpointer:
  """Checkpoints of a training run: asynchronous saves, the latest and the best kept.

  Orbax writes in the background after copying the arrays off the devices, so
  training goes on while the files are written; every save is atomic (a
  half-written step is never listed). Kept: the latest checkpoint and the one
  with the highest `eval/mIoU` (a policy of both; `max_to_keep` with a
  `best_fn` alone would delete the latest). The metric of an evaluated
  checkpoint is written beside it (`<step>/metrics/metrics`, JSON), so the
  best one is still known, and kept, after any number of restarts.
  """

  def __init__(self, workdir: str):
    policy = preservation_policy.AnyPreservationPolicy([
        preservation_policy.LatestN(n=1),
        preservation_policy.BestN(get_metric_fn=_best_metric, n=1,
                                  keep_checkpoints_without_metrics=False)])
    self.workdir = workdir
    # best_fn is what makes orbax write the metrics to disk and read them back when a
    # manager starts; with the policy alone they lived in memory, and after a restart
    # the old best had no score and the next save deleted it.
    self._manager = _manager(workdir, ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_best_metric, enable_async_checkpointing=True))

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

  def save(self, step: int, variables: nnx.State, opt_state, data_iterator, meta: dict,
           metrics: dict | None = None) -> None:
    """Starts writing checkpoint `step`; `metrics` (with BEST_METRIC) marks eval checkpoints."""
    self._manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(variables.to_pure_dict()),
        opt=ocp.args.StandardSave(opt_state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)

  def restore(self, step: int, variables: nnx.State, opt_state, data_iterator,
              data_layout: dict):
    """Restores checkpoint `step` into the shapes and shardings of `variables` and `opt_state`.

    Returns (variables, opt_state or None, meta); `data_iterator` is advanced in
    place. A checkpoint with only weights (written by `convert`) returns None
    for the optimizer and leaves the iterator at the start. `data_layout`
    (process count, Grain workers) must equal the one saved in meta: Grain
    keeps one iterator state per process and refuses another worker count.
    """
    step_dir = os.path.join(checkpoint_dir(self.workdir), str(step))
    where = f'checkpoint {step_dir}'
    # Training writes data_layout into every checkpoint's meta; an import (convert) never
    # does. A training checkpoint without all of its items is damaged: taking it for an
    # import would rerun the schedule from step 0 on trained weights.
    meta = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
    complete = 'data_layout' in meta
    if complete:
      missing = [item for item in ('model', 'opt', 'data')
                 if not os.path.isdir(os.path.join(step_dir, item))]
      if missing:
        raise ValueError(f'{where} is damaged: this training checkpoint has no '
                         f'{" or ".join(missing)} item. Move it out of '
                         f'{checkpoint_dir(self.workdir)} to resume from the checkpoint before it.')
    stored = self._manager.item_metadata(step)
    target = _abstract(variables.to_pure_dict())
    _check_shapes(stored['model'], target, where)
    items = {'model': ocp.args.StandardRestore(target)}
    if complete:
      if meta['data_layout'] != data_layout:
        raise ValueError(
            f'{where} was written with {meta["data_layout"]}, this run has {data_layout}: the '
            f'data order can only continue with the same number of processes and '
            f'config.data.worker_count')
      items['opt'] = ocp.args.StandardRestore(_abstract(opt_state))
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    variables = nnx.State(variables)
    nnx.replace_by_pure_dict(variables, restored['model'])
    return variables, restored['opt'] if complete else None, meta

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

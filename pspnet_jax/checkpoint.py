"""The one place that talks to orbax: checkpoints of a workdir, saved and restored by step.

A checkpoint is a folder `WORKDIR/checkpoints/<step>/` with named items:
`model` (the model's parameters and BatchNorm statistics as a nested dict,
float32) and `meta` (JSON: where the weights came from, the config). Training
adds its own items (optimizer, data iterator) next to these.
Before restoring, the stored shapes are compared with the ones the config
builds, so a checkpoint of another model fails with the parameter's name
instead of an orbax stack trace.
"""

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx


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


def _manager(workdir: str) -> ocp.CheckpointManager:
  # Handlers named up front so that item metadata (shapes) can be read before any restore.
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers={
      'model': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})


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


def restore_model(workdir: str, abstract_variables: nnx.State, step: int | None = None):
  """Restores checkpoint `step` (default: the latest) into the structure of `abstract_variables`.

  Returns (variables as nnx.State, step, meta dict).
  """
  with _manager(workdir) as manager:
    if step is None:
      step = manager.latest_step()
      if step is None:
        raise FileNotFoundError(f'no checkpoint in {checkpoint_dir(workdir)}')
    elif step not in manager.all_steps():
      raise FileNotFoundError(f'no checkpoint for step {step} in {checkpoint_dir(workdir)}; '
                              f'there are {list(manager.all_steps())}')
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          abstract_variables.to_pure_dict())
    where = f'checkpoint {os.path.join(checkpoint_dir(workdir), str(step))}'
    _check_shapes(manager.item_metadata(step)['model'], target, where)
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  variables = nnx.State(abstract_variables)
  nnx.replace_by_pure_dict(variables, restored['model'])
  return variables, step, restored['meta']

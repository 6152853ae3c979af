"""The training state of a config: its shapes first, then initialized or restored in place.

MaxText's order: `jax.eval_shape` gives the state's shapes at no cost, and
the state is then either initialized under `jax.jit` with replicated
`out_shardings` or restored from a checkpoint straight into those shardings.
No process builds an unsharded copy first, and a resumed run never reads
`config.model.pretrained` (only a fresh run starts from it).
"""

import functools
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax
from etils import epath
from flax import nnx

from pspnet_jax import checkpoint, pretrained, sharding, weights
from pspnet_jax.errors import UserError
from pspnet_jax.models import create_model, dropout_streams


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # steps taken (batches consumed), int32
  applied_steps: jax.Array   # steps whose update was applied (the optimizer's clock), int32
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState
  rngs: nnx.State            # the dropout streams; reseeded from (seed, step) every step


def model_variables(state: TrainState) -> nnx.State:
  """All variables of the model in `state` (what `nnx.merge` with a graphdef needs)."""
  return nnx.merge_state(state.params, state.batch_stats, state.rngs)


def checkpoint_items(state: TrainState) -> tuple[nnx.State, dict]:
  """What a checkpoint holds of the state: the model variables and the optimizer item."""
  optimizer = {'opt_state': state.opt_state, 'step': state.step,
               'applied_steps': state.applied_steps}
  return nnx.merge_state(state.params, state.batch_stats), optimizer


def _fresh_model(config) -> nnx.Module:
  model = create_model(config, rngs=nnx.Rngs(config.seed))
  model.train()
  return model


def _split(model: nnx.Module):
  """(graphdef, params, batch_stats, dropout streams) of a model."""
  return nnx.split(model, nnx.Param, nnx.BatchStat, nnx.RngState)


def graphdefs(config) -> tuple[nnx.GraphDef, nnx.GraphDef]:
  """The (train-mode, eval-mode) graphdefs: NNX keeps the BatchNorm / dropout mode in the graph."""
  model = nnx.eval_shape(lambda: _fresh_model(config))
  train_graphdef = nnx.graphdef(model)
  model.eval()
  return train_graphdef, nnx.graphdef(model)


def _init_variables(config):
  """(params, batch_stats, rngs) of a fresh model, to run under jit."""
  return _split(_fresh_model(config))[1:]


def _new_state(params, batch_stats, rngs, tx) -> TrainState:
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, applied_steps=zero, params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rngs=rngs)


def _placed_new_state(params, batch_stats, rngs, tx, mesh) -> TrainState:
  """Step 0 with a fresh optimizer around the given variables, computed on the mesh."""
  return jax.jit(functools.partial(_new_state, tx=tx),
                 out_shardings=sharding.replicated(mesh))(params, batch_stats, rngs)


def abstract_train_state(config, tx: optax.GradientTransformation, mesh) -> TrainState:
  """The shapes, dtypes and (replicated) shardings of the train state, without computing it."""
  shapes = jax.eval_shape(lambda: _new_state(*_init_variables(config), tx))
  return sharding.with_sharding(shapes, sharding.replicated(mesh))


def init_train_state(config, tx: optax.GradientTransformation, mesh) -> TrainState:
  """A fresh train state, replicated over `mesh`: random initialization on the devices, then the
  backbone from `config.model.pretrained` when set."""
  replicated = sharding.replicated(mesh)
  params, batch_stats, rngs = jax.jit(lambda: _init_variables(config),
                                      out_shardings=replicated)()
  if config.model.pretrained:
    # A known name or URL is downloaded into the cache once (pspnet_jax.pretrained).
    path = pretrained.resolve(config.model.pretrained, config.model.pretrained_format)
    if not epath.Path(path).is_file():
      raise UserError(f'config.model.pretrained={config.model.pretrained!r}: no such file (or '
                      f'a name of {sorted(pretrained.KNOWN)}, or a URL)')
    variables = weights.backbone_from_file(
        jax.device_get(nnx.merge_state(params, batch_stats)), path,
        config.model.pretrained_format, deep_stem=config.model.deep_stem,
        stem_widths=config.model.stem_widths)
    params, batch_stats = nnx.split_state(sharding.replicate(variables, mesh), nnx.Param,
                                          nnx.BatchStat)
  return _placed_new_state(params, batch_stats, rngs, tx, mesh)


class Resumed(NamedTuple):
  state: TrainState
  step: int             # the checkpoint it came from
  meta: dict            # that checkpoint's meta item
  has_optimizer: bool   # False for a weights-only checkpoint (an import): step 0, fresh optimizer


def restore_train_state(config, tx: optax.GradientTransformation, mesh,
                        checkpointer: checkpoint.TrainCheckpointer,
                        check_meta=None) -> Resumed | None:
  """The train state of the newest intact checkpoint, restored into its shardings on `mesh`.

  None when the workdir has no checkpoint. A weights-only checkpoint (an
  import) starts the optimizer and the step count afresh. `check_meta(step, meta)` sees a
  training checkpoint's meta before any array is read.
  """
  abstract = abstract_train_state(config, tx, mesh)
  restored = checkpointer.restore_newest_intact(*checkpoint_items(abstract), check_meta)
  if restored is None:
    return None
  params, batch_stats = nnx.split_state(restored.variables, nnx.Param, nnx.BatchStat)
  rngs = jax.jit(lambda: dropout_streams(config), out_shardings=sharding.replicated(mesh))()
  if restored.opt_state is None:
    state = _placed_new_state(params, batch_stats, rngs, tx, mesh)
  else:
    state = TrainState(params=params, batch_stats=batch_stats, rngs=rngs, **restored.opt_state)
  return Resumed(state, restored.step, restored.meta, restored.opt_state is not None)

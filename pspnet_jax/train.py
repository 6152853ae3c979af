"""Training with periodic evaluation: `train_and_evaluate(config, workdir)`.

The step is a pure function of (TrainState, global batch) under `jax.jit`
with explicit shardings: the state replicated, the batch split over the
`data` axis of one mesh spanning every device of every process, the old state
donated. BatchNorm therefore normalizes over the global batch (synchronized
BatchNorm) without any collective written here.

Time is counted in steps. The k-th step (0-based) uses the learning rate of
`optim.learning_rates` at k and the dropout key fold_in(seed, k), and global
batch k is a function of (seed, k) (`pipeline.train_batches`): a restarted run
takes exactly the steps an uninterrupted one would, bit for bit on the same
mesh, and on another number of hosts, devices or data workers up to the
reduction order of the sums.

A step whose loss or gradient is not finite is skipped as a whole (parameters,
optimizer state and BatchNorm statistics keep their old values, the learning
rate schedule does not advance) and counted; `train.max_nonfinite_steps`
consecutive skips stop the run, leaving the last checkpoint as it was.

The console gets a progress line after the first step of each start and every
train.log_every steps (`step 150/8000  loss 1.2345  21.3 img/s  ETA 1h02m`),
one line per periodic evaluation and a summary at the end. A restart of a run
that has finished (its last checkpoint at train.num_steps, evaluated) says so
and returns without compiling or writing anything; only an evaluation that is
missing (the check of the last step, or eval.at_end_of_training's protocol)
still runs.
"""

import datetime
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx

from pspnet_jax import (checkpoint, configuration, evaluation, inference, losses, optim,
                        refinement_training, run_lock, sharding, train_state, writers)
from pspnet_jax.data import pipeline, registry, transforms
from pspnet_jax.errors import UserError
from pspnet_jax.stop_request import StopRequest
from pspnet_jax.train_state import TrainState

# One file per start of a run: the configs a workdir was trained with, in order.
CONFIG_HISTORY_DIR = 'config_history'
# Global batches on their way to the devices while a step runs (beyond the one it takes).
PREFETCH_TO_DEVICES = 2
# The progress line names the time spent waiting for batches from this share on.
DATA_WAIT_NOTED = 0.2


def num_train_steps(config, num_examples: int) -> int:
  """train.num_steps, or num_epochs full batches per epoch (semseg: drop_last=True)."""
  if config.train.num_steps > 0:
    return config.train.num_steps
  steps_per_epoch = num_examples // config.train.batch_size
  if steps_per_epoch == 0:
    raise UserError(f'config.train.batch_size={config.train.batch_size} is larger than the '
                    f'{num_examples} training examples')
  return config.train.num_epochs * steps_per_epoch


def validate(config) -> None:
  """The config checks plus what only training needs."""
  configuration.validate(config)
  if config.model.zoom_factor != 8:
    raise UserError(f'config.model.zoom_factor={config.model.zoom_factor!r}: training compares '
                    f'logits with labels at the input size, which needs 8')


def create_train_state(config, mesh, num_steps: int):
  """A fresh (or pretrained-backbone) TrainState replicated over `mesh`.

  Returns (state, train graphdef, eval graphdef, optimizer); the graphdefs
  differ in the BatchNorm / dropout mode, which NNX keeps in the graph.
  """
  tx = optim.create_optimizer(config.optim, num_steps, config.train.batch_size)
  return (train_state.init_train_state(config, tx, mesh), *train_state.graphdefs(config), tx)


def device_images(images: jax.Array, mean, std) -> jax.Array:
  """A training batch's images as the model takes them: uint8 RGB normalized here, on the
  devices, as `transforms.normalize` does on the host, float32 (x - mean) / std (to one unit
  in the last place: XLA divides by constants as a product with the reciprocal); float32
  images come normalized from the host (data.batch_dtype)."""
  if images.dtype != jnp.uint8:
    return images
  return (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
      std, jnp.float32)


def segmentation_objective(model, images: jax.Array, batch: dict, *, aux_weight: float,
                           ignore_label: int, loss_normalizer: str = 'valid'):
  """PSPNet's loss on a batch with 'label' NHW (uint8 or int32): (loss, metrics of the step)."""
  labels = batch['label'].astype(jnp.int32)
  logits, aux_logits = model(images, return_aux=True)
  loss, parts = losses.pspnet_loss(logits, aux_logits, labels, aux_weight=aux_weight,
                                   ignore_label=ignore_label, normalizer=loss_normalizer)
  valid = labels != ignore_label
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) & valid)
  return loss, {**parts, 'pixel_acc': correct / jnp.maximum(jnp.sum(valid), 1)}


def train_step(state: TrainState, batch: dict, *, graphdef, tx, learning_rates: dict,
               seed: int, mean, std, objective):
  """One optimizer step on a (global) batch whose 'image' is NHWC uint8 RGB or normalized
  float32; `objective(model, images, batch)` gives (loss, metrics) of the train-mode model
  (`segmentation_objective`, `refinement_training.objective`).

  Returns (new state, metrics of this step as scalars).
  """
  images = device_images(batch['image'], mean, std)

  def loss_fn(params):
    # copy=True: fresh Variables at this trace level (NNX refuses to mutate ones from outside).
    model = nnx.merge(graphdef, params, state.batch_stats, state.rngs, copy=True)
    nnx.reseed(model, default=jax.random.fold_in(jax.random.key(seed), state.step))
    loss, step_metrics = objective(model, images, batch)
    return loss, (step_metrics, nnx.state(model, nnx.BatchStat))

  (loss, (step_metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
  keep_if_finite = functools.partial(
      jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  new_state = state.replace(
      step=state.step + 1,
      applied_steps=state.applied_steps + finite.astype(jnp.int32),
      params=keep_if_finite(params, state.params),
      batch_stats=keep_if_finite(batch_stats, state.batch_stats),
      opt_state=keep_if_finite(opt_state, state.opt_state))

  step_metrics = {'loss': loss, **step_metrics, 'finite': finite}
  for group, schedule in learning_rates.items():
    step_metrics[f'lr_{group}'] = schedule(state.applied_steps)
  return new_state, step_metrics


def objective_of(config):
  """The task's `objective` for `train_step` (config.task)."""
  if config.task == 'refinement':
    return refinement_training.objective_of(config)
  return functools.partial(segmentation_objective, aux_weight=config.model.aux_weight,
                           ignore_label=config.data.ignore_label,
                           loss_normalizer=config.model.loss_normalizer)


def jit_train_step(mesh, *, graphdef, tx, config, num_steps: int):
  """train_step under jit: state replicated and donated, batch sharded over `data`."""
  step_fn = functools.partial(
      train_step, graphdef=graphdef, tx=tx,
      learning_rates=optim.learning_rates(config.optim, num_steps, config.train.batch_size),
      seed=config.seed, mean=tuple(config.data.mean), std=tuple(config.data.std),
      objective=objective_of(config))
  return jax.jit(step_fn, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
                 donate_argnums=0)


def periodic_evaluator(config, mesh, eval_graphdef):
  """variables -> the metrics of the check every train.eval_every steps (config.task's):
  `evaluation.evaluate`, or `refinement_training.evaluate` for refinement."""
  if config.task == 'refinement':
    return functools.partial(refinement_training.evaluate, graphdef=eval_graphdef, config=config)
  eval_fn = evaluation.jit_eval_step(mesh, graphdef=eval_graphdef, config=config)
  return lambda variables: evaluation.evaluate(eval_fn, variables, config, mesh)


def abstract_batch(config, mesh, batch_size: int, dtypes: dict) -> dict:
  """The shapes of a global batch of `batch_size` crops with the host's `dtypes`
  (`pipeline.train_batch_dtypes`, `pipeline.EVAL_BATCH_DTYPES`), split over `data`, for
  lowering a step ahead of time."""
  crop = transforms.crop_shape(config.data)
  batch_sharded = sharding.batch_sharded(mesh)
  # 'image' is RGB; the label and the masks of a refinement batch are single-channel.
  return {key: jax.ShapeDtypeStruct((batch_size, *crop, *((3,) if key == 'image' else ())),
                                    dtype, sharding=batch_sharded)
          for key, dtype in dtypes.items()}


def compiled_costs(compiled) -> dict:
  """Per-device memory (bytes) and cost of a compiled SPMD program, from XLA's own analyses.

  Keys: argument_bytes, output_bytes, alias_bytes (outputs that reuse donated
  arguments), temp_bytes, peak_bytes, xla_peak_bytes, flops, bytes_accessed;
  a value is None where the backend does not report it. peak_bytes is what
  the device holds during the step: arguments + outputs - aliased +
  temporaries (the runtime allocates the temporaries as one block of
  temp_bytes). xla_peak_bytes is XLA's own peak of live buffers; for
  PSPNet-50 on v5e it came out below temp_bytes alone, so it is reported but
  does not decide a fit.
  """
  costs = dict.fromkeys(('argument_bytes', 'output_bytes', 'alias_bytes', 'temp_bytes',
                         'peak_bytes', 'xla_peak_bytes', 'flops', 'bytes_accessed'))
  memory = compiled.memory_analysis()
  if memory is not None:
    costs.update(argument_bytes=memory.argument_size_in_bytes,
                 output_bytes=memory.output_size_in_bytes,
                 alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
                 xla_peak_bytes=memory.peak_memory_in_bytes)
    costs['peak_bytes'] = (costs['argument_bytes'] + costs['output_bytes'] -
                           costs['alias_bytes'] + costs['temp_bytes'])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost:
    costs.update(flops=cost.get('flops'), bytes_accessed=cost.get('bytes accessed'))
  return costs


def _log_compiled(compiled, config, mesh, state: TrainState) -> None:
  """The summary logged before step 1: devices, parameters, compiled memory and FLOPs."""
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('devices: %d (%s) in %d process(es); mesh %s', mesh.devices.size,
               jax.devices()[0].device_kind, jax.process_count(), dict(mesh.shape))
  logging.info('model: %s, %s parameters, global batch %d of %dx%d, compute %s',
               config.model.backbone, f'{num_params:,}', config.train.batch_size,
               *transforms.crop_shape(config.data), config.model.dtype)
  costs = compiled_costs(compiled)
  if costs['temp_bytes'] is not None:
    logging.info('train step memory per device: arguments %.1f MiB, outputs %.1f MiB, '
                 'temporaries %.1f MiB, peak %.1f MiB', costs['argument_bytes'] / 2**20,
                 costs['output_bytes'] / 2**20, costs['temp_bytes'] / 2**20,
                 costs['peak_bytes'] / 2**20)
  if costs['flops'] is not None:
    logging.info('train step: %.3g FLOPs per device per step', costs['flops'])


def train_and_evaluate(config, workdir: str, *, allowed_config_changes=(),
                       stop: StopRequest | None = None) -> dict:
  """Trains (resuming from WORKDIR/checkpoints when there are any) and evaluates.

  Returns the last evaluation's metrics, or {} when the run was stopped by a
  signal or preemption before its end. Refuses a workdir that another live run
  holds (`run_lock`), and a resume whose config changes what the run computes,
  except in the keys of `allowed_config_changes`
  (`configuration.resume_changes`). `stop`: the command's StopRequest,
  installed before JAX started; by default one is installed for this call.
  """
  validate(config)
  own_stop = stop is None
  if own_stop:
    stop = StopRequest()
    if jax.process_count() > 1:
      stop.hand_over_to_jax()
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    with run_lock.hold(workdir, is_lead_process=jax.process_index() == 0):
      return _train_and_evaluate(config, workdir, stop, allowed_config_changes)
  finally:
    if own_stop:
      stop.restore()


def _record_config(config, workdir: str, step: int) -> None:
  """config.json is this start's config; config_history/ keeps every start's (process 0)."""
  if jax.process_index() != 0:
    return
  history = epath.Path(workdir) / CONFIG_HISTORY_DIR
  history.mkdir(parents=True, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')
  text = config.to_json(indent=2)
  for path in (history / f'{stamp}-step{step}.json', epath.Path(workdir) / 'config.json'):
    path.write_text(text, encoding='utf-8')


def _duration(seconds: float) -> str:
  """'1h02m', '3m07s', '12s': a time to read at a glance."""
  seconds = max(0, round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  return f'{minutes}m{seconds:02d}s' if minutes else f'{seconds}s'


def progress_line(step: int, num_steps: int, loss: float | None, images_per_sec: float,
                  seconds_per_step: float, data_wait_fraction: float = 0.0) -> str:
  """'step  150/8000  loss 1.2345  21.3 img/s  ETA 1h02m': the console's line for a logged step.

  `loss`: the mean over the finite steps since the last line (None: none was finite).
  The ETA counts training steps at `seconds_per_step`, not the evaluations to come. A large
  `data_wait_fraction` (the share of the time spent waiting for batches) is named: the
  input pipeline, not the devices, sets the pace then (more data.worker_count).
  """
  width = len(str(num_steps))
  loss_text = 'non-finite' if loss is None else f'{loss:.4f}'
  line = (f'step {step:>{width}d}/{num_steps}  loss {loss_text}  {images_per_sec:.1f} img/s  '
          f'ETA {_duration((num_steps - step) * seconds_per_step)}')
  if data_wait_fraction >= DATA_WAIT_NOTED:
    line += f'  (waiting for data {data_wait_fraction:.0%} of the time)'
  return line


def _metrics_text(results: dict) -> str:
  return '  '.join(f'{key} {results[key]:.4f}' for key in ('mIoU', 'mAcc', 'allAcc')
                   if results.get(key) is not None)


def _summary(config, workdir: str, step: int, last: dict | None, checkpointer,
             started: float) -> str:
  """The end-of-run lines: evaluations of the last step, the best checkpoint, where things
  are, the time this start took."""
  lines = []
  if last:
    lines.append(f'  evaluation at step {step} ({config.data.eval_split}): {_metrics_text(last)}')
  protocol = inference.Protocol.from_config(config)
  protocol_path = evaluation.results_path(workdir, config.data.eval_split, step, protocol.name)
  if epath.Path(protocol_path).exists():
    recorded = json.loads(epath.Path(protocol_path).read_text(encoding='utf-8'))
    lines.append(f'  {protocol.name} protocol at step {step}: {_metrics_text(recorded)} '
                 f'({protocol_path})')
  best = checkpointer.best_step()
  if best is not None:
    score = (checkpointer.metrics(best) or {}).get(checkpoint.BEST_METRIC)
    lines.append(f'  best checkpoint: step {best}' +
                 ('' if score is None else f', mIoU {score:.4f}'))
  lines.append(f'  checkpoints: {checkpoint.checkpoint_dir(workdir)} (latest: step '
               f'{checkpointer.latest_step()})')
  lines.append(f'  metrics: {epath.Path(workdir) / writers.METRICS_FILE}; TensorBoard: '
               f'tensorboard --logdir={workdir}')
  if (epath.Path(workdir) / 'eval').is_dir():
    lines.append(f'  evaluation files: {epath.Path(workdir) / "eval"}')
  lines.append(f'  time: {_duration(time.perf_counter() - started)} (this start)')
  return '\n'.join(lines)


def _complete_finished_run(config, workdir: str, mesh, eval_graphdef, state: TrainState, names,
                           checkpointer, num_steps: int, started: float) -> dict:
  """A start with nothing left to train: runs only the evaluations not recorded yet.

  The check of the last step counts as recorded with its metrics.jsonl row or
  the metric saved with its checkpoint; eval.at_end_of_training's protocol
  with its results file. When nothing is missing, nothing is compiled or
  written (no event file, no rows, no config record). Returns the last
  step's evaluation metrics (mIoU, mAcc, allAcc as far as recorded).
  """
  step = int(state.step)
  row = writers.eval_row(workdir, step)
  last = None if row is None else {key: row.get(f'eval/{key}') for key in ('mIoU', 'mAcc',
                                                                            'allAcc')}
  saved = (checkpointer.metrics(step) or {}).get(checkpoint.BEST_METRIC)
  if last is None and saved is not None:
    last = {'mIoU': saved}
  protocol = inference.Protocol.from_config(config)
  needs_protocol = config.eval.at_end_of_training and not epath.Path(evaluation.results_path(
      workdir, config.data.eval_split, step, protocol.name)).exists()
  if last is None or needs_protocol:
    missing = ' and '.join(([f'the evaluation of step {step}'] if last is None else []) +
                           ([f'the {protocol.name} protocol'] if needs_protocol else []))
    logging.info('training reached step %d of %d before; running %s, which is not recorded',
                 step, num_steps, missing)
    writer = writers.create_writer(workdir)
    try:
      if last is None:
        last = periodic_evaluator(config, mesh, eval_graphdef)(train_state.model_variables(state))
        writers.write_eval(writer, step, last, names, table=True)
      if needs_protocol:
        _final_evaluation(config, workdir, mesh, eval_graphdef, state, writer, names)
    finally:
      writer.close()
    header = f'run complete: step {step} of {num_steps}'
  else:
    header = (f'run already complete: step {step} of {num_steps} was trained and evaluated '
              f'before; nothing to do (to train longer: --config.train.num_steps=N '
              f'--allow_config_change=train.num_steps)')
  logging.info('%s\n%s', header, _summary(config, workdir, step, last, checkpointer, started))
  return last


def _train_and_evaluate(config, workdir: str, stop: StopRequest, allowed_config_changes) -> dict:
  started = time.perf_counter()
  mesh = sharding.make_mesh()
  local_rows = sharding.local_batch_size(config.train.batch_size, mesh)
  sharding.local_batch_size(config.eval.batch_size, mesh)
  num_examples = pipeline.num_examples(config, config.data.train_split)
  num_steps = num_train_steps(config, num_examples)

  tx = optim.create_optimizer(config.optim, num_steps, config.train.batch_size)
  graphdef, eval_graphdef = train_state.graphdefs(config)
  names = registry.class_names(config)
  checkpointer = checkpoint.TrainCheckpointer(workdir)
  nonfinite_total = 0

  def check_config(step, meta):
    where = f'checkpoint {step} in {checkpoint.checkpoint_dir(workdir)}'
    try:
      changes = configuration.resume_changes(meta['config'], config, allowed_config_changes)
    except ValueError as error:
      raise UserError(f'{where}: {error}') from None
    if changes:
      logging.warning('resuming %s with config changes: %s', where, '; '.join(changes))
    if meta.get('num_train_examples') != num_examples:
      # (None: a checkpoint of a version whose data order was not a function of the step.)
      logging.warning('checkpoint %d was written by a run over %s training examples; this one '
                      'has %d, so the order of the examples from here on differs from that '
                      'run\'s', step, meta.get('num_train_examples'), num_examples)
    if meta.get('num_steps') != num_steps:
      logging.warning('checkpoint %d was written by a run of %s steps; this one has %d, so the '
                      'learning-rate schedule changes', step, meta.get('num_steps'), num_steps)

  resumed = train_state.restore_train_state(config, tx, mesh, checkpointer, check_config)
  if resumed is None:
    state = train_state.init_train_state(config, tx, mesh)
  else:
    state = resumed.state
    if resumed.has_optimizer:
      nonfinite_total = resumed.meta.get('nonfinite_steps', 0)
    logging.info('resumed from checkpoint %d (%s)', resumed.step,
                 'weights, optimizer and data order' if resumed.has_optimizer else 'weights only')
    best = checkpointer.best_step()
    if best is not None:
      logging.info('best checkpoint so far: step %d (%s %.4f)', best, checkpoint.BEST_METRIC,
                   checkpointer.metrics(best)[checkpoint.BEST_METRIC])

  if int(state.step) >= num_steps:
    # Nothing left to train: a restart of a finished run (or of one whose schedule a config
    # change shortened).
    try:
      return _complete_finished_run(config, workdir, mesh, eval_graphdef, state, names,
                                    checkpointer, num_steps, started)
    finally:
      checkpointer.close()

  _record_config(config, workdir, int(state.step))
  if jax.process_index() == 0:
    writers.drop_rows_after(workdir, int(state.step))

  step_fn = jit_train_step(mesh, graphdef=graphdef, tx=tx, config=config, num_steps=num_steps)
  compile_start = time.perf_counter()
  compiled_step = step_fn.lower(state, abstract_batch(
      config, mesh, config.train.batch_size, pipeline.train_batch_dtypes(config))).compile()
  logging.info('train step compiled in %.1f s; %d examples per process per step',
               time.perf_counter() - compile_start, local_rows)
  _log_compiled(compiled_step, config, mesh, state)
  evaluate = periodic_evaluator(config, mesh, eval_graphdef)

  writer = writers.create_writer(workdir)
  step = int(state.step)
  first_step = step + 1  # of this start: its progress line comes as soon as it is done
  window = []          # host metrics of the steps since the last log
  consecutive_nonfinite = 0
  window_start = time.perf_counter()
  data_wait = 0.0      # seconds of the window spent waiting for the next batch
  results = {}
  data_iterator = pipeline.train_batches(config, step, num_steps)
  # Batches are sent to the devices ahead of their step, while the steps before run.
  device_batches = sharding.prefetch_to_mesh(data_iterator, mesh, PREFETCH_TO_DEVICES)

  def checkpoint_meta(step):
    # TRAINING_META_KEY ('num_steps') marks a training checkpoint for restore.
    return {'step': step, checkpoint.TRAINING_META_KEY: num_steps,
            'nonfinite_steps': nonfinite_total,
            'num_train_examples': num_examples, 'config': json.loads(config.to_json())}

  def save(step, eval_metrics=None):
    checkpointer.save(step, *train_state.checkpoint_items(state), checkpoint_meta(step),
                      metrics=eval_metrics)

  def account(step, step_metrics):
    """Host side of one finished step: the non-finite count and the stop rule."""
    nonlocal consecutive_nonfinite, nonfinite_total
    values = jax.device_get(step_metrics)
    if values['finite']:
      consecutive_nonfinite = 0
    else:
      consecutive_nonfinite += 1
      nonfinite_total += 1
      logging.warning('step %d: non-finite loss %s, step skipped (%d in a row, %d in total)',
                      step, values['loss'], consecutive_nonfinite, nonfinite_total)
      if consecutive_nonfinite >= config.train.max_nonfinite_steps:
        checkpointer.wait_until_finished()
        last = checkpointer.latest_step()
        kept = ('No checkpoint was written yet.' if last is None else
                f'The last checkpoint, step {last} in {checkpoint.checkpoint_dir(workdir)}, '
                f'is intact.')
        raise FloatingPointError(
            f'{consecutive_nonfinite} consecutive steps (up to step {step}) had a non-finite loss '
            f'(config.train.max_nonfinite_steps={config.train.max_nonfinite_steps}); stopped. '
            f'{kept} Check the data or lower optim.base_lr.')
    window.append(values)

  try:
    # A signal during the start (data, restore, compilation): the state is still the one
    # on disk (or a fresh one, which a restart rebuilds identically), so nothing to save.
    if step < num_steps and (stop.requested or checkpointer.reached_preemption(step)):
      logging.info('stopped on request before the first step of this start (step %d); nothing '
                   'new to save, restart the same command to continue', step)
      return {}
    pending = None   # the previous step's metrics, read while the next step runs
    while step < num_steps:
      # The step before runs on the devices meanwhile (dispatch is asynchronous): time spent
      # here is the host's preparation (or the transfer) falling behind.
      wait_start = time.perf_counter()
      batch = next(device_batches)
      data_wait += time.perf_counter() - wait_start
      state, step_metrics = compiled_step(state, batch)
      step += 1
      checkpointer.check_for_errors()
      if pending is not None:
        account(*pending)
        if pending[0] == first_step:
          # The first step of this start (its line is not a logged step's).
          first = window[-1]
          elapsed = time.perf_counter() - window_start
          logging.info('%s', progress_line(
              first_step, num_steps, float(first['loss']) if first['finite'] else None,
              config.train.batch_size / elapsed, elapsed))
      pending = (step, step_metrics)
      stopping = stop.requested or checkpointer.reached_preemption(step)
      if step % config.train.log_every == 0 or step == num_steps or stopping:
        account(*pending)
        pending = None
        elapsed = time.perf_counter() - window_start
        finite = [values for values in window if values['finite']]
        # The task's step metrics, averaged over the finite steps, and the last step's rates.
        averaged = [key for key in window[-1] if key != 'finite' and not key.startswith('lr_')]
        row = {f'train/{key}': float(np.mean([values[key] for values in finite]))
               for key in averaged} if finite else {}
        row.update({f'train/{key}': float(value) for key, value in window[-1].items()
                    if key.startswith('lr_')})
        row.update({'train/steps_per_sec': len(window) / elapsed,
                    'train/images_per_sec': len(window) * config.train.batch_size / elapsed,
                    # Near 1: input-bound (more data.worker_count); near 0: compute-bound.
                    'train/data_wait_fraction': data_wait / elapsed,
                    'train/nonfinite_steps': nonfinite_total})
        writer.write_scalars(step, row)
        logging.info('%s', progress_line(step, num_steps, row.get('train/loss'),
                                         row['train/images_per_sec'], elapsed / len(window),
                                         row['train/data_wait_fraction']))
        window = []
        window_start = time.perf_counter()
        data_wait = 0.0
      if stopping:
        save(step)
        logging.info('stopped at step %d on request; checkpoint saved, restart the same command '
                     'to continue', step)
        break
      eval_now = step == num_steps or (config.train.eval_every > 0 and
                                       step % config.train.eval_every == 0)
      if eval_now:
        results = evaluate(train_state.model_variables(state))
        writers.write_eval(writer, step, results, names, table=step == num_steps)
        save(step, {checkpoint.BEST_METRIC: results['mIoU']})
      elif step % config.train.checkpoint_every == 0:
        save(step)
    else:
      if config.eval.at_end_of_training:
        _final_evaluation(config, workdir, mesh, eval_graphdef, state, writer, names)
      checkpointer.wait_until_finished()
      logging.info('run complete: step %d of %d\n%s', step, num_steps,
                   _summary(config, workdir, step, results, checkpointer, started))
  finally:
    data_iterator.close()
    checkpointer.close()
    writer.close()
  return results if step == num_steps else {}


def _final_evaluation(config, workdir: str, mesh, eval_graphdef, state: TrainState, writer,
                      names) -> None:
  """eval.protocol on data.eval_split at the original sizes, once per finished run."""
  protocol = inference.Protocol.from_config(config)
  step = int(state.step)
  path = evaluation.results_path(workdir, config.data.eval_split, step, protocol.name)
  if epath.Path(path).exists():   # a restart of a finished run: already done
    return
  predictor = inference.Predictor(eval_graphdef, train_state.model_variables(state), protocol,
                                  mean=config.data.mean, std=config.data.std,
                                  batch_size=config.eval.batch_size, mesh=mesh)
  results = evaluation.evaluate_split(predictor, config)
  writers.write_eval(writer, step, results, names, table=True, prefix=f'eval_{protocol.name}')
  if jax.process_index() == 0:
    evaluation.write_results(path, results, names, protocol.settings())

"""The training checkpointer keeps the two latest and the best-by-mIoU checkpoint, nothing else,
across restarts, and refuses a damaged training checkpoint by name."""

import shutil

import jax.numpy as jnp
import pytest
from flax import nnx

from pspnet_jax import checkpoint


def training_meta(step):
  """The meta of a training checkpoint (num_steps marks one)."""
  return {'step': step, checkpoint.TRAINING_META_KEY: 10}


def test_latest_and_best_are_kept(tmp_path):
  checkpointer = checkpoint.TrainCheckpointer(str(tmp_path))
  variables = nnx.State({'w': nnx.Param(jnp.zeros(3))})
  evals = {2: 0.5, 4: 0.3, 6: 0.4}   # step -> eval mIoU; the other steps have no eval
  for step in range(1, 8):
    variables['w'].set_value(jnp.full(3, float(step)))
    metrics = {checkpoint.BEST_METRIC: evals[step]} if step in evals else None
    checkpointer.save(step, variables, {'count': jnp.array(step)}, training_meta(step),
                      metrics=metrics)
    checkpointer.wait_until_finished()
  assert checkpoint.all_steps(str(tmp_path)) == [2, 6, 7]

  restored, opt_item, meta = checkpointer.restore(2, variables, {'count': jnp.array(0)})
  checkpointer.close()
  assert meta['step'] == 2 and int(opt_item['count']) == 2
  assert restored['w'].get_value().tolist() == [2.0, 2.0, 2.0]


def _save(checkpointer, step, value, metrics=None):
  variables = nnx.State({'w': nnx.Param(jnp.full(3, float(value)))})
  checkpointer.save(step, variables, {'count': jnp.array(step)}, training_meta(step),
                    metrics=metrics)
  checkpointer.wait_until_finished()



def test_the_best_and_its_metric_survive_restarts(tmp_path):
  """Each restart is a new checkpointer on the same workdir, as a restarted run makes."""
  checkpointer = checkpoint.TrainCheckpointer(str(tmp_path))
  _save(checkpointer, 2, 2, {checkpoint.BEST_METRIC: 0.5})
  _save(checkpointer, 3, 3)
  checkpointer.close()
  step = 3
  for restart in range(3):
    checkpointer = checkpoint.TrainCheckpointer(str(tmp_path))
    assert checkpointer.best_step() == 2, restart
    for _ in range(2):
      step += 1
      _save(checkpointer, step, step)
    checkpointer.close()
    assert checkpoint.all_steps(str(tmp_path)) == [2, step - 1, step], restart
  checkpointer = checkpoint.TrainCheckpointer(str(tmp_path))
  assert checkpointer.metrics(2) == {checkpoint.BEST_METRIC: 0.5}
  # A better evaluation takes over, and the old best goes.
  _save(checkpointer, step + 1, step + 1, {checkpoint.BEST_METRIC: 0.6})
  _save(checkpointer, step + 2, step + 2)
  assert checkpoint.all_steps(str(tmp_path)) == [step + 1, step + 2]
  assert checkpointer.best_step() == step + 1
  checkpointer.close()


def test_a_training_checkpoint_missing_an_item_is_damaged_not_an_import(tmp_path):
  checkpointer = checkpoint.TrainCheckpointer(str(tmp_path))
  _save(checkpointer, 5, 5)
  shutil.rmtree(tmp_path / 'checkpoints' / '5' / 'opt')
  variables = nnx.State({'w': nnx.Param(jnp.zeros(3))})
  with pytest.raises(ValueError, match=r'checkpoints/5 is damaged: .* has no opt item'):
    checkpointer.restore(5, variables, {'count': jnp.array(0)})
  checkpointer.close()


def test_an_imported_checkpoint_restores_as_weights_only(tmp_path):
  variables = nnx.State({'w': nnx.Param(jnp.full(3, 7.0))})
  checkpoint.save_model(str(tmp_path), 0, variables, {'source': 'train_epoch_100.pth',
                                                      'format': 'semseg'})
  checkpointer = checkpoint.TrainCheckpointer(str(tmp_path))
  restored, opt_item, meta = checkpointer.restore(0, variables, {'count': jnp.array(0)})
  checkpointer.close()
  assert opt_item is None and meta['format'] == 'semseg'
  assert restored['w'].get_value().tolist() == [7.0, 7.0, 7.0]

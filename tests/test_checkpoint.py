"""The training checkpointer keeps the latest and the best-by-mIoU checkpoint, nothing else."""

import jax.numpy as jnp
from flax import nnx

from pspnet_jax import checkpoint


class CountingIterator:
  """Stands in for a Grain iterator: its state is how many batches it gave."""

  def __init__(self):
    self.count = 0

  def get_state(self) -> bytes:
    return str(self.count).encode()

  def set_state(self, state: bytes) -> None:
    self.count = int(state.decode())

  def start_prefetch(self) -> None:
    """Grain's checkpoint handler calls this after set_state; nothing to prefetch here."""


def test_latest_and_best_are_kept(tmp_path):
  checkpointer = checkpoint.TrainCheckpointer(str(tmp_path))
  iterator = CountingIterator()
  variables = nnx.State({'w': nnx.Param(jnp.zeros(3))})
  layout = {'processes': 1, 'worker_count': 0}
  evals = {2: 0.5, 4: 0.3, 6: 0.4}   # step -> eval mIoU; the other steps have no eval
  for step in range(1, 8):
    iterator.count = step
    variables['w'].set_value(jnp.full(3, float(step)))
    metrics = {checkpoint.BEST_METRIC: evals[step]} if step in evals else None
    checkpointer.save(step, variables, {'count': jnp.array(step)}, iterator,
                      {'step': step, 'data_layout': layout}, metrics=metrics)
    checkpointer.wait_until_finished()
  assert checkpoint.all_steps(str(tmp_path)) == [2, 7]

  restored_iterator = CountingIterator()
  restored, opt_item, meta = checkpointer.restore(2, variables, {'count': jnp.array(0)},
                                                  restored_iterator, layout)
  checkpointer.close()
  assert meta['step'] == 2 and int(opt_item['count']) == 2 and restored_iterator.count == 2
  assert restored['w'].get_value().tolist() == [2.0, 2.0, 2.0]

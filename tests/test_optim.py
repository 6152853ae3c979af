"""The optimizer against the official recipe: semseg's lr formula and torch.optim.SGD, step by step."""

import jax.numpy as jnp
import numpy as np
import optax
import torch

from configs import default
from pspnet_jax import optim


def _official_lr(base_lr, current_iter, max_iter, power):
  """semseg util.poly_learning_rate."""
  return base_lr * (1 - float(current_iter) / max_iter) ** power


def test_learning_rate_trace_of_both_groups_is_the_official_formula():
  config = default.get_config().optim
  num_steps = 1000
  schedules = optim.learning_rates(config, num_steps)
  # semseg sets the lr after each step from iteration k + 1, so step k runs at iteration k's lr.
  for step in (0, 1, 2, 500, num_steps - 2, num_steps - 1):
    expected = _official_lr(config.base_lr, step, num_steps, config.power)
    np.testing.assert_allclose(schedules['backbone'](step), expected, rtol=1e-6)
    np.testing.assert_allclose(schedules['head'](step), 10 * expected, rtol=1e-6)
  assert float(schedules['backbone'](num_steps)) == 0.0


def test_updates_equal_torch_sgd_with_semseg_param_groups():
  config = default.get_config().optim
  num_steps = 6
  rs = np.random.RandomState(0)
  shapes = {'layer0': {'0': (3, 3, 3, 4)}, 'layer4': {'bn': (4,)}, 'ppm': {'conv': (1, 1, 4, 2)},
            'cls': {'bias': (5,)}, 'aux': {'kernel': (3, 3, 4, 5)}}
  params = {m: {k: rs.randn(*s).astype(np.float32) for k, s in v.items()}
            for m, v in shapes.items()}
  grads = [{m: {k: rs.randn(*s).astype(np.float32) for k, s in v.items()}
            for m, v in shapes.items()} for _ in range(num_steps)]

  names = [(m, k) for m in shapes for k in shapes[m]]
  torch_params = {n: torch.tensor(params[n[0]][n[1]], requires_grad=True) for n in names}
  heads = [torch_params[n] for n in names if n[0] in optim.HEAD_MODULES]
  backbone = [torch_params[n] for n in names if n[0] not in optim.HEAD_MODULES]
  sgd = torch.optim.SGD([{'params': backbone}, {'params': heads, 'lr': config.base_lr * 10}],
                        lr=config.base_lr, momentum=config.momentum,
                        weight_decay=config.weight_decay)

  optimizer = optim.create_optimizer(config, num_steps)
  jax_params = {m: {k: jnp.asarray(v) for k, v in d.items()} for m, d in params.items()}
  state = optimizer.init(jax_params)
  for step in range(num_steps):
    for name in names:
      torch_params[name].grad = torch.tensor(grads[step][name[0]][name[1]])
    sgd.step()
    lr = _official_lr(config.base_lr, step + 1, num_steps, config.power)
    sgd.param_groups[0]['lr'], sgd.param_groups[1]['lr'] = lr, 10 * lr

    updates, state = optimizer.update(grads[step], state, jax_params)
    jax_params = optax.apply_updates(jax_params, updates)
    for name in names:
      np.testing.assert_allclose(jax_params[name[0]][name[1]],
                                 torch_params[name].detach().numpy(), rtol=1e-6, atol=1e-7,
                                 err_msg=f'{name} after step {step}')

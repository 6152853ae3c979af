"""The official optimizer: SGD with momentum, weight decay added to the gradient, poly decay, 10x heads.

semseg builds two parameter groups, the backbone (layer0..layer4) at base_lr
and the new layers (ppm, cls, aux) at 10 x base_lr, and after every step sets
lr = base * (1 - iter / max_iter) ** power. The k-th step (0-based) therefore
runs with base * (1 - k / max_iter) ** power, step 0 with the base rate.
PyTorch's SGD adds weight_decay * param to the gradient *before* the momentum
buffer (buf = momentum * buf + grad + wd * p; p -= lr * buf), on every
parameter, BatchNorm and biases included; that is exactly
add_decayed_weights -> trace -> scale_by_learning_rate below.
"""

import jax
import jax.numpy as jnp
import optax

# Top-level modules trained at head_lr_mult x the base rate (freshly initialized).
HEAD_MODULES = ('ppm', 'cls', 'aux')


def poly_schedule(base_lr: float, num_steps: int, power: float) -> optax.Schedule:
  """k -> base_lr * (1 - k / num_steps) ** power (0 from num_steps on).

  Written as (num_steps - k) / num_steps: the difference of integers is exact,
  where float32 1 - k / num_steps loses digits near the end of the schedule
  (optax.polynomial_schedule is 1e-5 off the formula at k = 998 of 1000).
  """

  def schedule(step):
    remaining = jnp.clip(num_steps - step, 0, num_steps).astype(jnp.float32)
    return base_lr * (remaining / num_steps) ** power

  return schedule


def param_group(path) -> str:
  """'head' for the pyramid pooling and the classifiers, 'backbone' for layer0..layer4."""
  return 'head' if path[0].key in HEAD_MODULES else 'backbone'


def learning_rates(optim_config, num_steps: int) -> dict[str, optax.Schedule]:
  """The schedule of each parameter group."""
  return {
      'backbone': poly_schedule(optim_config.base_lr, num_steps, optim_config.power),
      'head': poly_schedule(optim_config.base_lr * optim_config.head_lr_mult, num_steps,
                            optim_config.power),
  }


def create_optimizer(optim_config, num_steps: int) -> optax.GradientTransformation:
  """SGD as torch.optim.SGD(momentum, weight_decay) with semseg's two poly-decayed groups."""

  def sgd(schedule):
    return optax.chain(optax.add_decayed_weights(optim_config.weight_decay),
                       optax.trace(decay=optim_config.momentum, nesterov=False),
                       optax.scale_by_learning_rate(schedule))

  transforms = {group: sgd(schedule)
                for group, schedule in learning_rates(optim_config, num_steps).items()}
  return optax.multi_transform(
      transforms, lambda params: jax.tree_util.tree_map_with_path(
          lambda path, _: param_group(path), params))

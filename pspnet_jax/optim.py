"""The official optimizers: semseg's SGD (poly decay, 10x heads) and CascadePSP's Adam (steps).

semseg builds two parameter groups, the backbone (layer0..layer4) at base_lr
and the new layers (ppm, cls, aux) at 10 x base_lr, and after every step sets
lr = base * (1 - iter / max_iter) ** power. The k-th step (0-based) therefore
runs with base * (1 - k / max_iter) ** power, step 0 with the base rate.
PyTorch's SGD adds weight_decay * param to the gradient *before* the momentum
buffer (buf = momentum * buf + grad + wd * p; p -= lr * buf), on every
parameter, BatchNorm and biases included; that is exactly
add_decayed_weights -> trace -> scale_by_learning_rate below.

CascadePSP trains its refinement module with torch.optim.Adam(lr 2.25e-4,
weight_decay 1e-4) and MultiStepLR(milestones 22500 and 37500, gamma 0.1),
stepped after every iteration (`optim.name='adam'`, `optim.schedule='multistep'`).
torch's Adam adds weight_decay * param to the gradient before the moments (L2,
not AdamW): add_decayed_weights -> scale_by_adam -> scale_by_learning_rate, and
optax's bias-corrected m / (sqrt(v) + eps) is torch's update written differently.
The k-th step (0-based) runs at base * gamma ** (number of milestones <= k).

Large global batches (all off by default, which is the official optimizer
above, bit for bit):

- `optim.lr_scaling` multiplies both groups' base rates by
  B / reference_batch_size ('linear', Goyal et al. 2017) or its square root
  ('sqrt'), B the global batch.
- `optim.warmup_steps` = W multiplies the poly rate of step k by
  min(1, (k + 1) / (W + 1)): W steps below the full rate, the first at
  1 / (W + 1) of it, none at 0 (torch's LinearLR with start_factor
  1 / (W + 1)). The poly decay still runs over all num_steps, so from step W
  on the rate is the unwarmed schedule's; this is how mmcv composes warmup
  with poly (its LrUpdaterHook), and it keeps the rate a function of the step.
- `optim.trust_ratio` adds LARS's layer-wise trust ratio (You et al. 2017):
  each conv or linear kernel's update g + wd * w is scaled by
  trust_coefficient * ||w|| / ||g + wd * w|| (optax.scale_by_trust_ratio)
  before the momentum; BatchNorm parameters and biases (the 1-D leaves) are
  left out, as LARS leaves them out. The order is the official one with the
  ratio inserted: weight decay, trust ratio, momentum, learning rate.
  (optax.lars applies the learning rate before the momentum, which is the
  same while the rate is constant.)
"""

import math

import jax
import jax.numpy as jnp
import optax

# Top-level modules trained at head_lr_mult x the base rate (freshly initialized).
HEAD_MODULES = ('ppm', 'cls', 'aux')
# optim.name and optim.schedule.
OPTIMIZERS = ('sgd', 'adam')
SCHEDULES = ('poly', 'multistep')
# optim.lr_scaling: the factor of the base rates at global batch B, reference batch R.
LR_SCALINGS = ('none', 'linear', 'sqrt')


def poly_schedule(base_lr: float, num_steps: int, power: float,
                  end_lr: float = 0.0) -> optax.Schedule:
  """k -> (base_lr - end_lr) * (1 - k / num_steps) ** power + end_lr (end_lr from num_steps on).

  end_lr 0 is semseg's; mmseg's PolyLR(eta_min=1e-4) ends at end_lr (mmengine
  computes it step by step; the closed form is the same).

  Written as (num_steps - k) / num_steps: the difference of integers is exact,
  where float32 1 - k / num_steps loses digits near the end of the schedule
  (optax.polynomial_schedule is 1e-5 off the formula at k = 998 of 1000).
  """

  def schedule(step):
    remaining = jnp.clip(num_steps - step, 0, num_steps).astype(jnp.float32)
    return (base_lr - end_lr) * (remaining / num_steps) ** power + end_lr

  return schedule


def multistep_schedule(base_lr: float, milestones, gamma: float) -> optax.Schedule:
  """k -> base_lr * gamma ** (number of milestones <= k): torch's MultiStepLR stepped after
  every iteration (its k-th iteration, 0-based, follows k scheduler steps)."""
  milestones = jnp.asarray(tuple(milestones), jnp.int32)

  def schedule(step):
    decays = jnp.sum(step >= milestones).astype(jnp.float32)
    return base_lr * gamma ** decays

  return schedule


def with_warmup(decay: optax.Schedule, warmup_steps: int) -> optax.Schedule:
  """k -> decay(k) * min(1, (k + 1) / (warmup_steps + 1)); `decay` itself when 0."""
  if warmup_steps == 0:
    return decay

  def schedule(step):
    # Integer numerator, as in poly_schedule: (k + 1) / (W + 1) is one rounding from exact.
    ramp = jnp.minimum(step + 1, warmup_steps + 1).astype(jnp.float32) / (warmup_steps + 1)
    return decay(step) * ramp

  return schedule


def lr_scale(optim_config, batch_size: int | None) -> float:
  """The factor of both groups' base rates at global batch `batch_size` (optim.lr_scaling).

  'none' gives 1 whatever the batch; 'linear' and 'sqrt' need the batch and
  refuse None, so that a caller that forgot it fails instead of training
  unscaled.
  """
  if optim_config.lr_scaling == 'none':
    return 1.0
  if batch_size is None:
    raise ValueError(f'config.optim.lr_scaling={optim_config.lr_scaling!r} scales by the global '
                     f'batch, which the caller did not give')
  ratio = batch_size / optim_config.reference_batch_size
  return ratio if optim_config.lr_scaling == 'linear' else math.sqrt(ratio)


def param_group(path) -> str:
  """'head' for the pyramid pooling and the classifiers, 'backbone' for layer0..layer4."""
  return 'head' if path[0].key in HEAD_MODULES else 'backbone'


def trust_ratio_mask(params):
  """True for the leaves LARS gives a trust ratio: kernels (ndim > 1), not BatchNorm or biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def learning_rates(optim_config, num_steps: int,
                   batch_size: int | None = None) -> dict[str, optax.Schedule]:
  """The schedule of each parameter group at global batch `batch_size` (used by optim.lr_scaling)."""
  base_lr = optim_config.base_lr * lr_scale(optim_config, batch_size)

  def decay(rate, multiplier):
    if optim_config.schedule == 'multistep':
      return multistep_schedule(rate, optim_config.milestones, optim_config.gamma)
    return poly_schedule(rate, num_steps, optim_config.power, optim_config.end_lr * multiplier)

  return {group: with_warmup(decay(base_lr * multiplier, multiplier), optim_config.warmup_steps)
          for group, multiplier in (('backbone', 1.0), ('head', optim_config.head_lr_mult))}


def create_optimizer(optim_config, num_steps: int,
                     batch_size: int | None = None) -> optax.GradientTransformation:
  """torch.optim.SGD(momentum, weight_decay) or torch.optim.Adam(weight_decay) (optim.name)
  with two decayed groups, and the large-batch options of the module docstring (global batch
  `batch_size`)."""

  def optimizer(schedule):
    trust_ratio = ([optax.masked(
        optax.scale_by_trust_ratio(trust_coefficient=optim_config.trust_coefficient),
        trust_ratio_mask)] if optim_config.trust_ratio else [])
    if optim_config.name == 'adam':
      moments = optax.scale_by_adam(b1=optim_config.adam_b1, b2=optim_config.adam_b2,
                                    eps=optim_config.adam_eps)
    else:
      moments = optax.trace(decay=optim_config.momentum, nesterov=False)
    return optax.chain(optax.add_decayed_weights(optim_config.weight_decay),
                       *trust_ratio, moments, optax.scale_by_learning_rate(schedule))

  transforms = {group: optimizer(schedule)
                for group, schedule in learning_rates(optim_config, num_steps, batch_size).items()}
  return optax.multi_transform(
      transforms, lambda params: jax.tree_util.tree_map_with_path(
          lambda path, _: param_group(path), params))

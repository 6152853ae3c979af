"""The optimizer against the official recipe (semseg's lr formula and torch.optim.SGD, step by
step), and its large-batch options against numpy: the scaled, warmed-up schedule, LARS."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from configs import default, demo
from pspnet_jax import optim
from pspnet_jax.models import create_model


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


def _official_optimizer(config, num_steps):
  """The optimizer before the large-batch options, written out: the defaults must be it."""
  def sgd(base_lr):
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.trace(decay=config.momentum, nesterov=False),
                       optax.scale_by_learning_rate(
                           optim.poly_schedule(base_lr, num_steps, config.power)))
  return optax.multi_transform(
      {'backbone': sgd(config.base_lr), 'head': sgd(config.base_lr * config.head_lr_mult)},
      lambda params: {m: {k: 'head' if m in optim.HEAD_MODULES else 'backbone' for k in d}
                      for m, d in params.items()})


def _small_tree(rs, zero_kernel=False):
  """Parameters of both groups, kernels (ndim > 1) and 1-D BatchNorm / bias leaves."""
  shapes = {'layer0': {'kernel': (3, 3, 3, 4), 'scale': (4,), 'bias': (4,)},
            'layer4': {'kernel': (1, 1, 4, 6)}, 'ppm': {'kernel': (1, 1, 6, 2), 'bias': (2,)},
            'cls': {'kernel': (1, 1, 2, 5), 'bias': (5,)}, 'aux': {'kernel': (3, 3, 4, 5)}}
  tree = {m: {k: rs.randn(*s).astype(np.float32) for k, s in v.items()}
          for m, v in shapes.items()}
  if zero_kernel:   # a zero-initialized layer: LARS keeps its ratio at 1
    tree['aux']['kernel'][...] = 0
  return tree


def _run(optimizer, params, grads):
  """(parameters after each step, updates of each step) of optimizer on the gradient list."""
  params = jax.tree.map(jnp.asarray, params)
  state = optimizer.init(params)
  history = []
  for grad in grads:
    updates, state = optimizer.update(grad, state, params)
    params = optax.apply_updates(params, updates)
    history.append((jax.device_get(params), jax.device_get(updates)))
  return history


@pytest.mark.parametrize('overrides,batch_size', [
    ({}, 64), ({}, None),
    # Scaling by exactly 1 and no warmup: the same floats.
    ({'lr_scaling': 'linear', 'reference_batch_size': 64}, 64),
    ({'lr_scaling': 'sqrt', 'reference_batch_size': 16}, 16)])
def test_without_large_batch_options_the_optimizer_is_the_official_one_bit_for_bit(overrides,
                                                                                    batch_size):
  config = default.get_config().optim
  config.update(overrides)
  num_steps = 5
  rs = np.random.RandomState(1)
  params = _small_tree(rs)
  grads = [_small_tree(rs) for _ in range(num_steps)]
  official = _run(_official_optimizer(default.get_config().optim, num_steps), params, grads)
  ours = _run(optim.create_optimizer(config, num_steps, batch_size), params, grads)
  for (want_params, want_updates), (got_params, got_updates) in zip(official, ours):
    for want, got in zip(jax.tree.leaves((want_params, want_updates)),
                         jax.tree.leaves((got_params, got_updates))):
      np.testing.assert_array_equal(got, want)
  schedules = optim.learning_rates(config, num_steps, batch_size)
  for step in range(num_steps + 1):
    base = optim.poly_schedule(config.base_lr, num_steps, config.power)(step)
    head = optim.poly_schedule(config.base_lr * 10, num_steps, config.power)(step)
    assert schedules['backbone'](step) == base and schedules['head'](step) == head


def _numpy_lr(base_lr, step, num_steps, power, scale, warmup):
  """The documented schedule in float64: scale * poly * min(1, (k + 1) / (W + 1))."""
  poly = base_lr * scale * max(0.0, 1 - step / num_steps) ** power
  return poly * min(1.0, (step + 1) / (warmup + 1))


@pytest.mark.parametrize('scaling,batch_size,reference,warmup,scale', [
    ('linear', 64, 8, 0, 8.0), ('linear', 64, 8, 5, 8.0), ('sqrt', 64, 8, 0, 8 ** 0.5),
    ('sqrt', 1024, 16, 40, 8.0), ('linear', 8, 16, 3, 0.5), ('none', 4096, 16, 7, 1.0)])
def test_scaled_and_warmed_up_rates_follow_the_documented_formula(scaling, batch_size, reference,
                                                                  warmup, scale):
  config = default.get_config().optim
  config.update({'lr_scaling': scaling, 'reference_batch_size': reference,
                 'warmup_steps': warmup, 'base_lr': 0.02})
  num_steps = 100
  assert optim.lr_scale(config, batch_size) == pytest.approx(scale, rel=1e-12)
  schedules = optim.learning_rates(config, num_steps, batch_size)
  for step in range(num_steps + 2):
    expected = _numpy_lr(0.02, step, num_steps, 0.9, scale, warmup)
    np.testing.assert_allclose(schedules['backbone'](step), expected, rtol=2e-6, atol=1e-12)
    np.testing.assert_allclose(schedules['head'](step), 10 * expected, rtol=2e-6, atol=1e-12)
  # The warmup ends on the unwarmed schedule: from step W on the rates are the poly ones.
  if warmup:
    assert float(schedules['backbone'](warmup - 1)) < _numpy_lr(0.02, warmup - 1, num_steps,
                                                               0.9, scale, 0)
    np.testing.assert_allclose(schedules['backbone'](warmup),
                               _numpy_lr(0.02, warmup, num_steps, 0.9, scale, 0), rtol=2e-6)


def test_scaling_without_the_batch_size_is_refused():
  config = default.get_config().optim
  config.lr_scaling = 'sqrt'
  with pytest.raises(ValueError, match='global batch'):
    optim.learning_rates(config, 10)


def _numpy_lars(config, params, grads, batch_size, num_steps):
  """LARS on top of the official SGD, in float64: per leaf d = g + wd * w; kernels (ndim > 1)
  get d *= eta * ||w|| / ||d|| (1 when either norm is 0); buf = m * buf + d; w -= lr_k * buf,
  lr_k the scaled, warmed-up poly rate of the leaf's group. Parameters after each step."""
  scale = batch_size / config.reference_batch_size
  params = jax.tree.map(lambda p: p.astype(np.float64), params)
  buffers = jax.tree.map(np.zeros_like, params)
  history = []
  for step, grad in enumerate(grads):
    rate = _numpy_lr(config.base_lr, step, num_steps, config.power, scale, config.warmup_steps)
    for module, leaves in params.items():
      for name, w in leaves.items():
        d = grad[module][name] + config.weight_decay * w
        w_norm, d_norm = np.linalg.norm(w), np.linalg.norm(d)
        if w.ndim > 1 and w_norm > 0 and d_norm > 0:
          d = d * config.trust_coefficient * w_norm / d_norm
        buffers[module][name] = config.momentum * buffers[module][name] + d
        multiplier = config.head_lr_mult if module in optim.HEAD_MODULES else 1.0
        leaves[name] = w - rate * multiplier * buffers[module][name]
    history.append(jax.tree.map(np.copy, params))
  return history


def test_trust_ratio_is_lars_on_kernels_only():
  config = default.get_config().optim
  config.update({'trust_ratio': True, 'trust_coefficient': 0.02, 'lr_scaling': 'linear',
                 'reference_batch_size': 16, 'warmup_steps': 2, 'weight_decay': 1e-2})
  num_steps, batch_size = 6, 32
  rs = np.random.RandomState(2)
  params = _small_tree(rs, zero_kernel=True)
  grads = [_small_tree(rs) for _ in range(num_steps)]
  expected = _numpy_lars(config, params, grads, batch_size, num_steps)
  got = _run(optim.create_optimizer(config, num_steps, batch_size), params, grads)
  for step, (want, (have, _)) in enumerate(zip(expected, got)):
    for (path, w), h in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(have)):
      np.testing.assert_allclose(h, w, rtol=1e-5, atol=1e-7,
                                 err_msg=f'{jax.tree_util.keystr(path)} after step {step}')
  # The ratio changed the kernels' steps: without it the same run ends elsewhere.
  config.trust_ratio = False
  plain = _run(optim.create_optimizer(config, num_steps, batch_size), params, grads)[-1][0]
  assert not np.allclose(plain['layer0']['kernel'], got[-1][0]['layer0']['kernel'], rtol=1e-3)
  np.testing.assert_allclose(plain['layer0']['scale'], got[-1][0]['layer0']['scale'], rtol=1e-6)


def test_trust_ratio_mask_takes_the_kernels_of_the_model_and_leaves_batchnorm_and_biases():
  config = demo.get_config()
  model = nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  mask = optim.trust_ratio_mask(params)
  names = {}
  for (path, leaf), flag in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(mask)):
    name = jax.tree_util.keystr(path)
    assert flag == ('kernel' in name), name
    assert flag == (leaf.ndim > 1), name
    names[flag] = names.get(flag, 0) + 1
  assert names[True] > 20 and names[False] > 40   # ResNet-18 PSPNet: 31 kernels, 60 others


def test_end_lr_is_mmengine_poly_lr_with_eta_min():
  # mmengine's PolyLR(eta_min, power) updates the rate step by step:
  # lr <- (lr - eta_min) * (1 - 1 / (total - k + 1)) ** power + eta_min, for k = 1 .. total.
  base_lr, end_lr, power, total = 0.01, 1e-4, 0.9, 50
  config = default.get_config().optim
  config.base_lr, config.end_lr, config.power, config.head_lr_mult = base_lr, end_lr, power, 1.0
  schedules = optim.learning_rates(config, total)
  lr, expected = base_lr, [base_lr]
  for k in range(1, total + 1):
    lr = (lr - end_lr) * (1 - 1 / (total - k + 1)) ** power + end_lr
    expected.append(lr)
  actual = [float(schedules['backbone'](k)) for k in range(total + 1)]
  np.testing.assert_allclose(actual, expected, rtol=1e-5)
  assert float(schedules['head'](total + 10)) == pytest.approx(end_lr)


def test_adam_with_multistep_decay_equals_torch_adam_and_multisteplr():
  """CascadePSP's optimizer: torch.optim.Adam(lr, weight_decay) with MultiStepLR stepped after
  every iteration, step by step over both milestones, one parameter group."""
  config = default.get_config().optim
  config.name, config.schedule = 'adam', 'multistep'
  config.base_lr, config.weight_decay, config.head_lr_mult = 2.25e-4, 1e-4, 1.0
  config.milestones, config.gamma = (3, 7), 0.1
  num_steps = 10
  rs = np.random.RandomState(1)
  shapes = {'feats': {'kernel': (3, 3, 2, 4), 'bias': (4,)}, 'psp': {'kernel': (1, 1, 4, 2)}}
  params = {m: {k: rs.randn(*s).astype(np.float32) for k, s in v.items()}
            for m, v in shapes.items()}
  grads = [{m: {k: rs.randn(*s).astype(np.float32) for k, s in v.items()}
            for m, v in shapes.items()} for _ in range(num_steps)]
  names = [(m, k) for m in shapes for k in shapes[m]]
  torch_params = {n: torch.tensor(params[n[0]][n[1]], requires_grad=True) for n in names}
  adam = torch.optim.Adam(list(torch_params.values()), lr=config.base_lr,
                          weight_decay=config.weight_decay)
  scheduler = torch.optim.lr_scheduler.MultiStepLR(adam, list(config.milestones), config.gamma)

  optimizer = optim.create_optimizer(config, num_steps)
  schedules = optim.learning_rates(config, num_steps)
  jax_params = {m: {k: jnp.asarray(v) for k, v in d.items()} for m, d in params.items()}
  state = optimizer.init(jax_params)
  for step in range(num_steps):
    assert float(schedules['backbone'](step)) == pytest.approx(adam.param_groups[0]['lr'],
                                                                rel=1e-6)
    for name in names:
      torch_params[name].grad = torch.tensor(grads[step][name[0]][name[1]])
    adam.step()
    scheduler.step()
    updates, state = optimizer.update(grads[step], state, jax_params)
    jax_params = optax.apply_updates(jax_params, updates)
    for name in names:
      np.testing.assert_allclose(jax_params[name[0]][name[1]],
                                 torch_params[name].detach().numpy(), rtol=1e-6, atol=1e-7)
  assert adam.param_groups[0]['lr'] == pytest.approx(config.base_lr * 0.01)

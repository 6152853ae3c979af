"""The train step: 8 devices = 1 device, non-finite steps skipped whole, the official lr trace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from pspnet_jax import sharding, train
from pspnet_jax.data import transforms


def small_config(**overrides):
  config = default.get_config()
  config.data.name = 'synthetic'
  config.data.num_classes = 5
  config.data.crop_size = 41
  config.model.backbone = 'resnet18'
  config.train.batch_size = 8
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def make_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  size, count = config.data.crop_size, config.train.batch_size
  labels = rng.integers(0, config.data.num_classes, (count, size, size)).astype(np.int32)
  labels[:, :5] = config.data.ignore_label
  # Images that depend on the labels, so the loss and gradients are not pure noise.
  images = rng.normal(size=(count, size, size, 3)).astype(np.float32) + labels[..., None] % 7
  return {'image': images, 'label': labels}


def run_step(config, mesh, batch, num_steps=10):
  state, graphdef, _, tx = train.create_train_state(config, mesh, num_steps)
  step = train.jit_train_step(mesh, graphdef=graphdef, tx=tx, config=config, num_steps=num_steps)
  before = jax.device_get(state)
  after, step_metrics = step(state, sharding.to_global(batch, mesh))
  return before, jax.device_get(after), jax.device_get(step_metrics)


def relative_error(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / (np.linalg.norm(b) + 1e-30))


def flat(tree):
  """All floating-point leaves of a tree as one float64 vector (random keys left out)."""
  return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)
                         if jnp.issubdtype(leaf.dtype, jnp.floating)])


def test_eight_devices_equal_one_device():
  """Loss, gradients and BatchNorm statistics of one step, global batch 8 on 8 devices vs 1.

  Train-mode BatchNorm makes the backbone gradients sums of nearly cancelling
  terms, so float32 reduction order alone moves them by ~1% (see DESIGN §5).
  The yardstick is therefore the same one-device step on the batch in
  another order, which is mathematically the same step: sharding may not be
  noticeably worse than that. Dropout is off here because it follows the
  example's position; the next test covers it.
  """
  config = small_config(**{'model.dropout': 0.0})
  batch = make_batch(config)
  order = np.array([3, 1, 7, 0, 5, 2, 6, 4])
  one_device = sharding.make_mesh(jax.devices()[:1])
  _, one, one_metrics = run_step(config, one_device, batch)
  _, reordered, _ = run_step(config, one_device, {key: value[order] for key, value in batch.items()})
  _, eight, eight_metrics = run_step(config, sharding.make_mesh(), batch)
  for key in ('loss', 'main_loss', 'aux_loss'):
    assert eight_metrics[key] == pytest.approx(one_metrics[key], rel=1e-5), key
  # An argmax count: float32 reduction order may flip a near-tie pixel or two of 11,760.
  assert eight_metrics['pixel_acc'] == pytest.approx(one_metrics['pixel_acc'], abs=3e-4)
  assert relative_error(flat(eight.batch_stats), flat(one.batch_stats)) < 1e-5
  # After one step the momentum buffer is the gradient plus weight decay.
  for tree in ('opt_state', 'params'):
    reference = flat(getattr(one, tree))
    floor = relative_error(flat(getattr(reordered, tree)), reference)
    assert relative_error(flat(getattr(eight, tree)), reference) <= 2 * floor + 1e-7, tree


def test_dropout_masks_do_not_depend_on_the_sharding():
  config = small_config(**{'model.dropout': 0.5})
  batch = make_batch(config)
  _, _, one = run_step(config, sharding.make_mesh(jax.devices()[:1]), batch)
  _, _, eight = run_step(config, sharding.make_mesh(), batch)
  assert eight['loss'] == pytest.approx(one['loss'], rel=1e-5)


def test_batchnorm_statistics_are_global():
  """The running mean of the first BN after one step equals numpy's over the whole global batch."""
  config = small_config()
  batch = make_batch(config)
  before, after, _ = run_step(config, sharding.make_mesh(), batch)
  kernel = np.asarray(before.params['layer0']['conv1']['kernel'], np.float64)
  images = np.pad(batch['image'].astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  # The stem's first conv: 3x3, stride 2, padding 1, no bias.
  out_size = (config.data.crop_size + 2 - 3) // 2 + 1
  patches = np.stack([images[:, i:i + 2 * out_size - 1:2, j:j + 2 * out_size - 1:2]
                      for i in range(3) for j in range(3)], axis=3)
  conv = np.einsum('nhwkc,kco->nhwo', patches, kernel.reshape(9, 3, -1))
  mean = conv.mean(axis=(0, 1, 2))
  var = conv.var(axis=(0, 1, 2), ddof=1)
  bn = after.batch_stats['layer0']['bn1']
  np.testing.assert_allclose(bn['mean'], 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(bn['var'], 0.9 + 0.1 * var, rtol=1e-4)


def test_nonfinite_batch_is_skipped_whole():
  config = small_config()
  batch = make_batch(config)
  batch['image'][3, 10, 10, 1] = np.nan
  before, after, step_metrics = run_step(config, sharding.make_mesh(), batch)
  assert not step_metrics['finite'] and not np.isfinite(step_metrics['loss'])
  assert int(after.step) == 1 and int(after.applied_steps) == 0
  for tree in ('params', 'batch_stats', 'opt_state'):
    for old, new in zip(jax.tree.leaves(getattr(before, tree)), jax.tree.leaves(getattr(after, tree))):
      np.testing.assert_array_equal(new, old)


def test_learning_rates_follow_the_official_formula_for_both_groups():
  """Step k runs with base * (1 - k / N) ** 0.9, backbone and 10x head, first and last steps."""
  num_steps = 6
  config = small_config(**{'optim.base_lr': 0.02, 'data.crop_size': 33})
  mesh = sharding.make_mesh()
  state, graphdef, _, tx = train.create_train_state(config, mesh, num_steps)
  step = train.jit_train_step(mesh, graphdef=graphdef, tx=tx, config=config, num_steps=num_steps)
  batch = sharding.to_global(make_batch(config), mesh)
  for k in range(num_steps):
    state, step_metrics = step(state, batch)
    expected = 0.02 * (1 - k / num_steps) ** 0.9
    assert float(step_metrics['lr_backbone']) == pytest.approx(expected, rel=1e-6)
    assert float(step_metrics['lr_head']) == pytest.approx(10 * expected, rel=1e-6)


def uint8_batch(config, seed=0):
  """A batch as the host ships it with data.batch_dtype = 'uint8': RGB and labels as uint8."""
  rng = np.random.default_rng(seed)
  batch = make_batch(config, seed)
  images = rng.integers(0, 256, batch['image'].shape, dtype=np.uint8)
  return {'image': images, 'label': batch['label'].astype(np.uint8)}


def reciprocal_normalize(images, config):
  """numpy's (x - mean) * (1 / std) in float32: XLA's form of a division by constants."""
  mean, std = (np.asarray(values, np.float32) for values in (config.data.mean, config.data.std))
  return (images.astype(np.float32) - mean) * (np.float32(1) / std)


def test_device_normalization_of_uint8_batches_equals_the_host_one():
  """`train.device_images` on the 8 devices of the mesh is `transforms.normalize` to within one
  unit in the last place: XLA divides by the constant std as a product with its reciprocal."""
  config = small_config()
  mesh = sharding.make_mesh()
  images = uint8_batch(config)['image']
  normalize = jax.jit(lambda x: train.device_images(x, config.data.mean, config.data.std))
  on_devices = np.asarray(normalize(sharding.to_global({'image': images}, mesh)['image']))
  host = np.stack([transforms.normalize(image, config.data.mean, config.data.std)
                   for image in images])
  assert on_devices.dtype == np.float32
  np.testing.assert_array_max_ulp(on_devices, host, maxulp=1)
  np.testing.assert_array_equal(on_devices, reciprocal_normalize(images, config))


def test_a_uint8_batch_trains_as_its_float32_twin():
  """The step on uint8 RGB and uint8 labels is the step on the same images normalized in numpy
  (as XLA does, `reciprocal_normalize`) and int32 labels, bit for bit: same loss, same new
  weights and statistics."""
  config = small_config(**{'data.crop_size': 33, 'train.batch_size': 2})
  mesh = sharding.make_mesh(jax.devices()[:1])
  shipped = uint8_batch(config)
  twin = {'image': reciprocal_normalize(shipped['image'], config),
          'label': shipped['label'].astype(np.int32)}
  state, graphdef, _, tx = train.create_train_state(config, mesh, 10)
  step = train.jit_train_step(mesh, graphdef=graphdef, tx=tx, config=config, num_steps=10)
  # The step donates its state: the twin starts from a copy.
  twin_state = jax.tree.map(jnp.copy, state)
  after, step_metrics = jax.device_get(step(state, sharding.to_global(shipped, mesh)))
  twin_after, twin_metrics = jax.device_get(step(twin_state, sharding.to_global(twin, mesh)))
  assert step_metrics['loss'] == twin_metrics['loss']
  np.testing.assert_array_equal(flat(after), flat(twin_after))


def test_mmseg_architecture_trains_with_mmsegs_loss_normalization():
  """One step of the mmseg architecture; its loss divides by every pixel (mmseg), so it is the
  labelled-pixel loss times the labelled fraction, on the same weights and batch."""
  mmseg = dict(stem_widths=(32, 32, 64), contract_dilation=True, dilate_basic_conv2=False,
               ppm_align_corners=False, align_corners=False)
  config = small_config(**{f'model.{key}': value for key, value in mmseg.items()},
                        **{'data.crop_size': 40})  # any size, not only 8k+1
  batch = make_batch(config)
  mesh = sharding.make_mesh()
  losses_by_normalizer = {}
  for normalizer in ('valid', 'all'):
    config.model.loss_normalizer = normalizer
    _, _, step_metrics = run_step(config, mesh, batch)
    assert step_metrics['finite']
    losses_by_normalizer[normalizer] = float(step_metrics['loss'])
  labelled = np.mean(batch['label'] != config.data.ignore_label)
  np.testing.assert_allclose(losses_by_normalizer['all'], losses_by_normalizer['valid'] * labelled,
                             rtol=1e-5)

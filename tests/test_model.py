"""The Flax PSPNet against the PyTorch twin of the official model: sizes, logits, statistics, gradients."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pspnet_jax import checkpoint, losses, weights
from pspnet_jax.models.pspnet import PSPNet
from pspnet_jax import torch_reference as torch_pspnet
from parity import MMSEG_ARCHITECTURE, forward, make_twins, max_relative_diff, nchw, nhwc


@pytest.mark.parametrize('backbone,expected_params,expected_keys', [
    ('resnet50', 49_180_908, 370), ('resnet101', 68_173_036, 676)])
def test_parameter_count_and_state_dict_names(backbone, expected_params, expected_keys):
  model = nnx.eval_shape(lambda: PSPNet(150, backbone=backbone, rngs=nnx.Rngs(0)))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert sum(p.size for p in params) == expected_params
  names = [weights.semseg_name(path)
           for path in checkpoint.flatten(checkpoint.model_variables(model).to_pure_dict())]
  num_bn = sum(name.endswith('running_mean') for name in names)
  assert len(names) + num_bn == expected_keys  # + num_batches_tracked per BatchNorm
  twin_keys = torch_pspnet.PSPNet(int(backbone[6:]), classes=150).state_dict().keys()
  assert set(names) == {k for k in twin_keys if not k.endswith('num_batches_tracked')}


def test_mmseg_architecture_has_mmseg_parameter_count_and_dilations():
  # mmseg 1.2.2's pspnet_r50-d8 with 150 classes: 49,076,364 parameters (mmseg-pspnet.md);
  # dilations of its ResNetV1c with contract_dilation: layer3 1,2,2,2,2,2 and layer4 2,4,4.
  model = nnx.eval_shape(lambda: PSPNet(150, rngs=nnx.Rngs(0), **MMSEG_ARCHITECTURE))
  assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == 49_076_364
  assert [block.conv2.kernel_dilation for block in model.layer3] == [1, 2, 2, 2, 2, 2]
  assert [block.conv2.kernel_dilation for block in model.layer4] == [2, 4, 4]
  twin = torch_pspnet.PSPNet(50, classes=150, **MMSEG_ARCHITECTURE)
  assert sum(p.numel() for p in twin.parameters()) == 49_076_364
  assert [block.conv2.dilation for block in twin.layer3] == [(1, 1)] + [(2, 2)] * 5
  assert [block.conv2.dilation for block in twin.layer4] == [(2, 2), (4, 4), (4, 4)]
  # mmseg's BasicBlock dilates conv1 only (layer4 of ResNet-18: 2, then 4).
  twin18 = torch_pspnet.PSPNet(18, classes=19, **MMSEG_ARCHITECTURE)
  assert [(b.conv1.dilation, b.conv2.dilation) for b in twin18.layer4] == [((2, 2), (1, 1)),
                                                                           ((4, 4), (1, 1))]


@pytest.mark.parametrize('depth,classes,size,kwargs', [
    (50, 150, (233, 233), {}),
    (50, 150, (200, 300), {}),  # not 8k+1: the official code refuses it, we resize to the input
    (18, 21, (97, 129), {'output_stride': 8}),
    (18, 21, (97, 129), {'output_stride': 16}),
    (18, 21, (96, 80), {'output_stride': 16, 'deep_stem': False}),
    (18, 21, (97, 97), {'use_ppm': False}),
    # mmsegmentation's PSPNet: any input size, resized back with align_corners=False.
    (50, 150, (120, 97), MMSEG_ARCHITECTURE),
    (101, 19, (64, 90), MMSEG_ARCHITECTURE),
    (18, 19, (75, 100), {**MMSEG_ARCHITECTURE, 'head_channels': 128, 'aux_channels': 64}),
])
def test_eval_logits_equal_twin(depth, classes, size, kwargs):
  twin, model = make_twins(depth, classes, **kwargs)
  model.eval()
  images = np.random.RandomState(0).randn(2 if depth == 18 else 1, *size, 3).astype(np.float32)
  with torch.no_grad():
    expected = nhwc(twin(nchw(images)))
  actual = np.asarray(forward(model, images))
  assert actual.shape == expected.shape == (images.shape[0], *size, classes)
  assert max_relative_diff(actual, expected) <= 1e-4


def _twin_gradients(twin, images, labels, dtype):
  twin = copy.deepcopy(twin).to(dtype)
  logits, aux = twin(nchw(images).to(dtype), return_aux=True)
  criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
  target = torch.from_numpy(labels)
  (criterion(logits, target) + 0.4 * criterion(aux, target)).backward()
  grads = {name: p.grad.double().numpy() for name, p in twin.named_parameters()}
  return grads, logits.detach().double(), aux.detach().double(), twin.state_dict()


def _relative_l2(actual, expected):
  return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


@pytest.mark.parametrize('depth,size', [(18, 97), (50, 65)])
def test_train_mode_forward_statistics_and_gradients_equal_twin(depth, size):
  rs = np.random.RandomState(1)
  images = rs.randn(2, size, size, 3).astype(np.float32)
  labels = rs.randint(0, 21, (2, size, size))
  labels[:, :10] = 255

  twin, model = make_twins(depth, 21, dropout=0.0)
  twin.train()
  model.train()
  # The float64 twin is the reference; the float32 twin shows how precise float32 can be here.
  grads64, logits64, aux64, stats64 = _twin_gradients(twin, images, labels, torch.float64)
  _, logits32, aux32, _ = _twin_gradients(twin, images, labels, torch.float32)

  # float32, as training runs: logits, and the running statistics after one step (unbiased
  # variance, momentum 0.1). Train-mode BatchNorm over few values (the 1x1 pyramid bin sees 2)
  # makes float32 results a draw of rounding noise: the float32 twin's own statistics are off
  # by up to 2e-5 (relative L2), and whether ours or the twin's is closer changes with the CPU.
  # A wrong formula is off by far more (the biased variance by 1/count: 50% for that bin).
  logits, aux = forward(model, images, return_aux=True)
  for ours, reference, torch32 in ((logits, logits64, logits32), (aux, aux64, aux32)):
    error = max_relative_diff(ours, nhwc(reference))
    torch_error = max_relative_diff(nhwc(torch32), nhwc(reference))
    assert error <= max(1e-4, 2 * torch_error), (error, torch_error)
  ours = weights.to_torch_state_dict(checkpoint.model_variables(model))
  running = [name for name in stats64 if 'running' in name]
  for name in running:
    assert _relative_l2(ours[name], stats64[name].numpy()) <= 1e-3, name

  # float64: the same step computed in float64 end to end equals the float64 twin to float64
  # rounding (logits) and to float32 storage (statistics and the float32 parameters'
  # gradients): the formulas and their wiring, free of float32 noise (with it, weight
  # gradients through train-mode BatchNorm move by 1e-3 relative on one seed, 2e-5 on another).
  # Labels as an int32 argument: closed over as numpy int64, they failed to lower under x64 in
  # a process that had traced the loss without it (jax 0.10.2).
  labels = jnp.asarray(labels, jnp.int32)
  with jax.enable_x64(True):
    _, model = make_twins(depth, 21, dropout=0.0, dtype=jnp.float64)
    model.train()

    def loss_fn(module, images, labels):
      logits, aux = module(images, return_aux=True)
      return losses.pspnet_loss(logits, aux, labels, aux_weight=0.4)[0], (logits, aux)

    (_, (logits, aux)), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(
        model, images.astype(np.float64), labels)
  assert logits.dtype == aux.dtype == np.float64
  for ours, reference in ((logits, logits64), (aux, aux64)):
    assert max_relative_diff(ours, nhwc(reference)) <= 1e-10
  ours = weights.to_torch_state_dict(checkpoint.model_variables(model))
  for name in running:
    assert _relative_l2(ours[name], stats64[name].numpy()) <= 1e-6, name
  ours = weights.to_torch_state_dict(grads)
  assert set(ours) == set(grads64)
  for name in grads64:
    assert _relative_l2(ours[name], grads64[name]) <= 1e-6, name


def test_bfloat16_compute_agrees_with_float32():
  _, model = make_twins(50, 21)
  model.eval()
  model_bf16 = PSPNet(21, backbone='resnet50', dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
  nnx.update(model_bf16, checkpoint.model_variables(model))
  model_bf16.eval()
  # Parameters and statistics stay float32; only the compute is bfloat16.
  assert {v.dtype for v in jax.tree.leaves(checkpoint.model_variables(model_bf16))} == {np.dtype(np.float32)}
  images = np.random.RandomState(2).randn(1, 129, 161, 3).astype(np.float32)
  logits32 = forward(model, images)
  logits16 = forward(model_bf16, images)
  assert logits16.dtype == jnp.float32
  agreement = float(jnp.mean(jnp.argmax(logits16, -1) == jnp.argmax(logits32, -1)))
  assert agreement >= 0.99, agreement


def test_rematerialized_backbones_give_the_same_gradients_and_statistics():
  """model.remat trades memory for recomputation only: block and stage remat against none."""
  images = jnp.asarray(np.random.RandomState(3).randn(2, 41, 41, 3), jnp.float32)
  labels = jnp.asarray(np.random.RandomState(4).randint(0, 5, (2, 41, 41)))

  def loss_fn(model):
    logits, aux = model(images, return_aux=True)
    return losses.pspnet_loss(logits, aux, labels, aux_weight=0.4)[0]

  results = {}
  for remat in ('none', 'block', 'stage'):
    model = PSPNet(5, backbone='resnet18', output_stride=16, dropout=0.0, remat=remat,
                   rngs=nnx.Rngs(0))
    model.train()
    grads = nnx.jit(nnx.grad(loss_fn))(model)
    results[remat] = jax.tree.leaves((grads, nnx.state(model, nnx.BatchStat)))
  for remat in ('block', 'stage'):
    for actual, expected in zip(results[remat], results['none']):
      np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)

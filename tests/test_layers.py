"""The PyTorch-exact layers against PyTorch itself: resize, adaptive pooling, conv padding, BatchNorm, Dropout2d."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from pspnet_jax.models import layers
from parity import nchw, nhwc


def _random(shape, seed=0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


@pytest.mark.parametrize('align_corners', [True, False])
@pytest.mark.parametrize('in_size,out_size', [
    ((7, 9), (13, 17)), ((13, 17), (5, 4)), ((1, 1), (3, 5)), ((6, 5), (1, 1)), ((8, 8), (57, 57)),
    ((60, 45), (473, 353))])
def test_resize_matches_torch_interpolate(in_size, out_size, align_corners):
  x = _random((2, *in_size, 3))
  # float64 reference: PyTorch's float32 path rounds its source coordinates (2e-5 off at 60->473).
  expected = nhwc(F.interpolate(nchw(x).double(), size=out_size, mode='bilinear',
                                align_corners=align_corners))
  actual = layers.resize_bilinear(jnp.asarray(x), out_size, align_corners=align_corners)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('size', [(13, 9), (60, 60), (7, 5), (1, 3), (59, 61)])
@pytest.mark.parametrize('bins', [1, 2, 3, 6])
def test_adaptive_avg_pool_matches_torch_bins(size, bins):
  x = _random((2, *size, 4))
  expected = nhwc(F.adaptive_avg_pool2d(nchw(x), bins))
  np.testing.assert_allclose(layers.adaptive_avg_pool(jnp.asarray(x), bins), expected,
                             rtol=0, atol=1e-5)


@pytest.mark.parametrize('kernel,stride,dilation', [(3, 2, 1), (7, 2, 1), (3, 1, 4), (1, 2, 1),
                                                    (3, 1, 2)])
def test_conv_pads_symmetrically_like_torch(kernel, stride, dilation):
  x = _random((1, 15, 12, 3))
  conv = layers.conv2d(3, 5, kernel, stride=stride, dilation=dilation, rngs=nnx.Rngs(0))
  weight = torch.from_numpy(np.transpose(np.asarray(conv.kernel.get_value()), (3, 2, 0, 1)).copy())
  expected = nhwc(F.conv2d(nchw(x), weight, stride=stride, padding=dilation * (kernel - 1) // 2,
                           dilation=dilation))
  np.testing.assert_allclose(conv(jnp.asarray(x)), expected, rtol=0, atol=1e-5)


def test_max_pool_matches_torch():
  x = _random((2, 15, 12, 3)) - 3.0  # all negative: zero padding would show
  expected = nhwc(F.max_pool2d(nchw(x), 3, stride=2, padding=1))
  np.testing.assert_array_equal(layers.max_pool_3x3_s2(jnp.asarray(x)), expected)


def test_batchnorm_train_and_eval_match_torch():
  torch_bn = torch.nn.BatchNorm2d(6)
  with torch.no_grad():
    torch_bn.weight.uniform_(0.5, 1.5)
    torch_bn.bias.normal_()
  bn = layers.BatchNorm(6)
  bn.scale.set_value(jnp.asarray(torch_bn.weight.detach().numpy()))
  bn.bias.set_value(jnp.asarray(torch_bn.bias.detach().numpy()))
  torch_bn.train()
  for seed in range(3):
    # Batch of 2 at 1x1, as the PSPNet 1x1 bin sees it: the unbiased running variance shows.
    for shape in [(2, 1, 1, 6), (3, 5, 4, 6)]:
      x = _random(shape, seed) * 3 + 1
      shift = np.asarray(bn.mean.get_value())
      expected = nhwc(torch_bn(nchw(x)))
      # The one-pass variance loses eps * ((mean - shift) / std)^2 of itself (BatchNorm's
      # docstring); two values per channel can sit close together (seed 1: ratio^2 = 1122).
      flat = x.reshape(-1, 6).astype(np.float64)
      ratio2 = (flat.mean(0) - shift) ** 2 / flat.var(0)
      x_hat = (flat - flat.mean(0)) / flat.std(0)
      bound = 1e-5 + 2 * np.finfo(np.float32).eps * ratio2 * np.abs(x_hat * torch_bn.weight.detach().numpy())
      error = np.abs(np.asarray(bn(jnp.asarray(x))) - expected).reshape(-1, 6)
      assert np.all(error <= bound), (error.max(), seed, shape)
  np.testing.assert_allclose(bn.mean.get_value(), torch_bn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(bn.var.get_value(), torch_bn.running_var.numpy(), rtol=1e-6, atol=1e-6)
  torch_bn.eval()
  bn.use_running_average = True
  x = _random((2, 3, 3, 6), 7)
  np.testing.assert_allclose(bn(jnp.asarray(x)), nhwc(torch_bn(nchw(x))), rtol=0, atol=1e-5)


def test_batchnorm_shifted_by_the_running_mean_keeps_the_variance_of_offset_data():
  """Data far from zero (mean 300, std 1): shifted by a running mean near the batch mean, the
  one-pass variance equals float64's; unshifted (a fresh layer) it is off as the bound says."""
  x = (_random((4, 8, 8, 5), 3) + 300).astype(np.float32)
  reference = x.reshape(-1, 5).astype(np.float64).var(0)
  shifted = layers.batch_norm_train(jnp.asarray(x), jnp.ones(5), jnp.zeros(5),
                                    jnp.full(5, 299.5), jnp.float32)[2]
  unshifted = layers.batch_norm_train(jnp.asarray(x), jnp.ones(5), jnp.zeros(5),
                                      jnp.zeros(5), jnp.float32)[2]
  np.testing.assert_allclose(shifted, reference, rtol=1e-5)
  assert np.max(np.abs(np.asarray(unshifted) / reference - 1)) > 1e-3   # the cancellation shows


def test_batchnorm_gradients_match_torch_and_autodiff_of_two_passes():
  """The custom VJP (one reduction round, x kept in its own dtype) against float64 PyTorch for
  the normalized output, and against JAX autodiff of the two-pass form for the returned
  mean and variance (which the layer itself only feeds to its running statistics)."""
  rs = np.random.RandomState(4)
  x = (rs.randn(3, 5, 4, 6) * 2 + 0.5).astype(np.float32)
  scale = rs.uniform(0.5, 1.5, 6).astype(np.float32)
  bias = rs.randn(6).astype(np.float32)
  g_y, g_mean, g_var = rs.randn(3, 5, 4, 6), rs.randn(6), rs.randn(6)
  g_y, g_mean, g_var = (a.astype(np.float32) for a in (g_y, g_mean, g_var))

  ours = jax.vjp(lambda *a: layers.batch_norm_train(*a, jnp.zeros(6), jnp.float32),
                 x, scale, bias)[1]((g_y, jnp.zeros(6), jnp.zeros(6)))
  tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, scale, bias)]
  y = F.batch_norm(tensors[0].permute(0, 3, 1, 2), None, None, tensors[1], tensors[2], training=True,
                   eps=layers.BN_EPSILON)
  y.backward(torch.tensor(g_y, dtype=torch.float64).permute(0, 3, 1, 2))
  for actual, tensor in zip(ours, tensors):
    expected = tensor.grad.numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())

  def two_pass(x):
    mean = jnp.mean(x, axis=(0, 1, 2))
    return mean, jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
  expected = jax.vjp(two_pass, x)[1]((g_mean, g_var))[0]
  actual = jax.vjp(lambda x: layers.batch_norm_train(x, scale, bias, jnp.zeros(6), jnp.float32),
                   x)[1]((jnp.zeros_like(g_y), g_mean, g_var))[0]
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_dropout2d_drops_whole_channels():
  from pspnet_jax.models.pspnet import SegmentationHead
  head = SegmentationHead(4, 64, 3, 0.5, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 6, 5, 64))
  dropped = head.dropout(x)
  per_channel = np.asarray(dropped).reshape(2, 30, 64)
  # Each (image, channel) is all zeros or all 1 / (1 - p): whole channels, like nn.Dropout2d.
  assert np.all(per_channel.min(axis=1) == per_channel.max(axis=1))
  assert set(np.unique(per_channel)) == {0.0, 2.0}
  head.eval()
  np.testing.assert_array_equal(head.dropout(x), x)


@pytest.mark.parametrize('stride', [1, 2])
def test_one_by_one_convolutions_are_dots_with_the_convolution_values(stride):
  conv = layers.conv2d(16, 8, 1, stride=stride, use_bias=True, torch_default_init=True,
                       rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 11, 16)), jnp.float32)
  expected = jax.lax.conv_general_dilated(
      x, conv.kernel.get_value(), (stride, stride), ((0, 0), (0, 0)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + conv.bias.get_value()
  np.testing.assert_allclose(conv(x), expected, atol=1e-5)
  program = str(jax.make_jaxpr(conv)(x))
  assert 'dot_general' in program and 'conv_general_dilated' not in program
  # Any other kernel stays a convolution.
  assert 'conv_general_dilated' in str(jax.make_jaxpr(layers.conv2d(16, 8, 3, rngs=nnx.Rngs(0)))(x))

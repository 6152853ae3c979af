"""Layers whose numerics must match PyTorch exactly: resize, adaptive pooling, BatchNorm, convolutions.

Everything works on NHWC arrays. Resize and adaptive pooling are both separable
linear maps, so they are written once as a pair of small matrices (built in
numpy at trace time from the static shapes) applied along H and W. That gives
exact PyTorch bin boundaries and `align_corners` semantics for any size, needs
no gather (whose gradient is a slow scatter on TPU) and costs two small matmuls.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# PyTorch's BatchNorm defaults, used by the official PSPNet (momentum here is
# PyTorch's: new = (1 - m) * old + m * batch, i.e. Flax momentum 0.9).
BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5


def accumulation_dtype(dtype):
  """The dtype of sums and statistics for values of `dtype`: float32 for bfloat16 and
  float32, float64 for float64 (the model runs in float64 under `jax.enable_x64` to be
  compared exactly with PyTorch's float64, tests/test_model.py)."""
  return jnp.promote_types(dtype, jnp.float32)


def _maps_module(*sizes):
  """numpy and float64 for static sizes (the maps are constants built at trace time); jnp and
  float32 when a size is symbolic (`jax.export` with polymorphic H and W: the maps are computed
  in the graph from the sizes, to float32 rounding of the same formulas)."""
  if all(isinstance(size, int) for size in sizes):
    return np, np.float64
  return jnp, jnp.float32


def _resize_matrix(in_size, out_size, align_corners: bool):
  """(out_size, in_size) weights of 1-D linear interpolation, as F.interpolate computes it."""
  xp, dtype = _maps_module(in_size, out_size)
  dst = xp.arange(out_size).astype(dtype)
  in_float, out_float = xp.asarray(in_size, dtype), xp.asarray(out_size, dtype)
  if align_corners:
    src = dst * ((in_float - 1) / xp.maximum(out_float - 1, 1))
  else:
    # PyTorch (size given, no scale_factor): half-pixel centres, negatives clamped to 0.
    src = xp.maximum((dst + 0.5) * (in_float / out_float) - 0.5, 0.0)
  lo = xp.minimum(xp.floor(src).astype(xp.int32), in_size - 1)
  hi = xp.minimum(lo + 1, in_size - 1)
  frac = (src - lo)[:, None]
  columns = xp.arange(in_size)[None, :]
  return (1.0 - frac) * (columns == lo[:, None]) + frac * (columns == hi[:, None])


def _adaptive_pool_matrix(in_size, bins: int):
  """(bins, in_size) averaging weights with PyTorch's adaptive pooling boundaries:
  start = floor(i * in / bins), end = ceil((i + 1) * in / bins)."""
  xp, dtype = _maps_module(in_size)
  index = xp.arange(bins)
  start = index * in_size // bins
  end = -(-(index + 1) * in_size // bins)
  columns = xp.arange(in_size)[None, :]
  inside = (columns >= start[:, None]) & (columns < end[:, None])
  return inside / (end - start)[:, None].astype(dtype)


# Matmul precision of the resize and pooling maps, by config name (model.resize_precision).
# HIGHEST keeps float32 inputs exact: GPUs would otherwise run float32 matmuls in TF32, and
# TPUs in one bfloat16 pass (6 passes at HIGHEST). bfloat16 inputs take one pass either way.
PRECISIONS = {'highest': jax.lax.Precision.HIGHEST, 'default': jax.lax.Precision.DEFAULT}


def _apply_separable(x: jax.Array, rows: np.ndarray, cols: np.ndarray,
                     precision: jax.lax.Precision) -> jax.Array:
  """Applies `rows` along H and `cols` along W of an NHWC array, accumulating in float32
  (or float64, `accumulation_dtype`)."""
  accumulation = accumulation_dtype(x.dtype)
  y = jnp.einsum('oh,nhwc->nowc', jnp.asarray(rows, x.dtype), x,
                 precision=precision, preferred_element_type=accumulation)
  y = jnp.einsum('pw,nowc->nopc', jnp.asarray(cols, accumulation), y,
                 precision=precision, preferred_element_type=accumulation)
  return y.astype(x.dtype)


def resize_bilinear(x: jax.Array, size: tuple[int, int], align_corners: bool = True, *,
                    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST) -> jax.Array:
  """Bilinear resize of NHWC `x` to `size` (H, W), equal to F.interpolate(mode='bilinear').

  Unlike `jax.image.resize` it never antialiases, and supports align_corners=True,
  which is what the official PSPNet uses everywhere. The result has x's dtype.
  """
  height, width = x.shape[1:3]
  if (height, width) == tuple(size):
    return x
  return _apply_separable(x, _resize_matrix(height, size[0], align_corners),
                          _resize_matrix(width, size[1], align_corners), precision)


def adaptive_avg_pool(x: jax.Array, bins: int, *,
                      precision: jax.lax.Precision = jax.lax.Precision.HIGHEST) -> jax.Array:
  """F.adaptive_avg_pool2d(x, bins) for NHWC `x` of any height and width."""
  height, width = x.shape[1:3]
  return _apply_separable(x, _adaptive_pool_matrix(height, bins),
                          _adaptive_pool_matrix(width, bins), precision)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """nn.MaxPool2d(3, stride=2, padding=1): the ResNet stem pool, padded with -inf."""
  return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


# The official model initializes its ResNet as semseg's resnet.py does:
# kaiming_normal_(mode='fan_out', nonlinearity='relu') for every convolution.
_resnet_kernel_init = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _torch_default_bias_init(fan_in: int):
  """PyTorch's default nn.Conv2d bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _conv_or_dot(lhs, rhs, window_strides, padding, *, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """`jax.lax.conv_general_dilated`, with 1x1 kernels computed as a matrix product.

  XLA:CPU runs a 1x1 convolution 1.4-2.6x slower than the same product as a
  dot (1024->256 channels on 4x60x60: 109 ms as a convolution, 42 ms as a dot,
  PyTorch 59 ms), and most of a bottleneck ResNet's work is 1x1. The values are
  the same: an unpadded 1x1 kernel reads each (strided) pixel alone. On TPU and
  GPU XLA lowers such a convolution to a dot anyway. Symbolic sides (`jax.export`)
  keep the convolution: its output size is the same expression as the 3x3 convs'
  beside it, where a strided slice's is one JAX cannot prove equal for any size.
  """
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
  static_sides = all(isinstance(side, int) for side in lhs.shape[1:3])
  if (static_sides and rhs.shape[:2] == (1, 1) and feature_group_count == 1
      and dimension_numbers == nhwc
      and all(tuple(side) == (0, 0) for side in padding)
      and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))):
    stride_h, stride_w = window_strides
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    return jnp.einsum('bhwc,cd->bhwd', lhs[:, ::stride_h, ::stride_w], rhs[0, 0],
                      precision=precision, **kwargs)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                                      dimension_numbers=dimension_numbers,
                                      feature_group_count=feature_group_count,
                                      precision=precision, **kwargs)


def conv2d(in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
           dilation: int = 1, use_bias: bool = False, torch_default_init: bool = False,
           dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """A PyTorch-style convolution: symmetric padding dilation*(k-1)/2, float32 parameters.

  Flax's padding='SAME' pads stride-2 convolutions asymmetrically (more on the
  bottom/right), which shifts every feature by half a pixel relative to PyTorch.

  Initialization: the ResNet's Kaiming fan_out by default; `torch_default_init`
  gives PyTorch's default instead, which the official pyramid pooling and heads
  keep (they are built after the ResNet's init loop): kaiming_uniform_(a=sqrt(5)),
  i.e. weights and biases U(+-1/sqrt(fan_in)), fan_in = in_features * k * k.
  """
  pad = dilation * (kernel_size - 1) // 2
  fan_in = in_features * kernel_size * kernel_size
  if torch_default_init:
    # variance_scaling's uniform limit is sqrt(3 * scale / fan_in): 1/3 gives 1/sqrt(fan_in).
    kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
    bias_init = _torch_default_bias_init(fan_in)
  else:
    kernel_init, bias_init = _resnet_kernel_init, nnx.initializers.zeros_init()
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), strides=stride,
                  padding=((pad, pad), (pad, pad)), kernel_dilation=dilation,
                  use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=kernel_init, bias_init=bias_init, rngs=rngs,
                  conv_general_dilated=_conv_or_dot)


def _reduce_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(x.ndim - 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, shift: jax.Array,
                     dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Train-mode BatchNorm over every axis but the last: (y in `dtype`, mean, biased variance).

  Statistics and arithmetic are float32 whatever x's dtype (float64 for float64,
  `accumulation_dtype`). Each direction needs
  one round of reductions over the batch, which is one collective when the batch
  is sharded (XLA merges the independent ones):

  - forward: the moments of x - shift, mean(x - shift) and mean((x - shift)^2),
    are independent sums; mean = shift + m1, var = m2 - m1^2. The textbook
    two-pass form (mean, then mean of squared deviations) needs two rounds. With
    the running mean as the shift, m1 is small and the subtraction loses about
    float32 epsilon * ((mean - shift) / std)^2 of the variance, nothing of note
    for a ResNet's activations (measured in tests/test_layers.py).
  - backward: sum(g) and sum(g * x_hat), independent, then elementwise. Autodiff
    of the forward would add a second round and keep float32 copies of x for
    the backward; this VJP keeps x in its own (compute) dtype and recomputes x_hat.
  """
  return _batch_norm_train_fwd(x, scale, bias, shift, dtype)[0]


def _normalize(x, mean, var, scale, bias, dtype):
  """(x - mean) / sqrt(var + eps) * scale + bias in float32 (at least), returned in `dtype`."""
  x = x.astype(accumulation_dtype(x.dtype))
  return ((x - mean) * (scale * jax.lax.rsqrt(var + BN_EPSILON)) + bias).astype(dtype)


def _batch_norm_train_fwd(x, scale, bias, shift, dtype):
  axes = _reduce_axes(x)
  centered = x.astype(accumulation_dtype(x.dtype)) - shift
  shifted_mean = jnp.mean(centered, axis=axes)
  mean_square = jnp.mean(jnp.square(centered), axis=axes)
  mean = shift + shifted_mean
  var = jnp.maximum(mean_square - jnp.square(shifted_mean), 0.0)
  y = _normalize(x, mean, var, scale, bias, dtype)
  return (y, mean, var), (x, scale, mean, jax.lax.rsqrt(var + BN_EPSILON))


def _batch_norm_train_bwd(dtype, residuals, cotangents):
  del dtype
  x, scale, mean, inv = residuals
  g_y, g_mean, g_var = cotangents
  axes = _reduce_axes(x)
  count = x.size // x.shape[-1]
  deviation = x.astype(accumulation_dtype(x.dtype)) - mean
  x_hat = deviation * inv
  g = g_y.astype(deviation.dtype)
  g_bias = jnp.sum(g, axis=axes)
  g_scale = jnp.sum(g * x_hat, axis=axes)
  # d/dx of the normalized output, then of the returned mean and (biased) variance.
  g_x = (scale * inv / count) * (count * g - g_bias - x_hat * g_scale)
  g_x = g_x + (g_mean + 2.0 * g_var * deviation) / count
  return (g_x.astype(x.dtype), g_scale.astype(scale.dtype), g_bias.astype(scale.dtype),
          jnp.zeros_like(mean))


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nnx.Module):
  """nn.BatchNorm2d semantics on NHWC, synchronized wherever the batch is sharded.

  Differences from `nnx.BatchNorm` that matter for matching the official model:
  the running variance is updated with the *unbiased* batch variance (PyTorch;
  Flax uses the biased one, 6% off for the 1x1 pyramid bin at batch 16), the
  variance is taken around the running mean (little E[x^2] - E[x]^2 cancellation) and
  the statistics are always float32 whatever the compute dtype. The reduction
  runs over the whole (global) batch, so under `jax.jit` with the batch sharded
  over the mesh it is synchronized BatchNorm with no `axis_name`, one collective
  per direction (`batch_norm_train`).
  """

  def __init__(self, num_features: int, *, dtype=jnp.float32, use_running_average: bool = False):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.dtype = dtype
    self.use_running_average = use_running_average

  def __call__(self, x: jax.Array) -> jax.Array:
    scale, bias = self.scale.get_value(), self.bias.get_value()
    if self.use_running_average:
      return _normalize(x, self.mean.get_value(), self.var.get_value(), scale, bias, self.dtype)
    running_mean = jax.lax.stop_gradient(self.mean.get_value())
    y, mean, var = batch_norm_train(x, scale, bias, running_mean, self.dtype)
    count = x.size // x.shape[-1]
    unbiased_var = var * (count / max(count - 1, 1))
    self.mean.set_value((1 - BN_MOMENTUM) * running_mean
                        + BN_MOMENTUM * jax.lax.stop_gradient(mean))
    self.var.set_value((1 - BN_MOMENTUM) * self.var.get_value()
                       + BN_MOMENTUM * jax.lax.stop_gradient(unbiased_var))
    return y


class ConvBNReLU(nnx.Module):
  """conv (no bias) -> BatchNorm -> ReLU, the unit of the pyramid pooling and the heads.

  Outside the ResNet, so its convolution starts with PyTorch's default initialization.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.conv = conv2d(in_features, out_features, kernel_size, torch_default_init=True,
                       dtype=dtype, rngs=rngs)
    self.bn = BatchNorm(out_features, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))

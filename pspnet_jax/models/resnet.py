"""Dilated ResNet 18..152 (NHWC), laid out like PyTorch's so weights convert by name.

Two stems: the "deep base" of the official PSPNet (three 3x3 convs, 64-64-128)
and torchvision's single 7x7 conv. The stride of a bottleneck is in its 3x3
conv (ResNet v1.5, as both semseg and torchvision). Output stride 8 or 16 is
reached the semseg way: the later stages keep stride 1 and *every* 3x3 conv of
such a stage gets the stage's dilation (semseg sets layer3 to 2 and layer4 to 4,
first block included, unlike torchvision's `replace_stride_with_dilation`).

mmsegmentation's ResNetV1c differs in three switches (`mmseg-pspnet.md`): a
narrower deep stem (`stem_widths` 32-32-64, layer1 then takes 64 channels),
`contract_dilation` (the first block of a dilated stage has half the stage's
dilation) and, in basic blocks, an undilated second 3x3 conv
(`dilate_basic_conv2=False`).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from pspnet_jax.models.layers import BatchNorm, conv2d, max_pool_3x3_s2


class Downsample(nnx.Module):
  """The projection shortcut: 1x1 conv (stride of the block) -> BatchNorm."""

  def __init__(self, in_features, out_features, stride, *, dtype, rngs):
    self.conv = conv2d(in_features, out_features, 1, stride=stride, dtype=dtype, rngs=rngs)
    self.bn = BatchNorm(out_features, dtype=dtype)

  def __call__(self, x):
    return self.bn(self.conv(x))


def _shortcut(in_features, out_features, stride, *, dtype, rngs):
  if stride == 1 and in_features == out_features:
    return None
  return Downsample(in_features, out_features, stride, dtype=dtype, rngs=rngs)


class BasicBlock(nnx.Module):
  """Two 3x3 convs (ResNet-18/34); the second is dilated too unless `dilate_conv2=False`."""

  expansion = 1

  def __init__(self, in_features, planes, *, stride, dilation, dilate_conv2=True, dtype, rngs):
    self.conv1 = conv2d(in_features, planes, 3, stride=stride, dilation=dilation, dtype=dtype,
                        rngs=rngs)
    self.bn1 = BatchNorm(planes, dtype=dtype)
    self.conv2 = conv2d(planes, planes, 3, dilation=dilation if dilate_conv2 else 1, dtype=dtype,
                        rngs=rngs)
    self.bn2 = BatchNorm(planes, dtype=dtype)
    self.downsample = _shortcut(in_features, planes, stride, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):
  """1x1 reduce -> 3x3 (stride, dilation) -> 1x1 expand x4 (ResNet-50/101/152)."""

  expansion = 4

  def __init__(self, in_features, planes, *, stride, dilation, dilate_conv2=True, dtype, rngs):
    del dilate_conv2  # a bottleneck has one 3x3 conv
    width = planes * self.expansion
    self.conv1 = conv2d(in_features, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(planes, dtype=dtype)
    self.conv2 = conv2d(planes, planes, 3, stride=stride, dilation=dilation, dtype=dtype,
                        rngs=rngs)
    self.bn2 = BatchNorm(planes, dtype=dtype)
    self.conv3 = conv2d(planes, width, 1, dtype=dtype, rngs=rngs)
    self.bn3 = BatchNorm(width, dtype=dtype)
    self.downsample = _shortcut(in_features, width, stride, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return jax.nn.relu(y + shortcut)




class Stem(nnx.Module):
  """layer0: deep base (3x3 s2 in->w0, 3x3 w0->w1, 3x3 w1->w2; semseg 64-64-128, mmseg 32-32-64)
  or 7x7 s2 in->64; then max-pool. `in_features`: 3 (RGB), 6 for CascadePSP (RGB + 3 masks)."""

  def __init__(self, *, deep: bool, widths=(64, 64, 128), in_features: int = 3, dtype, rngs):
    self.deep = deep
    if deep:
      first, second, third = widths
      self.conv1 = conv2d(in_features, first, 3, stride=2, dtype=dtype, rngs=rngs)
      self.bn1 = BatchNorm(first, dtype=dtype)
      self.conv2 = conv2d(first, second, 3, dtype=dtype, rngs=rngs)
      self.bn2 = BatchNorm(second, dtype=dtype)
      self.conv3 = conv2d(second, third, 3, dtype=dtype, rngs=rngs)
      self.bn3 = BatchNorm(third, dtype=dtype)
      self.out_features = third
    else:
      self.conv1 = conv2d(in_features, 64, 7, stride=2, dtype=dtype, rngs=rngs)
      self.bn1 = BatchNorm(64, dtype=dtype)
      self.out_features = 64

  def __call__(self, x):
    return self.with_conv1(x)[0]

  def with_conv1(self, x):
    """(the stem's output, conv1's output before bn1): CascadePSP's stride-2 skip is the latter."""
    conv1 = self.conv1(x)
    x = jax.nn.relu(self.bn1(conv1))
    if self.deep:
      x = jax.nn.relu(self.bn2(self.conv2(x)))
      x = jax.nn.relu(self.bn3(self.conv3(x)))
    return max_pool_3x3_s2(x), conv1


# (stride, dilation) of layer1..layer4 for each output stride.
_STAGE_GEOMETRY = {
    8: ((1, 1), (2, 1), (1, 2), (1, 4)),
    16: ((1, 1), (2, 1), (2, 1), (1, 2)),
    32: ((1, 1), (2, 1), (2, 1), (2, 1)),
}


class ResNet(nnx.Module):
  """ResNet backbone without the classifier; `__call__` returns the four stage outputs."""

  def __init__(self, block, stage_sizes, *, deep_stem: bool = True, stem_widths=(64, 64, 128),
               output_stride: int = 8, contract_dilation: bool = False,
               dilate_first_block: bool = True, dilate_basic_conv2: bool = True,
               in_features: int = 3, dtype=jnp.float32, rngs: nnx.Rngs):
    if output_stride not in _STAGE_GEOMETRY:
      raise ValueError(f'output_stride must be one of {sorted(_STAGE_GEOMETRY)}, got {output_stride}')
    self.layer0 = Stem(deep=deep_stem, widths=stem_widths, in_features=in_features, dtype=dtype,
                       rngs=rngs)
    in_features = self.layer0.out_features
    stages = []
    for index, (num_blocks, (stride, dilation)) in enumerate(
        zip(stage_sizes, _STAGE_GEOMETRY[output_stride])):
      planes = 64 * 2**index
      blocks = []
      for block_index in range(num_blocks):
        first = block_index == 0
        block_dilation = dilation
        if first and not dilate_first_block:  # CascadePSP's extractor
          block_dilation = 1
        elif first and contract_dilation and dilation > 1:
          # mmseg's ResLayer: the first block of a dilated stage takes half the dilation.
          block_dilation = dilation // 2
        blocks.append(block(in_features, planes, stride=stride if first else 1,
                            dilation=block_dilation, dilate_conv2=dilate_basic_conv2,
                            dtype=dtype, rngs=rngs))
        in_features = planes * block.expansion
      stages.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    # Channels of layer1..layer4 outputs (the aux head reads layer3, the PPM layer4).
    self.stage_features = tuple(64 * 2**i * block.expansion for i in range(4))

  def __call__(self, x, *, remat: str = 'none'):
    return forward_stages(self, x, remat=remat)


# Rematerialization of the backbone: 'none' keeps every activation the backward needs;
# 'block' keeps only each residual block's input and recomputes the block in the backward;
# 'stage' keeps only each stage's input (layer0 .. layer4).
REMAT_POLICIES = ('none', 'block', 'stage')


def _run_blocks(blocks, x):
  for block in blocks:
    x = block(x)
  return x


def forward_stages(model: nnx.Module, x: jax.Array, *, remat: str = 'none') -> list[jax.Array]:
  """Runs `model.layer0..layer4` (a ResNet, or a PSPNet that holds them); layer1..4 outputs.

  `remat` (REMAT_POLICIES) trades the memory of saved activations for a second
  forward pass of the rematerialized parts in the backward; the values agree to float
  rounding (XLA may fuse the recomputation differently).
  """
  call = nnx.remat(_run_blocks) if remat == 'stage' else _run_blocks
  x = call([model.layer0], x)
  features = []
  for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
    if remat == 'block':
      for block in stage:
        x = nnx.remat(_run_blocks)([block], x)
    else:
      x = call(stage, x)
    features.append(x)
  return features


BACKBONES = {
    'resnet18': functools.partial(ResNet, BasicBlock, (2, 2, 2, 2)),
    'resnet34': functools.partial(ResNet, BasicBlock, (3, 4, 6, 3)),
    'resnet50': functools.partial(ResNet, Bottleneck, (3, 4, 6, 3)),
    'resnet101': functools.partial(ResNet, Bottleneck, (3, 4, 23, 3)),
    'resnet152': functools.partial(ResNet, Bottleneck, (3, 8, 36, 3)),
}

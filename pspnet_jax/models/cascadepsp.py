"""CascadePSP's refinement module (Cheng et al., CVPR 2020) as hkchengrex/CascadePSP builds it.

A dilated ResNet over 6 channels (RGB, the mask, two guidance masks), a
pyramid pooling of its own (1x1 convs without BatchNorm, align_corners=False,
priors before the features, a 1x1 bottleneck with bias), three pre-activation
decoders back to full resolution and 1x1 heads at strides 8, 4 and 1. One
forward runs the same backbone up to three times ("3-level cascade"): each
pass is guided by the tanh of the previous pass's logits.

Attribute names follow the official `state_dict` (`feats`, `psp`, `up_1`..`up_3`,
`final_28`, `final_56`, `final_11`, `final_21`) so that `pspnet_jax.weights` maps
it with one name table. The official backbone is ResNet-50; the others exist
for small demos, their decoder widths following the backbone's channels. `widths`
(the pyramid's output and up_1, up_2, up_3's) are the official (1024, 512, 256,
32) unless a CPU demo narrows them: the decoders at strides 4, 2 and 1 cost
several times the backbone (a ResNet-18 module at 96x96: about 55 GFLOPs per
image forward with the official widths).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from pspnet_jax.models.layers import (BatchNorm, accumulation_dtype, adaptive_avg_pool, conv2d,
                                      resize_bilinear)
from pspnet_jax.models.resnet import BACKBONES

REFINEMENT_BACKBONES = ('resnet18', 'resnet34', 'resnet50', 'resnet101')
# The pyramid pooling's output and the three decoders' widths of the official module.
OFFICIAL_WIDTHS = (1024, 512, 256, 32)
# The stem's conv1 output: the stride-2 skip of up_2.
_STEM_FEATURES = 64


def _conv(in_features, out_features, kernel_size, *, dtype, rngs):
  """A convolution with bias and PyTorch's default init: everything outside the ResNet."""
  return conv2d(in_features, out_features, kernel_size, use_bias=True, torch_default_init=True,
                dtype=dtype, rngs=rngs)


class PyramidPooling(nnx.Module):
  """The official PSPModule: per bin, adaptive avg pool -> 1x1 conv (no bias, no BN) ->
  upsample (align_corners=False); concat [priors, features] -> 1x1 conv (bias) -> ReLU."""

  def __init__(self, in_features: int, out_features: int, bins=(1, 2, 3, 6), *, precision,
               dtype, rngs):
    self.bins = tuple(bins)
    self.precision = precision
    self.stages = nnx.List([conv2d(in_features, in_features, 1, torch_default_init=True,
                                   dtype=dtype, rngs=rngs) for _ in self.bins])
    self.bottleneck = _conv(in_features * (len(self.bins) + 1), out_features, 1, dtype=dtype,
                            rngs=rngs)

  def __call__(self, x):
    size = x.shape[1:3]
    priors = [resize_bilinear(stage(adaptive_avg_pool(x, bins, precision=self.precision)), size,
                              align_corners=False, precision=self.precision)
              for bins, stage in zip(self.bins, self.stages)]
    return jax.nn.relu(self.bottleneck(jnp.concatenate([*priors, x], axis=-1)))


class PreActivationPair(nnx.Module):
  """BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 3x3 conv (convs with bias): the official
  nn.Sequential at indices 0, 2, 3, 5."""

  def __init__(self, in_features: int, out_features: int, *, dtype, rngs):
    self.bn1 = BatchNorm(in_features, dtype=dtype)
    self.conv1 = _conv(in_features, out_features, 3, dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(out_features, dtype=dtype)
    self.conv2 = _conv(out_features, out_features, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = self.conv1(jax.nn.relu(self.bn1(x)))
    return self.conv2(jax.nn.relu(self.bn2(x)))


class Upsample(nnx.Module):
  """The official PSPUpsample: x doubled in size; p = conv([x, skip]) + shortcut(x); p + conv2(p).

  The official constructor takes (x_features, x_features + skip_features, out_features).
  """

  def __init__(self, x_features: int, skip_features: int, out_features: int, *, precision,
               dtype, rngs):
    self.precision = precision
    self.conv = PreActivationPair(x_features + skip_features, out_features, dtype=dtype,
                                  rngs=rngs)
    self.conv2 = PreActivationPair(out_features, out_features, dtype=dtype, rngs=rngs)
    self.shortcut = _conv(x_features, out_features, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x, skip):
    height, width = x.shape[1:3]
    # scale_factor=2 in the official code: for an exact doubling the same map as size=2H.
    x = resize_bilinear(x, (2 * height, 2 * width), align_corners=False,
                        precision=self.precision)
    p = self.conv(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)) + self.shortcut(x)
    return p + self.conv2(p)


class Head(nnx.Module):
  """1x1 conv -> ReLU -> 1x1 conv to one logit (the official final_28 and final_56)."""

  def __init__(self, in_features: int, hidden: int = 32, *, dtype, rngs):
    self.hidden = _conv(in_features, hidden, 1, dtype=dtype, rngs=rngs)
    self.classifier = _conv(hidden, 1, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.classifier(jax.nn.relu(self.hidden(x)))


class RefinementModule(nnx.Module):
  """The refinement module: `__call__(images, masks, inter_s8=None, inter_s4=None)`.

  images (N, H, W, 3) normalized RGB; masks (N, H, W, 1) in [-1, 1]; H and W
  multiples of 8. Returns a dict of float32 (float64 under float64) logits
  (N, H, W, 1) by official name, each with its sigmoid as `pred_<suffix>`:
  `out_28` (first pass, stride 8), `out_28_2` and `out_56` (second pass,
  strides 8 and 4), `out_224`, `out_28_3`, `out_56_2` (third pass); the
  numbers are the maps' sides at the 224 training crop. As in the
  official forward, `inter_s8` (already squashed to [-1, 1]) replaces the
  first pass, and `inter_s8` with `inter_s4` the first two; the passes
  replaced return no outputs. `model.train()` / `model.eval()` switch the
  BatchNorms, whose running statistics a train-mode call updates once per pass.
  """

  def __init__(self, *, backbone: str = 'resnet50', widths=OFFICIAL_WIDTHS, dtype=jnp.float32,
               resize_precision=jax.lax.Precision.HIGHEST, rngs: nnx.Rngs):
    if backbone not in REFINEMENT_BACKBONES:
      raise ValueError(f'unknown backbone {backbone!r}; choose one of {REFINEMENT_BACKBONES}')
    self.dtype = dtype
    self.resize_precision = resize_precision
    # The official extractor: 7x7 stem over 6 channels, layer3/layer4 dilated 2/4 at stride 1
    # except for their first blocks.
    self.feats = BACKBONES[backbone](deep_stem=False, in_features=6, output_stride=8,
                                     dilate_first_block=False, dtype=dtype, rngs=rngs)
    skip_4, features = self.feats.stage_features[0], self.feats.stage_features[3]
    pooled, width_4, width_2, width_1 = widths
    self.psp = PyramidPooling(features, pooled, precision=resize_precision, dtype=dtype,
                              rngs=rngs)
    self.up_1 = Upsample(pooled, skip_4, width_4, precision=resize_precision, dtype=dtype,
                         rngs=rngs)
    self.up_2 = Upsample(width_4, _STEM_FEATURES, width_2, precision=resize_precision,
                         dtype=dtype, rngs=rngs)
    self.up_3 = Upsample(width_2, 3, width_1, precision=resize_precision, dtype=dtype, rngs=rngs)
    self.final_28 = Head(pooled, dtype=dtype, rngs=rngs)
    self.final_56 = Head(width_4, dtype=dtype, rngs=rngs)
    self.final_11 = _conv(width_1 + 3, 32, 1, dtype=dtype, rngs=rngs)
    self.final_21 = _conv(32, 1, 1, dtype=dtype, rngs=rngs)

  def _pass(self, images, masks, guide_s8, guide_s4):
    """One run of backbone and pyramid pooling: (pooled stride-8 features, stride-2 skip,
    stride-4 skip)."""
    x = jnp.concatenate([images, masks, guide_s8, guide_s4], axis=-1).astype(self.dtype)
    x, stride_2 = self.feats.layer0.with_conv1(x)
    stage_outputs = []
    for stage in (self.feats.layer1, self.feats.layer2, self.feats.layer3, self.feats.layer4):
      for block in stage:
        x = block(x)
      stage_outputs.append(x)
    return self.psp(x), stride_2, stage_outputs[0]

  def _logits(self, logits, size):
    """One-channel logits upsampled to the input `size` (the official scale_factor 8 or 4:
    for exact multiples the same map), in float32 (float64 for a float64 model)."""
    return resize_bilinear(logits.astype(accumulation_dtype(self.dtype)), size,
                           align_corners=False, precision=self.resize_precision)

  def __call__(self, images: jax.Array, masks: jax.Array, inter_s8: jax.Array | None = None,
               inter_s4: jax.Array | None = None) -> dict[str, jax.Array]:
    size = images.shape[1:3]
    if size[0] % 8 or size[1] % 8:
      raise ValueError(f'the refinement module needs H and W multiples of 8, got {size}')
    if inter_s4 is not None and inter_s8 is None:
      raise ValueError('inter_s4 replaces the second pass, which needs inter_s8 as well')
    images = images.astype(self.dtype)
    outputs = {}
    if inter_s8 is None:
      p, _, _ = self._pass(images, masks, masks, masks)
      outputs['out_28'] = self._logits(self.final_28(p), size)
      inter_s8 = jnp.tanh(outputs['out_28'])
    if inter_s4 is None:
      p, _, stride_4 = self._pass(images, masks, inter_s8, inter_s8)
      outputs['out_28_2'] = self._logits(self.final_28(p), size)
      outputs['out_56'] = self._logits(self.final_56(self.up_1(p, stride_4)), size)
      inter_s8, inter_s4 = jnp.tanh(outputs['out_28_2']), jnp.tanh(outputs['out_56'])
    p, stride_2, stride_4 = self._pass(images, masks, inter_s8, inter_s4)
    outputs['out_28_3'] = self._logits(self.final_28(p), size)
    p = self.up_1(p, stride_4)
    outputs['out_56_2'] = self._logits(self.final_56(p), size)
    p = self.up_3(self.up_2(p, stride_2), images)
    p = jax.nn.relu(self.final_11(jnp.concatenate([p, images], axis=-1)))
    outputs['out_224'] = self.final_21(p).astype(accumulation_dtype(self.dtype))
    outputs.update({'pred_' + name.removeprefix('out_'): jax.nn.sigmoid(logits)
                    for name, logits in list(outputs.items())})
    return outputs

"""PSPNet (Zhao et al., CVPR 2017) as the official hszhao/semseg code builds it, in Flax NNX.

Attribute names follow the official `state_dict` (layer0..layer4, ppm, cls, aux)
so that `pspnet_jax.convert` maps weights with one name table. With
`use_ppm=False` the model is the dilated-FCN baseline of the paper's ablation.
The switches of mmsegmentation's PSPNet (`mmseg-pspnet.md`) are arguments:
the backbone's (`resnet.py`), `ppm_align_corners`, `align_corners` of the
final resize (False: to the input's own size, any size) and the heads' widths.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from pspnet_jax.models.layers import ConvBNReLU, adaptive_avg_pool, conv2d, resize_bilinear
from pspnet_jax.models.resnet import BACKBONES, REMAT_POLICIES, forward_stages


class PyramidPooling(nnx.Module):
  """Pyramid pooling: per bin, adaptive avg pool -> 1x1 conv-BN-ReLU -> upsample; concat with input."""

  def __init__(self, in_features: int, bins, *, align_corners: bool = True,
               precision=jax.lax.Precision.HIGHEST, dtype, rngs):
    self.bins = tuple(bins)
    self.align_corners = align_corners
    self.precision = precision
    reduction = in_features // len(self.bins)
    self.stages = nnx.List(
        [ConvBNReLU(in_features, reduction, 1, dtype=dtype, rngs=rngs) for _ in self.bins])
    self.out_features = in_features + reduction * len(self.bins)

  def __call__(self, x):
    size = x.shape[1:3]
    pooled = [resize_bilinear(stage(adaptive_avg_pool(x, bins, precision=self.precision)), size,
                              align_corners=self.align_corners, precision=self.precision)
              for bins, stage in zip(self.bins, self.stages)]
    return jnp.concatenate([x, *pooled], axis=-1)


class SegmentationHead(nnx.Module):
  """3x3 conv-BN-ReLU -> Dropout2d -> 1x1 conv to classes (the official `cls` and `aux`)."""

  def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float, *, dtype,
               rngs):
    self.block = ConvBNReLU(in_features, hidden, 3, dtype=dtype, rngs=rngs)
    # Dropout2d: one decision per (image, channel), broadcast over H and W.
    self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)
    self.classifier = conv2d(hidden, num_classes, 1, use_bias=True, torch_default_init=True,
                             dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.classifier(self.dropout(self.block(x)))


class PSPNet(nnx.Module):
  """Dilated ResNet + pyramid pooling + main head, with the auxiliary head on layer3.

  `__call__(images)` takes NHWC images (normalized, any H and W) and returns
  float32 logits of shape (N, H', W', classes), H' = (H - 1) / 8 * zoom_factor + 1
  (= H for the default zoom_factor 8), upsampled with align_corners=True; with
  `align_corners=False` (mmseg) H' = H for any H (zoom_factor 8), upsampled with
  align_corners=False.
  `return_aux=True` also returns the aux logits (train-time deep supervision).

  Switches that change cost, not the architecture (configs/default.py says
  when to use them): `logits_dtype`, the dtype in which the logits are
  upsampled and returned (bfloat16 halves the largest tensors of a training
  step; the loss computes its softmax in float32 from them either way);
  `resize_precision`, the matmul precision of the resize and pooling maps;
  `remat`, rematerialization of the backbone ('none', 'block', 'stage').
  Mode switches the NNX way: `model.train()` (batch statistics, dropout on)
  and `model.eval()` (running statistics, no dropout).
  """

  def __init__(self, num_classes: int, *, backbone: str = 'resnet50', deep_stem: bool = True,
               stem_widths=(64, 64, 128), output_stride: int = 8, contract_dilation: bool = False,
               dilate_basic_conv2: bool = True, use_ppm: bool = True, ppm_bins=(1, 2, 3, 6),
               ppm_align_corners: bool = True, head_channels: int = 512,
               aux_channels: int = 256, dropout: float = 0.1, zoom_factor: int = 8,
               align_corners: bool = True, dtype=jnp.float32, logits_dtype=jnp.float32,
               resize_precision=jax.lax.Precision.HIGHEST, remat: str = 'none',
               rngs: nnx.Rngs):
    if backbone not in BACKBONES:
      raise ValueError(f'unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}')
    if remat not in REMAT_POLICIES:
      raise ValueError(f'unknown remat {remat!r}; choose one of {REMAT_POLICIES}')
    if not align_corners and zoom_factor not in (1, 8):
      raise ValueError(f'align_corners=False resizes to the input size: zoom_factor must be 1 '
                       f'or 8, got {zoom_factor}')
    self.zoom_factor = zoom_factor
    self.align_corners = align_corners
    self.dtype = dtype
    self.logits_dtype = logits_dtype
    self.resize_precision = resize_precision
    self.remat = remat
    resnet = BACKBONES[backbone](deep_stem=deep_stem, stem_widths=tuple(stem_widths),
                                 output_stride=output_stride, contract_dilation=contract_dilation,
                                 dilate_basic_conv2=dilate_basic_conv2, dtype=dtype, rngs=rngs)
    # The stages live directly on the model, as in the official state_dict.
    self.layer0, self.layer1, self.layer2 = resnet.layer0, resnet.layer1, resnet.layer2
    self.layer3, self.layer4 = resnet.layer3, resnet.layer4
    aux_features, features = resnet.stage_features[2:]
    if use_ppm:
      self.ppm = PyramidPooling(features, ppm_bins, align_corners=ppm_align_corners,
                                precision=resize_precision, dtype=dtype, rngs=rngs)
      features = self.ppm.out_features
    else:
      self.ppm = None
    self.cls = SegmentationHead(features, head_channels, num_classes, dropout, dtype=dtype,
                                rngs=rngs)
    self.aux = SegmentationHead(aux_features, aux_channels, num_classes, dropout, dtype=dtype,
                                rngs=rngs)

  def _upsample(self, logits, input_size):
    logits = logits.astype(self.logits_dtype)
    if self.zoom_factor == 1:
      return logits
    if not self.align_corners:
      # mmseg's decode head: to the input's size, half-pixel centres.
      return resize_bilinear(logits, input_size, align_corners=False,
                             precision=self.resize_precision)
    # semseg's int((s - 1) / 8 * zoom + 1); a symbolic side (jax.export) is 8k+1, where the
    # integer form is the same.
    size = tuple(int((s - 1) / 8 * self.zoom_factor + 1) if isinstance(s, int)
                 else (s - 1) // 8 * self.zoom_factor + 1 for s in input_size)
    return resize_bilinear(logits, size, align_corners=True, precision=self.resize_precision)

  def __call__(self, images: jax.Array, *, return_aux: bool = False):
    input_size = images.shape[1:3]
    _, _, layer3_out, x = forward_stages(self, images.astype(self.dtype), remat=self.remat)
    if self.ppm is not None:
      x = self.ppm(x)
    logits = self._upsample(self.cls(x), input_size)
    if not return_aux:
      return logits
    return logits, self._upsample(self.aux(layer3_out), input_size)


PSPNet50 = functools.partial(PSPNet, backbone='resnet50')
PSPNet101 = functools.partial(PSPNet, backbone='resnet101')

"""Helpers that put the PyTorch twin and the Flax model side by side with the same weights."""

import jax
import numpy as np
import torch
from flax import nnx

from pspnet_jax import architectures, checkpoint, torch_reference, weights
from pspnet_jax.models.pspnet import PSPNet


# The switches that turn semseg's PSPNet into mmsegmentation's (the config variant arch=mmseg);
# make_twins takes deep_stem and use_ppm by name, and their semseg defaults are mmseg's too.
MMSEG_ARCHITECTURE = {key: value for key, value in architectures.MMSEG_ARCHITECTURE.items()
                      if key not in ('deep_stem', 'use_ppm')}


def randomize_batch_norms(twin, calibration_size: int) -> list:
  """Calibrates the twin's BatchNorm statistics on a random batch, then perturbs them and
  randomizes the affine parameters (make_twins says why); leaves the twin in eval mode and
  returns its BatchNorms in module order."""
  bns = [m for m in twin.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for bn in bns:
    bn.momentum = None  # cumulative average: after one batch, the batch statistics
  twin.train()
  with torch.no_grad():
    twin(torch.randn(2, 3, calibration_size, calibration_size), return_aux=True)
    for bn in bns:
      bn.momentum = 0.1
      std = bn.running_var.sqrt()
      bn.running_mean += 0.2 * std * torch.randn_like(std)
      bn.running_var *= torch.empty_like(std).uniform_(0.7, 1.3)
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_(0.0, 0.1)
  twin.eval()
  return bns


def make_twins(depth=50, classes=150, *, deep_stem=True, output_stride=8, use_ppm=True,
               dropout=0.1, seed=0, calibration_size=97, dtype=jax.numpy.float32,
               **architecture):
  """A twin with random weights and randomized BatchNorm statistics, and the Flax model with them.

  `architecture`: switches both models take by the same names (e.g. MMSEG_ARCHITECTURE,
  head_channels, aux_channels).

  The statistics are first calibrated on a random batch (so activations keep
  a sane scale through 50+ layers), then perturbed, and the BatchNorm affine
  parameters randomized, so that eval mode really exercises every statistic.
  `dtype` is the model's compute dtype; float64 (under `jax.enable_x64`) gives float64 logits.
  """
  torch.manual_seed(seed)
  twin = torch_reference.PSPNet(depth, classes=classes, deep_base=deep_stem,
                                output_stride=output_stride, use_ppm=use_ppm, dropout=dropout,
                                **architecture)
  randomize_batch_norms(twin, calibration_size)
  model = PSPNet(classes, backbone=f'resnet{depth}', deep_stem=deep_stem,
                 output_stride=output_stride, use_ppm=use_ppm, dropout=dropout, dtype=dtype,
                 logits_dtype=jax.numpy.promote_types(dtype, jax.numpy.float32),
                 rngs=nnx.Rngs(seed), **architecture)
  tensors = {k: v.numpy() for k, v in twin.state_dict().items()}
  nnx.update(model, weights.from_torch_state_dict(tensors, checkpoint.model_variables(model)))
  return twin, model


def forward(model, images, *, return_aux=False):
  """`model(images)` compiled; BatchNorm statistics updated in `model` when it is in train mode."""
  return nnx.jit(lambda m, x: m(x, return_aux=return_aux))(model, images)


def nchw(images_nhwc: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.transpose(images_nhwc, (0, 3, 1, 2))))


def nhwc(tensor: torch.Tensor) -> np.ndarray:
  return np.transpose(tensor.detach().numpy(), (0, 2, 3, 1))


def max_relative_diff(actual, expected) -> float:
  """max |actual - expected| / max |expected|."""
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))

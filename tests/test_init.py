"""Initialization as the official model's: per-layer statistics against the PyTorch twin, initialized by PyTorch.

The official PSPNet runs Kaiming fan_out over its ResNet only; the pyramid
pooling and both heads keep PyTorch's default (U(+-1/sqrt(fan_in)) weights
and biases). Sample standard deviations of independent draws differ by about
1/sqrt(2n) for n values, so each layer is compared within a few of those plus
2%: fan_out vs fan_in (sqrt(9)-fold apart for a 3x3 conv with equal channels)
or a normal vs a uniform law of the same bound would be far outside.
"""

import math

import numpy as np
import pytest
import torch
from flax import nnx

from pspnet_jax import checkpoint, weights
from pspnet_jax.models.pspnet import PSPNet
from pspnet_jax.torch_reference import PSPNet as TorchPSPNet


@pytest.mark.parametrize('depth, classes', [(50, 150), (18, 9)])
def test_every_parameter_starts_with_the_official_statistics(depth, classes):
  torch.manual_seed(0)
  twin = TorchPSPNet(depth, classes=classes).state_dict()
  model = PSPNet(classes, backbone=f'resnet{depth}', rngs=nnx.Rngs(0))
  ours = weights.to_torch_state_dict(checkpoint.model_variables(model))
  assert ours.keys() == twin.keys()
  batch_norms = {name.removesuffix('running_mean') for name in twin if name.endswith('running_mean')}
  checked = 0
  for name, reference in twin.items():
    reference, value = reference.numpy().astype(np.float64), ours[name].astype(np.float64)
    assert value.shape == reference.shape, name
    if name.rsplit('.', 1)[0] + '.' in batch_norms:
      # BatchNorm: constants (weight 1, bias 0, mean 0, var 1, no batches) in both.
      np.testing.assert_array_equal(value, reference, err_msg=name)
      continue
    tolerance = 0.02 + 4 / math.sqrt(2 * reference.size)
    assert value.std() == pytest.approx(reference.std(), rel=tolerance), name
    # The same law, not just the same spread: a uniform's bound is its largest value.
    assert np.abs(value).max() == pytest.approx(np.abs(reference).max(), rel=0.5), name
    checked += 1
  assert checked == sum(1 for name in twin if name.endswith('weight') and twin[name].ndim == 4) + 2


def test_the_classifier_starts_near_chance():
  """The 1x1 classifiers over 512 / 256 channels start at PyTorch's narrow default, so the
  first logits are small and the loss starts near ln(classes) (Kaiming fan_out made them
  ~4.5x too wide for 150 classes)."""
  model = PSPNet(150, backbone='resnet18', rngs=nnx.Rngs(0))
  for head, hidden in ((model.cls, 512), (model.aux, 256)):
    kernel = np.asarray(head.classifier.kernel.get_value())
    bias = np.asarray(head.classifier.bias.get_value())
    bound = 1 / math.sqrt(hidden)
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    assert kernel.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)

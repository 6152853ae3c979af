"""CascadePSP's refinement module against the official one (segmentation-refinement 0.6).

The reference is the published `RefinementModule` (tests/cascadepsp_reference.py)
with random weights and randomized BatchNorm statistics and affine parameters
(`cascadepsp_parity`); ours gets its `state_dict` through the cascadepsp names
(`weights`). Every output of every call the official code makes (global step:
no guidance; local step: `inter_s8`, and `inter_s8` with `inter_s4`) is compared
with torch's own.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs import cascadepsp
from pspnet_jax import checkpoint, weights
from pspnet_jax.models import create_model, dropout_streams
from pspnet_jax.models.cascadepsp import RefinementModule
from cascadepsp_parity import random_official
from parity import max_relative_diff, nchw, nhwc

# 40 x 56: non-square, stride-8 maps of 5 x 7 (odd, so that the pyramid's 2-, 3- and 6-bins
# overlap unevenly and every upsampling has a half-pixel phase to get right).
_SIZE = (40, 56)
_OUTPUTS = {
    'global': ('out_28', 'out_28_2', 'out_56', 'out_224', 'out_28_3', 'out_56_2'),
    'inter_s8': ('out_28_2', 'out_56', 'out_224', 'out_28_3', 'out_56_2'),
    'inter_s8_s4': ('out_224', 'out_28_3', 'out_56_2'),
}


def _inputs(seed=0, batch=2, size=_SIZE):
  """(images, mask, inter_s8, inter_s4), NHWC float32; the masks in (-1, 1)."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, *size, 3)).astype(np.float32)
  masks = [np.tanh(2 * rng.standard_normal((batch, *size, 1))).astype(np.float32)
           for _ in range(3)]
  return (images, *masks)


def _arguments(variant, images, mask, s8, s4):
  return {'global': (images, mask), 'inter_s8': (images, mask, s8),
          'inter_s8_s4': (images, mask, s8, s4)}[variant]


def _official_outputs(official, arguments, dtype=torch.float32):
  with torch.no_grad():
    outputs = official(*[nchw(a).to(dtype) for a in arguments])
  return {key: nhwc(value) for key, value in outputs.items()}


def _ours(official, dtype=jnp.float32):
  """Our module with the official module's weights, built without a random initialization."""
  model = nnx.eval_shape(lambda: RefinementModule(dtype=dtype, rngs=nnx.Rngs(0)))
  tensors = {key: value.numpy() for key, value in official.state_dict().items()}
  nnx.update(model, weights.from_cascadepsp_state_dict(tensors,
                                                       checkpoint.model_variables(model)))
  return model


def _call(model, arguments):
  """`model(*arguments)` compiled; BatchNorm statistics updated in `model` in train mode."""
  return nnx.jit(lambda m, *a: m(*a))(model, *arguments)


@pytest.fixture(scope='module')
def official():
  return random_official(seed=0)


@pytest.fixture(scope='module')
def official64(official):
  return copy.deepcopy(official).double()


@pytest.fixture(scope='module')
def ours(official):
  model = _ours(official)
  model.eval()
  return model


def test_parameters_and_state_dict_are_the_official_ones(official, ours):
  params = jax.tree.leaves(nnx.state(ours, nnx.Param))
  assert sum(p.size for p in params) == sum(p.numel() for p in official.parameters())
  state_dict = weights.to_cascadepsp_state_dict(checkpoint.model_variables(ours))
  assert list(state_dict) == list(official.state_dict())  # names and order
  for key, tensor in official.state_dict().items():
    assert state_dict[key].shape == tuple(tensor.shape), key
  # The official extractor leaves the first block of every stage undilated.
  assert [block.conv2.kernel_dilation for block in ours.feats.layer3] == [1, 2, 2, 2, 2, 2]
  assert [block.conv2.kernel_dilation for block in ours.feats.layer4] == [1, 4, 4]
  assert [block.conv2.dilation for block in official.feats.layer4] == [(1, 1), (4, 4), (4, 4)]


@pytest.mark.parametrize('variant', sorted(_OUTPUTS))
def test_eval_outputs_equal_the_official(official64, ours, variant):
  """float32 as inference runs, against the official module in float64 (the official float32
  module's own error is as large: up to 2e-5 on logits of up to 13)."""
  arguments = _arguments(variant, *_inputs())
  reference = _official_outputs(official64, arguments, torch.float64)
  actual = _call(ours, arguments)
  names = _OUTPUTS[variant]
  assert sorted(actual) == sorted(reference) == sorted(
      [*names, *[name.replace('out_', 'pred_') for name in names]])
  for key, value in reference.items():
    assert actual[key].dtype == jnp.float32 and actual[key].shape == value.shape, key
    np.testing.assert_allclose(actual[key], value, rtol=0, atol=1e-4, err_msg=key)


def test_train_mode_equals_the_official_in_float64(official, official64):
  """Batch statistics, and three momentum updates of every running statistic (one per pass,
  unbiased variance), computed in float64 end to end: equal to float64 rounding (the
  statistics to their float32 storage). Train mode because eval-mode BatchNorm computes its
  per-channel factor from the float32 statistics in float32 (layers._normalize), which
  leaves a float64 eval 4e-7 (relative) from the official one."""
  arguments = [a.astype(np.float64) for a in _arguments('global', *_inputs(seed=1))]
  reference_module = copy.deepcopy(official64).train()
  reference = _official_outputs(reference_module, arguments, torch.float64)
  with jax.enable_x64(True):
    model = _ours(official, jnp.float64)
    model.train()
    actual = _call(model, arguments)
    for key, value in reference.items():
      assert actual[key].dtype == jnp.float64, key
      assert max_relative_diff(actual[key], value) <= 1e-9, key
    state_dict = weights.to_cascadepsp_state_dict(checkpoint.model_variables(model))
  for key, tensor in reference_module.state_dict().items():
    if key.endswith(('running_mean', 'running_var')):
      assert max_relative_diff(state_dict[key], tensor.numpy()) <= 1e-6, key


def _refinement_config(backbone):
  config = cascadepsp.get_config()
  config.model.backbone = backbone
  config.model.pretrained = ''
  return config


def test_resnet18_variant_builds_and_runs_at_the_input_size():
  config = _refinement_config('resnet18')
  model = create_model(config, rngs=nnx.Rngs(0))
  assert isinstance(model, RefinementModule)
  # Widths follow the backbone: pyramid over layer4's 512 channels, up_1's skip layer1's 64.
  assert model.psp.bottleneck.in_features == 5 * 512
  assert model.up_1.conv.bn1.scale.shape == (1024 + 64,)
  model.eval()
  images, mask, s8, s4 = _inputs(size=(32, 48))
  for variant, names in _OUTPUTS.items():
    outputs = _call(model, _arguments(variant, images, mask, s8, s4))
    assert sorted(name for name in outputs if name.startswith('out_')) == sorted(names)
    for name, value in outputs.items():
      assert value.shape == (2, 32, 48, 1) and value.dtype == jnp.float32, name
      assert np.all(np.isfinite(value)), name
    np.testing.assert_allclose(outputs['pred_224'], jax.nn.sigmoid(outputs['out_224']))
  assert not jax.tree.leaves(jax.eval_shape(lambda: dropout_streams(config)))
  with pytest.raises(ValueError, match='multiples of 8'):
    model(images[:, :30], mask[:, :30])
  with pytest.raises(ValueError, match='needs inter_s8'):
    model(images, mask, None, s4)

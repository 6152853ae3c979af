"""CascadePSP's weights in and out (`--format=cascadepsp`) and its torchvision ImageNet start.

Every file is written here by torch: the official `RefinementModule`
(tests/cascadepsp_reference.py) saved as the released file is (a bare
DataParallel state_dict, keys `module.`, in a file named `model`), and a
torchvision-layout ResNet-50 (`torch_reference.ResNet` with the 7x7 stem:
torchvision's names and shapes) for the pretrained start. Every expected value
is torch's own tensor or the official module's own output.
"""

import collections
import os

import jax
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file as load_safetensors_torch

import cascadepsp_reference as ref
from cascadepsp_parity import random_batch_norms, random_official
from configs import cascadepsp, default
from pspnet_jax import checkpoint, pretrained, sharding, train_state, weights
from pspnet_jax import torch_reference
from pspnet_jax.errors import UserError
from pspnet_jax.models.cascadepsp import RefinementModule


def _refinement_config(backbone='resnet50', **model):
  """configs/cascadepsp.py with `backbone`, and no pretrained file unless `model` names one."""
  config = cascadepsp.get_config()
  config.model.backbone = backbone
  config.model.pretrained = ''
  config.model.update(model)
  return config


@pytest.fixture(scope='module')
def released(tmp_path_factory):
  """(path of an official-layout weights file named `model`, its state_dict without `module.`)."""
  state_dict = random_official(seed=0).state_dict()
  path = tmp_path_factory.mktemp('released') / 'model'
  torch.save(collections.OrderedDict(('module.' + key, value)
                                     for key, value in state_dict.items()), path)
  return str(path), state_dict


def _official(state_dict):
  module = ref.RefinementModule()
  module.load_state_dict(state_dict, strict=True)
  return module.eval()


def _official_outputs(module):
  torch.manual_seed(1)
  images, mask = torch.randn(1, 3, 32, 40), torch.tanh(torch.randn(1, 1, 32, 40))
  with torch.no_grad():
    return module(images, mask)


def test_released_file_round_trip_is_bitwise_and_loads_into_the_official_code(tmp_path,
                                                                              released):
  path, original = released
  config = _refinement_config()
  run, folder = str(tmp_path / 'run'), tmp_path / 'exported'
  weights.import_weights(config, run, path, 'cascadepsp')
  weights.export_weights(config, run, str(folder / 'model'), 'cascadepsp')
  exported = torch.load(folder / 'model', weights_only=True)
  # The official layout and order, every tensor with its dtype and bits.
  assert list(exported) == ['module.' + key for key in original]
  for key, tensor in original.items():
    assert exported['module.' + key].dtype == tensor.dtype, key
    assert torch.equal(exported['module.' + key], tensor), key
  with pytest.raises(FileExistsError, match='--overwrite'):
    weights.export_weights(config, run, str(folder / 'model'), 'cascadepsp')
  # The official Refiner loads the file (strict load_state_dict after stripping `module.`).
  refiner = ref.Refiner(device='cpu', model_folder=str(folder), download_and_check_model=False)
  expected = _official_outputs(_official(original))
  for key, value in _official_outputs(refiner.model).items():
    assert torch.equal(value, expected[key]), key
  # safetensors: the same names without `module.`, loadable strictly too.
  weights.export_weights(config, run, str(tmp_path / 'w.safetensors'), 'safetensors')
  tensors = load_safetensors_torch(tmp_path / 'w.safetensors')
  assert set(tensors) == set(original)
  _official(tensors)


def test_keys_without_module_prefix_are_read_alike(tmp_path, released):
  _, original = released
  torch.save(original, tmp_path / 'bare.pth')
  tensors, _ = weights.read_tensors(str(tmp_path / 'bare.pth'))
  abstract = nnx.eval_shape(lambda: RefinementModule(rngs=nnx.Rngs(0)))
  variables = weights.from_cascadepsp_state_dict(tensors, checkpoint.model_variables(abstract))
  state_dict = weights.to_cascadepsp_state_dict(variables)
  assert list(state_dict) == list(original)
  for key, tensor in original.items():
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(state_dict[key], tensor.numpy(), err_msg=key)


def test_the_released_name_takes_format_cascadepsp():
  assert weights.file_format('/w/model', 'cascadepsp') == 'cascadepsp'
  assert weights.file_format('/w/model.pth', 'cascadepsp') == 'cascadepsp'
  assert weights.file_format('/w/model.bin', 'cascadepsp') == 'cascadepsp'
  assert weights.file_format('/w/model', None) == 'savedmodel'  # a directory without --format
  with pytest.raises(UserError, match='does not fit'):
    weights.file_format('/w/model.onnx', 'cascadepsp')


def _one_line_error(call) -> str:
  with pytest.raises(UserError) as raised:
    call()
  message = str(raised.value)
  assert '\n' not in message, message
  return message


def test_a_file_of_the_other_model_is_refused_in_one_line(tmp_path, released):
  path, _ = released
  torch.save({'module.' + key: value
              for key, value in torch_reference.PSPNet(18, classes=2).state_dict().items()},
             tmp_path / 'pspnet.pth')
  pspnet_file, run = str(tmp_path / 'pspnet.pth'), str(tmp_path / 'run')
  segmentation = default.get_config()
  refinement = _refinement_config()

  message = _one_line_error(
      lambda: weights.import_weights(refinement, run, pspnet_file, 'cascadepsp'))
  assert 'is an official semseg PSPNet checkpoint (keys such as layer0.0.weight)' in message
  assert 'not a CascadePSP refinement module: import it with --format=semseg' in message
  message = _one_line_error(lambda: weights.import_weights(segmentation, run, path, 'semseg'))
  assert 'is a CascadePSP refinement module (keys such as feats.conv1.weight)' in message
  assert '--format=cascadepsp and configs/cascadepsp.py' in message
  # The format against the config's task, before any file is read.
  message = _one_line_error(lambda: weights.import_weights(segmentation, run, path,
                                                           'cascadepsp'))
  assert 'config is a segmentation one: use configs/cascadepsp.py' in message
  message = _one_line_error(lambda: weights.import_weights(refinement, run, pspnet_file,
                                                           'semseg'))
  assert "--format=semseg is PSPNet's" in message and 'cascadepsp, safetensors' in message
  for config, fmt in ((refinement, 'semseg'), (refinement, 'mmseg'),
                      (segmentation, 'cascadepsp')):
    _one_line_error(lambda: weights.export_weights(config, run, str(tmp_path / 'out'), fmt))
  assert checkpoint.all_steps(run) == [] and not (tmp_path / 'out').exists()


def test_torchvision_resnet50_starts_the_backbone_with_zero_mask_channels(tmp_path,
                                                                          monkeypatch):
  # torchvision's resnet50 as `torchvision:resnet50` finds it in the cache.
  monkeypatch.setenv('PSPNET_JAX_CACHE', str(tmp_path))
  torch.manual_seed(2)
  imagenet = random_batch_norms(torch_reference.ResNet(50, deep_base=False)).state_dict()
  imagenet['fc.weight'], imagenet['fc.bias'] = torch.randn(1000, 2048), torch.randn(1000)
  torch.save(imagenet, tmp_path / pretrained.KNOWN['torchvision:resnet50'].file_name)

  mesh = sharding.make_mesh(jax.devices()[:1])

  def start(config):
    state = train_state.init_train_state(config, optax.sgd(0.1), mesh)
    return weights.to_cascadepsp_state_dict(
        jax.device_get(nnx.merge_state(state.params, state.batch_stats)))

  ours = start(_refinement_config(pretrained='torchvision:resnet50'))
  random_start = start(_refinement_config())
  kernel = ours['feats.conv1.weight']
  assert kernel.shape == (64, 6, 7, 7)
  np.testing.assert_array_equal(kernel[:, :3], imagenet['conv1.weight'].numpy())
  assert not np.any(kernel[:, 3:])  # the mask channels start without influence
  for key, tensor in imagenet.items():
    if key != 'conv1.weight' and not key.startswith('fc.') and 'num_batches' not in key:
      np.testing.assert_array_equal(ours['feats.' + key], tensor.numpy(), err_msg=key)
  # The rest keeps its random initialization.
  for key, value in random_start.items():
    if not key.startswith('feats.') and 'num_batches' not in key:
      np.testing.assert_array_equal(ours[key], value, err_msg=key)


def test_other_imagenet_layouts_are_refused_for_the_refinement_module():
  abstract = nnx.eval_shape(lambda: RefinementModule(backbone='resnet18', rngs=nnx.Rngs(0)))
  for fmt in ('semseg-resnet', 'mmseg-resnet'):
    message = _one_line_error(lambda: weights.backbone_from_file(
        checkpoint.model_variables(abstract), '/nowhere/resnet.pth', fmt, deep_stem=False))
    assert 'starts from a torchvision ResNet' in message
    assert '--config.model.pretrained_format=torchvision-resnet' in message

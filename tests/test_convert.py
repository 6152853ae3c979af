"""Weight conversion: official checkpoint round trip, backbone import, and the errors that name the key."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file as load_safetensors_torch

from configs import ade20k, default
from pspnet_jax import checkpoint, weights
from pspnet_jax.models import create_model
from pspnet_jax import torch_reference as torch_pspnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_config(num_classes=21, deep_stem=True):
  config = default.get_config()
  config.data.num_classes = num_classes
  config.model.backbone = 'resnet18'
  config.model.deep_stem = deep_stem
  return config


def _official_checkpoint(model, path, epoch=7):
  """Saves `model` as semseg's train.py does: DataParallel keys, epoch, optimizer state."""
  state_dict = model.state_dict()
  for name, tensor in state_dict.items():
    if name.endswith('num_batches_tracked'):
      tensor.fill_(1234)
    else:
      tensor.copy_(torch.randn_like(tensor))
  torch.save({'epoch': epoch, 'optimizer': {'state': {}, 'param_groups': []},
              'state_dict': {'module.' + k: v for k, v in state_dict.items()}}, path)
  return state_dict


def test_semseg_import_export_round_trip_is_bitwise(tmp_path):
  config = ade20k.get_config()
  official = torch_pspnet.PSPNet(50, classes=150)
  original = _official_checkpoint(official, tmp_path / 'train_epoch_7.pth')
  weights.import_weights(config, str(tmp_path / 'run'), str(tmp_path / 'train_epoch_7.pth'),
                         'semseg')
  weights.export_weights(config, str(tmp_path / 'run'), str(tmp_path / 'out.pth'), 'semseg')
  exported = torch.load(tmp_path / 'out.pth', weights_only=True)
  assert exported['epoch'] == 7
  state_dict = {k.removeprefix('module.'): v for k, v in exported['state_dict'].items()}
  assert all(k.startswith('module.') for k in exported['state_dict'])
  assert set(state_dict) == set(original)
  for name, tensor in original.items():
    assert state_dict[name].dtype == tensor.dtype, name
    assert torch.equal(state_dict[name], tensor), name
  torch_pspnet.PSPNet(50, classes=150).load_state_dict(state_dict, strict=True)


@pytest.mark.slow
def test_cli_import_then_export_safetensors_loads_strictly(tmp_path):
  official = torch_pspnet.PSPNet(18, classes=21)
  original = _official_checkpoint(official, tmp_path / 'ckpt.pth')
  common = [sys.executable, '-m', 'pspnet_jax.convert', '--config=configs/voc2012.py',
            '--config.model.backbone=resnet18', f'--workdir={tmp_path / "run"}']
  subprocess.run(common + [f'--import_path={tmp_path / "ckpt.pth"}', '--format=semseg'],
                 cwd=REPO, check=True, capture_output=True)
  subprocess.run(common + [f'--export_path={tmp_path / "w.safetensors"}', '--format=safetensors'],
                 cwd=REPO, check=True, capture_output=True)
  exported = load_safetensors_torch(tmp_path / 'w.safetensors')
  fresh = torch_pspnet.PSPNet(18, classes=21)
  fresh.load_state_dict(exported, strict=True)
  for name, tensor in original.items():
    assert torch.equal(exported[name], tensor), name
  # A format that cannot be written fails with the list of those that can.
  result = subprocess.run(common + [f'--export_path={tmp_path / "x"}', '--format=onnx'], cwd=REPO,
                          capture_output=True, text=True)
  assert result.returncode != 0 and 'cannot be exported' in result.stderr


@pytest.mark.parametrize('fmt,deep_stem', [('semseg-resnet', True), ('torchvision-resnet', False)])
def test_backbone_import_sets_backbone_and_leaves_heads(tmp_path, fmt, deep_stem):
  resnet = torch_pspnet.ResNet(18, deep_base=deep_stem)
  state_dict = {k: torch.randn_like(v) if v.is_floating_point() else v
                for k, v in resnet.state_dict().items()}
  state_dict['fc.weight'] = torch.randn(1000, 512)  # the ImageNet classifier is ignored
  state_dict['fc.bias'] = torch.randn(1000)
  torch.save(state_dict, tmp_path / 'resnet.pth')
  config = _small_config(deep_stem=deep_stem)
  variables = checkpoint.model_variables(create_model(config, rngs=nnx.Rngs(0)))
  before = weights.to_torch_state_dict(variables)
  after = weights.to_torch_state_dict(weights.backbone_from_file(
      variables, str(tmp_path / 'resnet.pth'), fmt, deep_stem=deep_stem))
  stem = {'conv1.': 'layer0.0.', 'bn1.': 'layer0.1.', 'conv2.': 'layer0.3.', 'bn2.': 'layer0.4.',
          'conv3.': 'layer0.6.', 'bn3.': 'layer0.7.'}
  for name, tensor in state_dict.items():
    if name.startswith('fc.') or name.endswith('num_batches_tracked'):
      continue
    prefix = name.split('.')[0] + '.'
    ours = stem[prefix] + name[len(prefix):] if prefix in stem else name
    np.testing.assert_array_equal(after[ours], tensor.numpy(), err_msg=name)
  for name in after:
    if name.startswith(('ppm.', 'cls.', 'aux.')):
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_backbone_with_the_other_stem_is_refused(tmp_path):
  torch.save(torch_pspnet.ResNet(18, deep_base=False).state_dict(), tmp_path / 'tv.pth')
  with pytest.raises(ValueError, match='deep_stem'):
    weights.import_weights(_small_config(deep_stem=True), str(tmp_path / 'run'),
                           str(tmp_path / 'tv.pth'), 'torchvision-resnet')
  model = create_model(_small_config(deep_stem=True), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'conv2\.weight .*missing'):
    weights.backbone_from_file(checkpoint.model_variables(model), str(tmp_path / 'tv.pth'),
                               'semseg-resnet', deep_stem=True)


def _import_error(tmp_path, state_dict, config=None):
  torch.save(state_dict, tmp_path / 'bad.pth')
  with pytest.raises(ValueError) as error:
    weights.import_weights(config or _small_config(), str(tmp_path / 'run'),
                           str(tmp_path / 'bad.pth'), 'semseg')
  assert checkpoint.all_steps(str(tmp_path / 'run')) == []  # nothing half-written
  return str(error.value)


def test_missing_unexpected_misshapen_and_nan_tensors_are_named(tmp_path):
  good = torch_pspnet.PSPNet(18, classes=21).state_dict()
  missing = dict(good)
  del missing['layer2.1.bn1.running_var']
  assert 'layer2.1.bn1.running_var' in _import_error(tmp_path, missing)
  extra = dict(good, **{'head.weight': torch.zeros(3)})
  assert 'head.weight: unexpected' in _import_error(tmp_path, extra)
  other_classes = torch_pspnet.PSPNet(18, classes=150).state_dict()
  message = _import_error(tmp_path, other_classes)
  assert 'cls.4.weight: shape (150, 512, 1, 1), the model needs (21, 512, 1, 1)' in message
  with_nan = dict(good)
  with_nan['layer1.0.conv1.weight'] = torch.full_like(good['layer1.0.conv1.weight'], float('nan'))
  assert 'layer1.0.conv1.weight: holds NaN' in _import_error(tmp_path, with_nan)


def test_corrupt_file_and_missing_torch_are_explained(tmp_path, monkeypatch):
  corrupt = tmp_path / 'corrupt.pth'
  corrupt.write_bytes(b'\x80\x02 not a checkpoint')
  with pytest.raises(ValueError, match='corrupt.pth is not a readable PyTorch checkpoint'):
    weights.read_tensors(str(corrupt))
  (tmp_path / 'bad.safetensors').write_bytes(b'garbage')
  with pytest.raises(ValueError, match='bad.safetensors is not a readable safetensors'):
    weights.read_tensors(str(tmp_path / 'bad.safetensors'))
  with pytest.raises(FileNotFoundError, match='no weights file'):
    weights.read_tensors(str(tmp_path / 'absent.pth'))
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ImportError, match='pip install torch'):
    weights.read_tensors(str(corrupt))


def test_import_refuses_a_workdir_with_checkpoints(tmp_path):
  torch.save(torch_pspnet.PSPNet(18, classes=21).state_dict(), tmp_path / 'w.pth')
  weights.import_weights(_small_config(), str(tmp_path / 'run'), str(tmp_path / 'w.pth'), 'semseg')
  with pytest.raises(FileExistsError, match='already has checkpoints'):
    weights.import_weights(_small_config(), str(tmp_path / 'run'), str(tmp_path / 'w.pth'),
                           'semseg')


def test_checkpoint_of_another_model_names_the_parameter(tmp_path):
  model = create_model(_small_config(num_classes=21), rngs=nnx.Rngs(0))
  checkpoint.save_model(str(tmp_path), 3, checkpoint.model_variables(model), {})
  other = nnx.eval_shape(lambda: create_model(_small_config(num_classes=19), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r'cls\.classifier\.kernel: checkpoint has shape '
                                       r'\(1, 1, 512, 21\), the config builds \(1, 1, 512, 19\)'):
    checkpoint.restore_model(str(tmp_path), checkpoint.model_variables(other))
  with pytest.raises(FileNotFoundError, match='no checkpoint for step 5'):
    checkpoint.restore_model(str(tmp_path), checkpoint.model_variables(other), step=5)

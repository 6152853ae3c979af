"""Weight conversion: official checkpoint round trip, backbone import, and the errors that name the key.

Also the faults: unreadable files, dtypes other than float32, and exports that
must never leave half a file or replace one unasked. Every file is written by
torch or safetensors directly, and every expected value is torch's own
(`tensor.float()`), never one the conversion produced.
"""

import contextlib
import logging
import os
import re
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_torch
from safetensors.torch import save_file as save_safetensors_torch

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
  export = common + [f'--export_path={tmp_path / "w.safetensors"}', '--format=safetensors']
  subprocess.run(export, cwd=REPO, check=True, capture_output=True)
  # A second export does not replace the first without --overwrite.
  result = subprocess.run(export, cwd=REPO, capture_output=True, text=True)
  assert result.returncode != 0
  assert f'{tmp_path / "w.safetensors"} already exists; give --overwrite' in result.stderr
  subprocess.run(export + ['--overwrite'], cwd=REPO, check=True, capture_output=True)
  assert sorted(os.listdir(tmp_path)) == ['ckpt.pth', 'run', 'w.safetensors']  # no temporaries
  exported = load_safetensors_torch(tmp_path / 'w.safetensors')
  fresh = torch_pspnet.PSPNet(18, classes=21)
  fresh.load_state_dict(exported, strict=True)
  for name, tensor in original.items():
    assert torch.equal(exported[name], tensor), name
  # A format that cannot be written fails with the list of those that can.
  result = subprocess.run(common + [f'--export_path={tmp_path / "x"}', '--format=torchscript'],
                          cwd=REPO, capture_output=True, text=True)
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


def _save(state_dict, path):
  if str(path).endswith('.safetensors'):
    save_safetensors_torch(state_dict, str(path))
  else:
    torch.save(state_dict, path)


def _import_error(tmp_path, state_dict, config=None, name='bad.pth'):
  _save(state_dict, tmp_path / name)
  with pytest.raises(ValueError) as error:
    weights.import_weights(config or _small_config(), str(tmp_path / 'run'),
                           str(tmp_path / name), 'semseg')
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
  with pytest.raises(ImportError, match='pip install -r requirements-torch.txt'):
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


def _abstract_variables():
  return checkpoint.model_variables(
      nnx.eval_shape(lambda: create_model(_small_config(), rngs=nnx.Rngs(0))))


def _random_state_dict():
  """PSPNet18's state_dict with random floats; num_batches_tracked stays int64."""
  return {name: torch.randn_like(tensor) if tensor.is_floating_point() else tensor
          for name, tensor in torch_pspnet.PSPNet(18, classes=21).state_dict().items()}


def _cut(path, keep):
  data = path.read_bytes()
  path.write_bytes(data[:keep(len(data))])


def _empty(tmp_path, ext):
  path = tmp_path / f'w.{ext}'
  path.write_bytes(b'')
  return path, 'the file is empty'


def _truncated_zip(tmp_path, ext):
  path = tmp_path / f'w.{ext}'
  torch.save({'a': torch.zeros(1000)}, path)
  _cut(path, lambda size: size // 2)  # an interrupted download
  return path, 'truncated'


def _text(tmp_path, ext):
  path = tmp_path / f'w.{ext}'
  path.write_text('<html>404 Not Found</html>')  # a failed download saved as the file
  return path, 'not a PyTorch file'


def _safetensors_named_pth(tmp_path, ext):
  path = tmp_path / f'w.{ext}'
  save_safetensors_torch({'a': torch.zeros(10)}, str(path))
  return path, 'not a PyTorch file'


def _truncated_safetensors(tmp_path, ext):
  path = tmp_path / f'w.{ext}'
  save_safetensors_torch({'a': torch.zeros(1000)}, str(path))
  _cut(path, lambda size: size - 100)
  return path, ''  # safetensors' own reason


@pytest.mark.parametrize('make,ext', [
    (_empty, 'pth'), (_empty, 'safetensors'), (_truncated_zip, 'pth'), (_text, 'pth'),
    (_safetensors_named_pth, 'pth'), (_truncated_safetensors, 'safetensors')])
def test_unreadable_file_is_named_with_its_size_and_a_reason(tmp_path, make, ext):
  path, reason = make(tmp_path, ext)
  with pytest.raises(ValueError) as error:
    weights.read_tensors(str(path))
  size = os.path.getsize(path)
  match = re.fullmatch(rf'{re.escape(str(path))} is not a readable [\w ]+ \({size} bytes\): (.+)',
                       str(error.value), re.DOTALL)
  assert match, str(error.value)
  assert match.group(1).strip() and reason in match.group(1)


def test_empty_file_fails_the_import_and_the_pretrained_backbone_alike(tmp_path):
  (tmp_path / 'empty.pth').write_bytes(b'')
  with pytest.raises(ValueError, match=r'empty\.pth is not a readable PyTorch checkpoint '
                                       r'\(0 bytes\): the file is empty'):
    weights.import_weights(_small_config(), str(tmp_path / 'run'), str(tmp_path / 'empty.pth'),
                           'semseg')
  assert checkpoint.all_steps(str(tmp_path / 'run')) == []
  # config.model.pretrained goes through backbone_from_file.
  with pytest.raises(ValueError, match=r'empty\.pth .*: the file is empty'):
    weights.backbone_from_file(_abstract_variables(), str(tmp_path / 'empty.pth'),
                               'semseg-resnet', deep_stem=True)


@pytest.mark.parametrize('ext,dtype', [('pth', 'float16'), ('pth', 'bfloat16'),
                                       ('safetensors', 'bfloat16'), ('safetensors', 'float16'),
                                       ('pth', 'float32')])
def test_other_float_dtypes_are_converted_with_a_warning(tmp_path, caplog, ext, dtype):
  state_dict = {name: tensor.to(getattr(torch, dtype)) if tensor.is_floating_point() else tensor
                for name, tensor in _random_state_dict().items()}
  # A second dtype in the same file, counted apart.
  state_dict['cls.4.weight'] = state_dict['cls.4.weight'].double()
  _save(state_dict, tmp_path / f'w.{ext}')
  tensors, _ = weights.read_tensors(str(tmp_path / f'w.{ext}'))
  with caplog.at_level(logging.WARNING):
    variables = weights.from_torch_state_dict(tensors, _abstract_variables(), source='w')
  ours = weights.to_torch_state_dict(variables)
  for name, tensor in state_dict.items():
    if tensor.is_floating_point():
      assert ours[name].dtype == np.float32, name
      np.testing.assert_array_equal(ours[name], tensor.float().numpy(), err_msg=name)
  warnings = [record.getMessage() for record in caplog.records
              if record.levelno == logging.WARNING and 'to float32' in record.getMessage()]
  assert len(warnings) == 1, caplog.text
  floats = sum(tensor.is_floating_point() for tensor in state_dict.values())
  expected = {dtype: floats - 1, 'float64': 1}
  expected.pop('float32', None)
  for name, count in expected.items():
    assert f'{count} {name}' in warnings[0], warnings[0]
  assert f'of {floats} tensors' in warnings[0], warnings[0]


def test_no_warning_for_a_float32_file(tmp_path, caplog):
  _save(_random_state_dict(), tmp_path / 'w.pth')
  tensors, _ = weights.read_tensors(str(tmp_path / 'w.pth'))
  with caplog.at_level(logging.WARNING):
    weights.from_torch_state_dict(tensors, _abstract_variables())
  assert 'converted to float32' not in caplog.text


def test_float64_beyond_float32_range_is_refused(tmp_path):
  state_dict = _random_state_dict()
  state_dict['layer1.0.bn1.running_var'] = torch.full_like(
      state_dict['layer1.0.bn1.running_var'], 1e300, dtype=torch.float64)
  _save(state_dict, tmp_path / 'w.pth')
  with pytest.raises(ValueError, match=r'layer1\.0\.bn1\.running_var: holds NaN or infinite '
                                       r'values as float32 \(from float64\)'):
    weights.from_torch_state_dict(weights.read_tensors(str(tmp_path / 'w.pth'))[0],
                                  _abstract_variables())


@pytest.mark.parametrize('ext', ['pth', 'safetensors'])
def test_integer_or_bool_where_a_float_belongs_is_refused_by_name(tmp_path, ext):
  state_dict = _random_state_dict()
  state_dict['layer1.0.conv1.weight'] = torch.randint(
      -3, 3, state_dict['layer1.0.conv1.weight'].shape)
  state_dict['layer2.0.bn1.running_mean'] = torch.ones_like(
      state_dict['layer2.0.bn1.running_mean'], dtype=torch.bool)
  message = _import_error(tmp_path, state_dict, name=f'w.{ext}')
  assert 'layer1.0.conv1.weight: dtype int64, the model needs a floating-point tensor' in message
  assert 'layer2.0.bn1.running_mean: dtype bool, the model needs a floating-point' in message
  assert 'num_batches_tracked' not in message  # the int64 buffers are expected


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  model = create_model(_small_config(), rngs=nnx.Rngs(0))
  checkpoint.save_model(workdir, 5, checkpoint.model_variables(model), {})
  return workdir


def _load_exported(path, fmt):
  if fmt == 'safetensors':
    return load_safetensors_torch(str(path))
  return {key.removeprefix('module.'): value
          for key, value in torch.load(path, weights_only=True)['state_dict'].items()}


# mmseg needs the mmseg architecture (test_mmseg_weights: the same refusal, and the export).
@pytest.mark.parametrize('fmt', [fmt for fmt in weights.EXPORT_FORMATS if fmt != 'mmseg'])
def test_export_refuses_an_existing_file_unless_overwrite(tmp_path, trained_workdir, fmt):
  path = tmp_path / 'out' / 'model.weights'
  path.parent.mkdir()
  path.write_bytes(b'precious')
  with pytest.raises(FileExistsError) as error:
    weights.export_weights(_small_config(), trained_workdir, str(path), fmt)
  assert str(path) in str(error.value) and '--overwrite' in str(error.value)
  assert path.read_bytes() == b'precious'
  assert weights.export_weights(_small_config(), trained_workdir, str(path), fmt,
                                overwrite=True) == 5
  torch_pspnet.PSPNet(18, classes=21).load_state_dict(_load_exported(path, fmt), strict=True)
  assert os.listdir(path.parent) == ['model.weights']  # no temporary file left


@contextlib.contextmanager
def _ctrl_c_before_the_rename(monkeypatch, path, old):
  """Ctrl-C at the fsync of the finished file: it exists, but only under a name of its own in
  the same directory, while `path` still holds the old file."""
  seen = []

  def fsync(fd):
    seen.append((os.readlink(f'/proc/self/fd/{fd}'), path.read_bytes() if path.exists() else None))
    raise KeyboardInterrupt
  with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
    patch.setattr(os, 'fsync', fsync)
    yield
  [(written, final)] = seen
  assert os.path.dirname(written) == str(path.parent) and written != str(path)
  assert final == old


@contextlib.contextmanager
def _disk_full_mid_write(monkeypatch, path, old):
  """A file-size limit of 1 MiB: the writer fails with EFBIG part way through its 8 MB."""
  del monkeypatch, path, old
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
  resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, limits[1]))
  try:
    with pytest.raises((OSError, RuntimeError, SafetensorError)):
      yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize('fmt', weights.EXPORT_FORMATS)
@pytest.mark.parametrize('existing', [None, b'old weights'])
@pytest.mark.parametrize('interrupt', [_ctrl_c_before_the_rename, _disk_full_mid_write])
def test_interrupted_export_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, fmt,
                                                                 existing, interrupt):
  path = tmp_path / 'model.weights'
  if existing is not None:
    path.write_bytes(existing)
  state_dict = {'big': np.ones((2, 1024, 1024), np.float32)}  # 8 MB
  with interrupt(monkeypatch, path, existing):
    weights.write_tensors(state_dict, str(path), fmt, epoch=1, overwrite=True)
  assert os.listdir(tmp_path) == ([] if existing is None else ['model.weights'])
  if existing is not None:
    assert path.read_bytes() == existing
  # And uninterrupted, the same call writes a file torch reads back.
  weights.write_tensors(state_dict, str(path), fmt, epoch=1, overwrite=True)
  assert os.listdir(tmp_path) == ['model.weights']
  np.testing.assert_array_equal(_load_exported(path, fmt)['big'].numpy(), state_dict['big'])

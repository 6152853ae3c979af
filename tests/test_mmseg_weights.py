"""mmsegmentation checkpoints in and out (`--format=mmseg`) and ResNetV1c ImageNet weights
(`model.pretrained_format='mmseg-resnet'`).

Every file is written here by torch from the PyTorch twin with mmseg's switches
(`torch_reference.PSPNet` with `MMSEG_ARCHITECTURE`), its keys renamed by the
regex table of mmseg-pspnet.md ("Key mapping"), transcribed below independently
of weights.py's name tables; every expected value is the twin's own (its
logits, its tensors, its key order moved as that page says), never one the
conversion produced. No mmseg install is needed: mmengine's HistoryBuffer is a
stand-in class registered under its module name while the file is written.
"""

import collections
import contextlib
import copy
import json
import os
import pickle
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from configs import default
from pspnet_jax import checkpoint, configuration, sharding, train_state, optim, weights
from pspnet_jax import torch_reference
from pspnet_jax.data import meta as data_meta
from pspnet_jax.models import create_model
from parity import (MMSEG_ARCHITECTURE, forward, max_relative_diff, nchw, nhwc,
                    randomize_batch_norms)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# mmseg's R18 configs (pspnet_r18-d8): decode head 128 channels, aux head 64.
_HEADS = {18: dict(head_channels=128, aux_channels=64), 50: {}}


def _to_semseg(k: str) -> str:
  """mmseg-pspnet.md's regex map, mmseg key -> semseg key, as written there."""
  k = re.sub(r"^backbone\.stem\.", "layer0.", k); k = re.sub(r"^backbone\.", "", k)
  k = re.sub(r"^decode_head\.psp_modules\.(\d)\.1\.conv\.", r"ppm.features.\1.1.", k)
  k = re.sub(r"^decode_head\.psp_modules\.(\d)\.1\.bn\.", r"ppm.features.\1.2.", k)
  k = re.sub(r"^decode_head\.bottleneck\.conv\.", "cls.0.", k)
  k = re.sub(r"^decode_head\.bottleneck\.bn\.", "cls.1.", k)
  k = re.sub(r"^decode_head\.conv_seg\.", "cls.4.", k)
  k = re.sub(r"^auxiliary_head\.convs\.0\.conv\.", "aux.0.", k)
  k = re.sub(r"^auxiliary_head\.convs\.0\.bn\.", "aux.1.", k)
  k = re.sub(r"^auxiliary_head\.conv_seg\.", "aux.4.", k)
  return k


# The same table the other way (semseg -> mmseg), checked against the one above.
_TO_MMSEG = [(r'^layer0\.', 'backbone.stem.'), (r'^(layer[1-4])\.', r'backbone.\1.'),
             (r'^ppm\.features\.(\d)\.1\.', r'decode_head.psp_modules.\1.1.conv.'),
             (r'^ppm\.features\.(\d)\.2\.', r'decode_head.psp_modules.\1.1.bn.'),
             (r'^cls\.0\.', 'decode_head.bottleneck.conv.'),
             (r'^cls\.1\.', 'decode_head.bottleneck.bn.'), (r'^cls\.4\.', 'decode_head.conv_seg.'),
             (r'^aux\.0\.', 'auxiliary_head.convs.0.conv.'),
             (r'^aux\.1\.', 'auxiliary_head.convs.0.bn.'),
             (r'^aux\.4\.', 'auxiliary_head.conv_seg.')]


def _to_mmseg(key: str) -> str:
  renamed = key
  for pattern, replacement in _TO_MMSEG:
    renamed = re.sub(pattern, replacement, renamed)
  assert _to_semseg(renamed) == key and renamed != key, key
  return renamed


def _mmseg_state_dict(twin) -> collections.OrderedDict:
  """The twin's state_dict as mmseg's PSPNet holds it: renamed, and in mmseg's order, which is
  the twin's module order with each head's conv_seg moved first (mmseg-pspnet.md)."""
  renamed = [(_to_mmseg(key), tensor) for key, tensor in twin.state_dict().items()]
  sections = ('backbone.', 'decode_head.', 'auxiliary_head.')
  position = lambda key: ([key.startswith(s) for s in sections].index(True),
                          '.conv_seg.' not in key)
  return collections.OrderedDict(sorted(renamed, key=lambda item: position(item[0])))


def _twin(depth, classes, seed=0):
  """The mmseg-architecture twin, eval mode, with random weights, randomized BatchNorm statistics
  and affine parameters (as `parity.make_twins`, without its Flax model) and a distinct
  num_batches_tracked per BatchNorm."""
  torch.manual_seed(seed)
  twin = torch_reference.PSPNet(depth, classes=classes, **MMSEG_ARCHITECTURE, **_HEADS[depth])
  for i, bn in enumerate(randomize_batch_norms(twin, calibration_size=65)):
    bn.num_batches_tracked.fill_(1000 + 7 * i)
  return twin


@pytest.fixture(scope='module')
def twin18():
  """The 21-class mmseg PSPNet-18 twin the tests share (copy it to change it)."""
  return _twin(18, 21, seed=1)


def _mmseg_config(depth=18, classes=21, **model):
  config = default.get_config()
  config.data.num_classes = classes
  config.model.backbone = f'resnet{depth}'
  config.model.update({**MMSEG_ARCHITECTURE, **_HEADS[depth], **model})
  return config


def _semseg_config(depth=18, classes=21):
  config = default.get_config()
  config.data.num_classes = classes
  config.model.backbone = f'resnet{depth}'
  return config


def _meta(classes):
  """A model-zoo meta (mmseg 1.x): plain data, classes as a tuple as mmseg keeps them."""
  return {'mmseg_version': '1.2.2', 'epoch': 0, 'iter': 160000, 'seed': 0,
          'config': "model = dict(type='EncoderDecoder', backbone=dict(type='ResNetV1c'))",
          'dataset_meta': {'classes': tuple(f'class{i}' for i in range(classes)),
                           'palette': [[i, 2 * i % 256, 255 - i] for i in range(classes)],
                           'reduce_zero_label': True}}


def _logits(twin, images):
  with torch.no_grad():
    return nhwc(twin(nchw(images)))


def _load_on_one_device(config, workdir):
  """The workdir's model on one CPU device (the 8 fake devices would compute it 8 times)."""
  return checkpoint.load_model(config, workdir, mesh=sharding.make_mesh(jax.devices()[:1])).model


def _check_exported(path, expected: collections.OrderedDict, expected_meta):
  """The export at `path` is mmseg's layout: meta + state_dict, keys and order exactly
  `expected`'s, every tensor bitwise (float32, num_batches_tracked int64), torch-safe."""
  exported = torch.load(path, map_location='cpu', weights_only=True)
  assert sorted(exported) == ['meta', 'state_dict']
  state_dict = exported['state_dict']
  assert list(state_dict) == list(expected)  # the same keys in mmseg's order, no `module.`
  for key, tensor in expected.items():
    assert state_dict[key].dtype == (torch.int64 if key.endswith('num_batches_tracked')
                                     else torch.float32), key
    assert torch.equal(state_dict[key], tensor), key
  assert exported['meta'] == expected_meta
  return state_dict


@pytest.mark.parametrize('depth,classes', [(18, 21), (50, 150)])
def test_model_zoo_checkpoint_matches_the_twin_and_exports_back_bitwise(tmp_path, request,
                                                                         depth, classes):
  twin = request.getfixturevalue('twin18') if depth == 18 else _twin(depth, classes)
  original = _mmseg_state_dict(twin)
  assert sum(k.endswith('num_batches_tracked') for k in original) == (61 if depth == 50 else 28)
  torch.save({'meta': _meta(classes), 'state_dict': original}, tmp_path / 'zoo.pth')
  config = _mmseg_config(depth, classes)
  workdir = str(tmp_path / 'run')
  weights.import_weights(config, workdir, str(tmp_path / 'zoo.pth'), 'mmseg')

  # Any input size (mmseg resizes to the input), not 8k+1.
  images = np.random.default_rng(0).normal(size=(1, 67, 90, 3)).astype(np.float32)
  expected = _logits(twin, images)
  actual = np.asarray(forward(_load_on_one_device(config, workdir), images))
  assert actual.shape == expected.shape == (1, 67, 90, classes)
  assert max_relative_diff(actual, expected) <= 1e-4

  weights.export_weights(config, workdir, str(tmp_path / 'out.pth'), 'mmseg')
  # Plain data survives JSON as lists: the model-zoo meta comes back with its tuple a list.
  state_dict = _check_exported(tmp_path / 'out.pth', original,
                               json.loads(json.dumps(_meta(classes))))
  # mmseg's load_checkpoint(strict=True) needs exactly its PSPNet's keys: a fresh twin (through
  # the page's map) loads them strictly and computes the very same logits.
  fresh = torch_reference.PSPNet(depth, classes=classes, **MMSEG_ARCHITECTURE, **_HEADS[depth])
  fresh.load_state_dict({_to_semseg(k): v for k, v in state_dict.items()}, strict=True)
  fresh.eval()
  np.testing.assert_array_equal(_logits(fresh, images), expected)


def test_bare_state_dict_imports_and_exports_with_our_meta(tmp_path, twin18):
  # A state_dict without meta, as a model trained here: the export's meta is ours, with the
  # config dataset's class names and palette (which mmseg's init_model gives the model).
  original = _mmseg_state_dict(twin18)
  torch.save(original, tmp_path / 'bare.pth')
  config = _mmseg_config(classes=21)
  config.data.name = 'voc2012'
  weights.import_weights(config, str(tmp_path / 'run'), str(tmp_path / 'bare.pth'), 'mmseg')
  path = tmp_path / 'pspnet.pth'
  path.write_bytes(b'precious')
  with pytest.raises(FileExistsError, match='--overwrite'):
    weights.export_weights(config, str(tmp_path / 'run'), str(path), 'mmseg')
  assert path.read_bytes() == b'precious'
  assert weights.export_weights(config, str(tmp_path / 'run'), str(path), 'mmseg',
                                overwrite=True) == 0
  _check_exported(path, original, {
      'exported_by': 'pspnet_jax', 'step': 0, 'source': str(tmp_path / 'bare.pth'),
      'dataset_meta': {'classes': list(data_meta.class_names('voc2012')),
                       'palette': data_meta.palette('voc2012').tolist()}})


@contextlib.contextmanager
def _fake_mmengine():
  """mmengine.logging.history_buffer.HistoryBuffer as a stand-in class (the real one keeps
  numpy arrays of logged values), importable by pickle while the context lasts."""
  module = types.ModuleType('mmengine.logging.history_buffer')

  class HistoryBuffer:

    def __init__(self, log_history=(), count_history=(), max_length=1000000):
      self._log_history = np.asarray(log_history)
      self._count_history = np.asarray(count_history)
      self.max_length = max_length
      # As the real one's: pickle writes these as getattr(HistoryBuffer, 'min').
      self._statistics_methods = {'min': HistoryBuffer.min, 'mean': HistoryBuffer.mean}

    def min(self):
      return self._log_history.min()

    def mean(self):
      return self._log_history.mean()

  HistoryBuffer.__module__, HistoryBuffer.__qualname__ = module.__name__, 'HistoryBuffer'
  for method in (HistoryBuffer.min, HistoryBuffer.mean):
    method.__module__, method.__qualname__ = module.__name__, f'HistoryBuffer.{method.__name__}'
  module.HistoryBuffer = HistoryBuffer
  names = ('mmengine', 'mmengine.logging', module.__name__)
  saved = {name: sys.modules.get(name) for name in names}
  sys.modules.update({'mmengine': types.ModuleType('mmengine'),
                      'mmengine.logging': types.ModuleType('mmengine.logging'),
                      module.__name__: module})
  try:
    yield module
  finally:
    for name, value in saved.items():
      if value is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = value


def _training_checkpoint(twin, path, **extra):
  """A checkpoint as mmengine's Runner.save_checkpoint writes it during mmseg training: meta,
  state_dict, message_hub (HistoryBuffers, numpy scalars), optimizer and param_schedulers."""
  original = _mmseg_state_dict(twin)
  sgd = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)
  twin.train()
  twin(torch.randn(2, 3, 33, 33)).sum().backward()
  sgd.step()
  twin.eval()
  meta = {**_meta(21), 'cfg': 'norm_cfg = dict(type=\'SyncBN\')', 'mmengine_version': '0.10.7',
          'hook_msgs': {'best_score': np.float64(0.4189)}}  # a numpy scalar: not plain data
  with _fake_mmengine() as mmengine:
    buffer = mmengine.HistoryBuffer([2.1, 1.7], [1, 1])
    torch.save({
        'meta': meta, 'state_dict': original,
        'message_hub': {'log_scalars': {'train/loss': buffer},
                        'runtime_info': {'iter': 160000, 'best_mIoU': np.float32(41.89)},
                        'resumed_keys': {'iter': True}},
        'optimizer': sgd.state_dict(),
        'param_schedulers': [{'eta_min': 1e-4, 'power': 0.9, 'end': 160000, 'by_epoch': False}],
        **extra}, path)
  return original, {key: value for key, value in meta.items() if key != 'hook_msgs'}


def test_training_checkpoint_imports(tmp_path, twin18):
  original, plain_meta = _training_checkpoint(copy.deepcopy(twin18), tmp_path / 'iter_80.pth')
  # torch's weights-only unpickler alone refuses it (numpy, HistoryBuffer).
  with pytest.raises(pickle.UnpicklingError, match='Unsupported global'):
    torch.load(tmp_path / 'iter_80.pth', weights_only=True)
  assert 'mmengine' not in sys.modules
  weights.import_weights(_mmseg_config(), str(tmp_path / 'run'), str(tmp_path / 'iter_80.pth'),
                         'mmseg')
  assert 'mmengine' not in sys.modules  # read without it, and without importing it
  weights.export_weights(_mmseg_config(), str(tmp_path / 'run'), str(tmp_path / 'out.pth'),
                         'mmseg')
  # The meta's numpy scalar is left out, the rest kept.
  _check_exported(tmp_path / 'out.pth', original, json.loads(json.dumps(plain_meta)))


@pytest.mark.slow
def test_training_checkpoint_imports_through_the_cli(tmp_path, twin18):
  original, _ = _training_checkpoint(copy.deepcopy(twin18), tmp_path / 'iter_80.pth')
  switches = [f'--config.model.{key}={value}'.replace(' ', '') for key, value in
              {**MMSEG_ARCHITECTURE, **_HEADS[18]}.items()]
  command = [sys.executable, '-m', 'pspnet_jax.convert', '--config=configs/default.py',
             '--config.model.backbone=resnet18', '--config.data.num_classes=21', *switches,
             f'--workdir={tmp_path / "run"}']
  result = subprocess.run(command + [f'--import_path={tmp_path / "iter_80.pth"}',
                                     '--format=mmseg'],
                          cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  weights.export_weights(_mmseg_config(), str(tmp_path / 'run'), str(tmp_path / 'out.pth'),
                         'mmseg')
  exported = torch.load(tmp_path / 'out.pth', weights_only=True)['state_dict']
  assert list(exported) == list(original)
  assert all(torch.equal(exported[key], tensor) for key, tensor in original.items())
  # The usage error lists mmseg among the formats.
  result = subprocess.run(command + [f'--import_path={tmp_path / "iter_80.pth"}',
                                     '--format=mmsegmentation'],
                          cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode != 0 and "'mmseg'" in result.stderr, result.stderr[-3000:]


def _marker_payload(marker):
  class Payload:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))
  return Payload()


@pytest.mark.parametrize('where', ['meta', 'message_hub'])
def test_a_file_that_would_run_code_is_refused(tmp_path, twin18, where):
  marker = tmp_path / 'ran'
  twin = copy.deepcopy(twin18)
  payload = {where: {'x': _marker_payload(marker)}} if where == 'meta' else {}
  path = tmp_path / 'evil.pth'
  if where == 'message_hub':  # beside the bookkeeping that is accepted
    _training_checkpoint(twin, path, evil=_marker_payload(marker))
  else:
    torch.save({'state_dict': _mmseg_state_dict(twin), **payload}, path)
  with pytest.raises(ValueError, match=r'evil\.pth is not a readable PyTorch checkpoint .*'
                                       r'it would import and call posix\.system'):
    weights.import_weights(_mmseg_config(), str(tmp_path / 'run'), str(path), 'mmseg')
  assert not marker.exists()
  assert checkpoint.all_steps(str(tmp_path / 'run')) == []


def test_a_bookkeeping_global_is_a_stand_in_and_never_runs(tmp_path, twin18):
  # A function under mmengine's name that would leave a marker: unpickled as an inert stand-in,
  # even while its module is importable, and the weights import.
  marker = tmp_path / 'ran'
  with _fake_mmengine() as mmengine:
    def touch(path):
      open(path, 'w').close()
    touch.__module__, touch.__qualname__ = mmengine.__name__, 'touch'
    mmengine.touch = touch

    class Trap:
      def __reduce__(self):
        return (touch, (str(marker),))
    torch.save({'state_dict': _mmseg_state_dict(twin18), 'message_hub': Trap()},
               tmp_path / 'trap.pth')
    tensors, _ = weights.read_tensors(str(tmp_path / 'trap.pth'))
  assert not marker.exists()
  assert set(tensors) == set(_mmseg_state_dict(twin18))


def test_wrong_architecture_or_format_says_what_to_do(tmp_path, twin18):
  torch.save({'meta': _meta(21), 'state_dict': _mmseg_state_dict(twin18)}, tmp_path / 'mm.pth')
  semseg_twin = torch_reference.PSPNet(18, classes=21)
  torch.save({'epoch': 3, 'state_dict': {'module.' + k: v for k, v in
                                         semseg_twin.state_dict().items()}}, tmp_path / 'ss.pth')
  run = str(tmp_path / 'run')

  def error(config, name, fmt):
    with pytest.raises(ValueError) as raised:
      weights.import_weights(config, run, str(tmp_path / name), fmt)
    assert checkpoint.all_steps(run) == []
    return str(raised.value)

  message = error(_semseg_config(), 'mm.pth', 'mmseg')
  assert 'use the config variant arch=mmseg' in message
  assert 'model.stem_widths=(64, 64, 128)' in message  # the config's
  assert 'model.stem_widths=(32, 32, 64)' in message  # what arch=mmseg sets
  assert 'model.contract_dilation=False' in message
  assert '--format=mmseg' in error(_semseg_config(), 'mm.pth', 'semseg')
  assert '--format=semseg' in error(_mmseg_config(), 'ss.pth', 'mmseg')
  # With the architecture right, a tensor that does not fit is named by its mmseg key.
  assert ('decode_head.conv_seg.weight: shape (21, 128, 1, 1), the model needs '
          '(19, 128, 1, 1)') in error(_mmseg_config(classes=19), 'mm.pth', 'mmseg')
  assert ('decode_head.bottleneck.conv.weight: shape (128, 1024, 3, 3), the model needs '
          '(512, 1024, 3, 3)') in error(_mmseg_config(head_channels=512), 'mm.pth', 'mmseg')
  # An export with mmseg keys of a model that is not mmseg's PSPNet is refused before any read.
  with pytest.raises(ValueError, match='use the config variant arch=mmseg'):
    weights.export_weights(_semseg_config(), str(tmp_path / 'nothing'), str(tmp_path / 'o.pth'),
                           'mmseg')
  assert not (tmp_path / 'o.pth').exists()


def _resnet_v1c_file(twin, path, container):
  """open-mmlab://resnet18_v1c's layout from the twin's backbone: stem.N, layerN, fc."""
  tensors = collections.OrderedDict(
      (re.sub(r'^layer0\.', 'stem.', key), tensor) for key, tensor in twin.state_dict().items()
      if key.startswith(('layer0.', 'layer1.', 'layer2.', 'layer3.', 'layer4.')))
  tensors['fc.weight'], tensors['fc.bias'] = torch.randn(1000, 512), torch.randn(1000)
  if container == 'backbone.':
    tensors = {'backbone.' + key: tensor for key, tensor in tensors.items()}
  torch.save(tensors if container == 'bare' else {'meta': {}, 'state_dict': tensors}, path)
  return {key: tensor for key, tensor in twin.state_dict().items()
          if key.startswith('layer') and not key.endswith('num_batches_tracked')}


@pytest.mark.parametrize('container', ['bare', 'state_dict', 'backbone.'])
def test_mmseg_resnet_backbone_fills_layer0_to_layer4(tmp_path, twin18, container):
  expected = _resnet_v1c_file(twin18, tmp_path / 'resnet18_v1c.pth', container)
  config = _mmseg_config(pretrained=str(tmp_path / 'resnet18_v1c.pth'),
                         pretrained_format='mmseg-resnet')
  configuration.validate(config)
  # Heads of zeros stand for the random initialization they keep.
  zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), checkpoint.model_variables(
      nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0)))))
  ours = weights.to_torch_state_dict(weights.backbone_from_file(
      zeros, config.model.pretrained, 'mmseg-resnet', deep_stem=True,
      stem_widths=config.model.stem_widths))
  assert {k for k in ours if k.startswith('layer') and not k.endswith('num_batches_tracked')
          } == set(expected)
  for key, tensor in expected.items():
    np.testing.assert_array_equal(ours[key], tensor.numpy(), err_msg=key)
  for key, value in ours.items():
    if not key.startswith('layer'):
      assert not np.any(value), key


def test_a_fresh_run_checks_the_pretrained_stem_widths(tmp_path, monkeypatch):
  # train_state hands the config's stem widths on: an mmseg-architecture run refuses semseg's
  # ImageNet ResNet (the model itself is not built: its initialization is stubbed out).
  torch.save(torch_reference.ResNet(18).state_dict(), tmp_path / 'resnet18_v2.pth')
  config = _mmseg_config(pretrained=str(tmp_path / 'resnet18_v2.pth'),
                         pretrained_format='semseg-resnet')
  monkeypatch.setattr(train_state, '_init_variables',
                      lambda config: (nnx.State({}), nnx.State({}), nnx.State({})))
  with pytest.raises(ValueError, match=r'resnet18_v2\.pth: format semseg-resnet holds a stem of '
                                       r'widths \(64, 64, 128\) but the model has '
                                       r'config\.model\.stem_widths=\(32, 32, 64\)'):
    train_state.init_train_state(config, optim.create_optimizer(config.optim, 10),
                                 sharding.make_mesh(jax.devices()[:1]))


def test_mmseg_resnet_needs_the_mmseg_stem(tmp_path, twin18):
  _resnet_v1c_file(twin18, tmp_path / 'v1c.pth', 'bare')
  with pytest.raises(ValueError, match=r'stem of widths \(32, 32, 64\) but the model has '
                                       r'config\.model\.stem_widths=\(64, 64, 128\).*arch=mmseg'):
    weights.import_weights(_semseg_config(), str(tmp_path / 'run'), str(tmp_path / 'v1c.pth'),
                           'mmseg-resnet')
  variables = checkpoint.model_variables(
      nnx.eval_shape(lambda: create_model(_mmseg_config(), rngs=nnx.Rngs(0))))
  with pytest.raises(ValueError, match='deep_stem=False'):
    weights.backbone_from_file(variables, str(tmp_path / 'v1c.pth'), 'mmseg-resnet',
                               deep_stem=False, stem_widths=(32, 32, 64))
  # And semseg's ImageNet format names the other way round.
  with pytest.raises(ValueError, match=r'stem of widths \(64, 64, 128\).*stem_widths=\(32, 32'):
    weights.backbone_from_file(variables, str(tmp_path / 'v1c.pth'), 'semseg-resnet',
                               deep_stem=True, stem_widths=(32, 32, 64))

"""Weights in and out of other frameworks: the official PyTorch PSPNet, ImageNet ResNets, safetensors.

The flag-free library behind `python -m pspnet_jax.convert` (the command) and
the pretrained-backbone start of training. Our parameter paths mirror
PyTorch's module tree, so every format is one name table: a few regex renames
(the Flax module name -> the index in the official `nn.Sequential`) and the
leaf names (kernel -> weight, mean -> running_mean, ...). Kernels are HWIO
here and OIHW in PyTorch.

Reading or writing `.pth` needs PyTorch (imported only when a .pth is
touched, never by training without one); safetensors files need no torch.

What a file holds is checked, never assumed. A file that cannot be read
(empty, truncated, not a PyTorch or safetensors file) fails with its path, its
size and the reason. The model's variables are float32: float16, bfloat16 and
float64 tensors are converted with a warning that names the dtypes and counts
the tensors; an integer or bool tensor where the model needs a parameter or a
statistic is refused by name (BatchNorm's int64 `num_batches_tracked` buffers
are no variables of ours and stay accepted).

An export is written to a hidden temporary file in the target's directory and
`os.replace`d onto its name only once complete, so an interrupted export never
leaves half a file under that name; an existing file is refused unless
`overwrite=True` (`--overwrite` of the command). Weights files may be `gs://`
URIs both ways (through etils.epath): an export there is written locally and
copied up whole (an object appears only once its upload is complete).

mmsegmentation (`mmseg`, `mmseg-pspnet.md`): its PSPNet checkpoints are the
official layers under other names (`backbone.stem.0`, `decode_head.conv_seg`,
...), one more name table on top of semseg's, for the config variant
`arch=mmseg` (its ResNetV1c stem and switches; other configs are refused by
name). Model-zoo files, bare state_dicts and training checkpoints are read;
the bookkeeping of training checkpoints (mmengine's `message_hub` with its
HistoryBuffer objects, numpy arrays and scalars) is unpickled into inert
stand-ins, never into mmengine or numpy code, and any other global a file
names beyond torch's weights-only set is refused before anything runs. The
plain-data part of the file's `meta` (its `dataset_meta`, ...) is kept and
written back by an export, in mmseg's key order with every BatchNorm's
`num_batches_tracked`. `mmseg-resnet` is the ImageNet ResNetV1c of
`open-mmlab://resnet50_v1c` (keys `stem.N`, `layerN`, `fc`).

CascadePSP (`cascadepsp`): the released refinement module (a file named just
`model`: the bare state_dict of a DataParallel model, keys `module.feats...`)
for configs with `task='refinement'`; an export writes that layout back, in the
official key order. Its ImageNet start is torchvision's ResNet-50, whose 3-channel
conv1 gets zeros for the 3 mask channels, as the official training loads it.
A file of the other model (a PSPNet given as cascadepsp, or the other way
round) is refused in one line that names the format and config it needs.
"""

import collections
import contextlib
import functools
import math
import os
import pickle
import re
import tempfile
from typing import NamedTuple
import uuid

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from pspnet_jax import checkpoint, paths, sharding
from pspnet_jax.architectures import MMSEG_ARCHITECTURE
from pspnet_jax.errors import AlreadyExists, MissingFile, UserError
from pspnet_jax.models import create_model

# Module renames, applied in order to the dotted Flax path of a variable.
_DOWNSAMPLE = [(r'\.downsample\.conv\.', '.downsample.0.'), (r'\.downsample\.bn\.', '.downsample.1.')]
_SEMSEG_RENAMES = [
    # layer0 = nn.Sequential(conv1, bn1, relu, conv2, bn2, relu, conv3, bn3, relu, maxpool)
    (r'^layer0\.conv1\.', 'layer0.0.'), (r'^layer0\.bn1\.', 'layer0.1.'),
    (r'^layer0\.conv2\.', 'layer0.3.'), (r'^layer0\.bn2\.', 'layer0.4.'),
    (r'^layer0\.conv3\.', 'layer0.6.'), (r'^layer0\.bn3\.', 'layer0.7.'),
    *_DOWNSAMPLE,
    # ppm.features[i] = nn.Sequential(AdaptiveAvgPool2d, conv, bn, relu)
    (r'^ppm\.stages\.(\d+)\.conv\.', r'ppm.features.\1.1.'),
    (r'^ppm\.stages\.(\d+)\.bn\.', r'ppm.features.\1.2.'),
    # cls / aux = nn.Sequential(conv, bn, relu, Dropout2d, conv)
    (r'^(cls|aux)\.block\.conv\.', r'\1.0.'), (r'^(cls|aux)\.block\.bn\.', r'\1.1.'),
    (r'^(cls|aux)\.classifier\.', r'\1.4.'),
]
# An ImageNet ResNet (semseg's resnet50_v2.pth or torchvision's): the stem is at the top level.
_RESNET_RENAMES = [(r'^layer0\.', ''), *_DOWNSAMPLE]
# CascadePSP's refinement module (models/cascadepsp.py): `feats` is a ResNet with torchvision's
# names (the stem's conv1 and bn1 at its top); each pyramid stage is
# Sequential(AdaptiveAvgPool2d, conv); PSPUpsample's conv and conv2 are Sequential(BN, ReLU,
# conv, BN, ReLU, conv) and final_28 / final_56 Sequential(conv, ReLU, conv).
_CASCADEPSP_RENAMES = [
    (r'^feats\.layer0\.', 'feats.'), *_DOWNSAMPLE,
    (r'^psp\.stages\.(\d+)\.', r'psp.stages.\1.1.'),
    (r'^(up_\d\.conv2?)\.bn1\.', r'\1.0.'), (r'^(up_\d\.conv2?)\.conv1\.', r'\1.2.'),
    (r'^(up_\d\.conv2?)\.bn2\.', r'\1.3.'), (r'^(up_\d\.conv2?)\.conv2\.', r'\1.5.'),
    (r'^(final_\d+)\.hidden\.', r'\1.0.'), (r'^(final_\d+)\.classifier\.', r'\1.2.'),
]
# Where a backbone file's ResNet sits in our models: at the top of a PSPNet, `feats` of the RM.
_CASCADEPSP_BACKBONE_RENAMES = [(r'^feats\.', ''), *_RESNET_RENAMES]
# mmsegmentation's EncoderDecoder, applied after the semseg renames (mmseg-pspnet.md, "Key
# mapping"): ResNetV1c's stem Sequential keeps semseg's indices, PPM branches and heads are
# ConvModules (conv, bn), and the classifiers are the heads' conv_seg.
_MMSEG_RENAMES = [
    *_SEMSEG_RENAMES,
    (r'^layer0\.', 'backbone.stem.'), (r'^(layer[1-4])\.', r'backbone.\1.'),
    (r'^ppm\.features\.(\d+)\.1\.', r'decode_head.psp_modules.\1.1.conv.'),
    (r'^ppm\.features\.(\d+)\.2\.', r'decode_head.psp_modules.\1.1.bn.'),
    (r'^cls\.0\.', 'decode_head.bottleneck.conv.'), (r'^cls\.1\.', 'decode_head.bottleneck.bn.'),
    (r'^cls\.4\.', 'decode_head.conv_seg.'),
    (r'^aux\.0\.', 'auxiliary_head.convs.0.conv.'), (r'^aux\.1\.', 'auxiliary_head.convs.0.bn.'),
    (r'^aux\.4\.', 'auxiliary_head.conv_seg.'),
]
# An ImageNet ResNetV1c (open-mmlab://resnet50_v1c): semseg's layer0 Sequential named `stem`.
_MMSEG_RESNET_RENAMES = [*_SEMSEG_RENAMES, (r'^layer0\.', 'stem.')]
# The order of mmseg's state_dict, which is its modules' order of creation: per dotted part, the
# rank of a name (numbers in their order). BaseDecodeHead creates conv_seg before PSPHead its
# psp_modules and bottleneck (and FCNHead its convs); Bottleneck and BasicBlock add conv1, bn1,
# conv2, ... and then the downsample; ConvModule conv, then bn; BatchNorm's parameters come before
# its buffers.
_MMSEG_ORDER = {name: rank for names in (
    ('backbone', 'decode_head', 'auxiliary_head'), ('stem', 'layer1', 'layer2', 'layer3', 'layer4'),
    ('conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'downsample'),
    ('conv_seg', 'psp_modules', 'bottleneck'), ('conv_seg', 'convs'), ('conv', 'bn'),
    ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'),
) for rank, name in enumerate(names)}
# The order of the official CascadePSP state_dict (its modules' order of creation), one rank per
# name that agrees with every group of siblings: the model's parts; feats' conv1, bn1, layer1..4;
# a block's conv1, bn1, ..., downsample; psp's stages, bottleneck; PSPUpsample's conv, conv2,
# shortcut.
_CASCADEPSP_ORDER = {name: rank for rank, name in enumerate((
    'feats', 'psp', 'up_1', 'up_2', 'up_3', 'final_28', 'final_56', 'final_11', 'final_21',
    'stages', 'bottleneck', 'conv', 'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3',
    'downsample', 'shortcut', 'layer1', 'layer2', 'layer3', 'layer4',
    'weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'))}
# The switches of mmsegmentation's PSPNet (configs/default.py, the config variant arch=mmseg):
# with other stem widths its tensors do not fit, with the other switches they would load and
# compute something else. dilate_basic_conv2 matters for basic blocks (ResNet-18/34) only.
_BASIC_BLOCK_BACKBONES = ('resnet18', 'resnet34')
_SEMSEG_STEM_WIDTHS = (64, 64, 128)
_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var'}
_BACKBONE_PREFIXES = ('layer0.', 'layer1.', 'layer2.', 'layer3.', 'layer4.')
_BATCHES_TRACKED = 'num_batches_tracked'
# safetensors' dtype names. numpy has no bfloat16 (which is why safetensors.numpy cannot read
# bf16 files); jax's (ml_dtypes) keeps the bits until the conversion to float32.
_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
                       'BF16': jnp.bfloat16, 'I64': np.int64, 'I32': np.int32, 'I16': np.int16,
                       'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}
# torch.save writes a zip archive (since PyTorch 1.6), whose end-of-central-directory record is in
# its last 22 bytes plus a comment of at most 64 KiB; older versions wrote a protocol-2 pickle,
# which starts with the PROTO opcode.
_ZIP_START, _ZIP_END, _ZIP_END_SEARCH = b'PK\x03\x04', b'PK\x05\x06', 22 + 0xFFFF
_PICKLE_START = b'\x80'

# Globals of training checkpoints' bookkeeping that torch's weights-only unpickler refuses
# (mmengine's MessageHub state: HistoryBuffer objects holding numpy arrays, numpy scalars, and
# the buffers' statistics methods, which pickle writes as getattr(HistoryBuffer, 'min')):
# unpickled into `_StandIn`s, by their names only. Nothing of these is imported or run.
_STAND_IN_MODULES = ('mmengine.', 'mmcv.', 'mmseg.', 'numpy.')
_STAND_IN_GLOBALS = ('builtins.getattr',)

# ImageNet backbones (config.model.pretrained_format), by stem; the file may be .pth or
# .safetensors.
PRETRAINED_FORMATS = ('semseg-resnet', 'torchvision-resnet', 'mmseg-resnet')
# format -> (deep stem, its widths or None for any).
_PRETRAINED_STEMS = {'semseg-resnet': (True, _SEMSEG_STEM_WIDTHS),
                     'torchvision-resnet': (False, None),
                     'mmseg-resnet': (True, MMSEG_ARCHITECTURE['stem_widths'])}
IMPORT_FORMATS = ('semseg', 'mmseg', 'cascadepsp', 'safetensors', *PRETRAINED_FORMATS)
# The weight exports of a segmentation config (PSPNet) and of a refinement one (its own file, and
# safetensors with its names); `export_weights` takes either.
EXPORT_FORMATS = ('semseg', 'mmseg', 'safetensors')
REFINEMENT_EXPORT_FORMATS = ('cascadepsp', 'safetensors')
# What the refinement module (config.task='refinement') converts: those, and the torchvision
# ResNet it starts from.
_REFINEMENT_FORMATS = (*REFINEMENT_EXPORT_FORMATS, 'torchvision-resnet')


class _Layout(NamedTuple):
  """The names of one model's files: the key prefixes that tell them, what they are, how they
  are imported, and the name table."""
  prefixes: tuple[str, ...]
  what: str
  how: str
  renames: list


# A file with none of the mmseg or CascadePSP prefixes is taken for semseg's PSPNet (whose
# missing keys are then named one by one).
_LAYOUTS = {
    'mmseg': _Layout(('backbone.', 'decode_head.', 'auxiliary_head.'),
                     'an mmsegmentation checkpoint',
                     '--format=mmseg and the config variant arch=mmseg', _MMSEG_RENAMES),
    'cascadepsp': _Layout(('feats.', 'psp.', 'up_1.', 'up_2.', 'up_3.', 'final_'),
                          'a CascadePSP refinement module',
                          '--format=cascadepsp and configs/cascadepsp.py', _CASCADEPSP_RENAMES),
    'semseg': _Layout(('layer0.', 'ppm.', 'cls.', 'aux.'), 'an official semseg PSPNet checkpoint',
                      '--format=semseg and a PSPNet config without arch=mmseg', _SEMSEG_RENAMES),
}


def torch_name(path: str, renames) -> str:
  """'layer0.bn1.mean' -> 'layer0.1.running_mean' (with the semseg renames)."""
  module, leaf = path.rsplit('.', 1)
  name = module + '.'
  for pattern, replacement in renames:
    name = re.sub(pattern, replacement, name)
  return name + _LEAF_NAMES[leaf]


def semseg_name(path: str) -> str:
  """Our dotted variable path -> its key in the official PSPNet `state_dict`."""
  return torch_name(path, _SEMSEG_RENAMES)


def _module_order(key: str, ranks: dict, model: str) -> tuple:
  """The sort key that puts a state_dict in the order the PyTorch `model`'s own state_dict() has
  (`ranks`: the rank of each name among its siblings; numbers in their order)."""
  order = []
  for part in key.split('.'):
    if part.isdigit():
      order.append((0, int(part)))
    elif part in ranks:
      order.append((1, ranks[part]))
    else:
      raise UserError(f'{key}: {part!r} is no module of {model}')
  return tuple(order)


def is_refinement(config) -> bool:
  """Whether `config` is a CascadePSP refinement one (config.task, configs/cascadepsp.py)."""
  return getattr(config, 'task', 'segmentation') == 'refinement'


def check_task(config, fmt: str, what: str) -> None:
  """Raises UserError when format `fmt` holds the other model than the config's (PSPNet for
  segmentation, the refinement module for refinement); `what` names the file or the export."""
  if is_refinement(config) and fmt not in _REFINEMENT_FORMATS:
    raise UserError(f'{what}: --format={fmt} is PSPNet\'s, but the config is CascadePSP\'s '
                    f'refinement module (config.task=\'refinement\'), which takes '
                    f'{", ".join(_REFINEMENT_FORMATS)}')
  if not is_refinement(config) and fmt == 'cascadepsp':
    raise UserError(f'{what}: --format=cascadepsp is CascadePSP\'s refinement module, but the '
                    'config is a segmentation one: use configs/cascadepsp.py '
                    '(config.task=\'refinement\')')


def check_mmseg_architecture(config, what: str) -> None:
  """Raises UserError naming the config keys that are not mmseg's PSPNet (the variant
  arch=mmseg), which `what` (an mmseg checkpoint's import or export) needs."""
  wrong = []
  for key, expected in MMSEG_ARCHITECTURE.items():
    if key == 'dilate_basic_conv2' and config.model.backbone not in _BASIC_BLOCK_BACKBONES:
      continue
    value = config.model[key]
    if (tuple(value) if key == 'stem_widths' else value) != expected:
      wrong.append(f'model.{key}={value!r}')
  if wrong:
    preset = ', '.join(f'model.{key}={value!r}' for key, value in MMSEG_ARCHITECTURE.items())
    raise UserError(f'{what} needs mmsegmentation\'s PSPNet, but the config has '
                    f'{", ".join(wrong)}: use the config variant arch=mmseg (e.g. '
                    f'--config=configs/ade20k.py:arch=mmseg), which sets {preset}')


def _to_torch_array(array: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1))) if array.ndim == 4 else array


def _from_torch_array(array: np.ndarray) -> np.ndarray:
  return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array


def _torch_shape(shape) -> tuple:
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def to_torch_state_dict(variables: nnx.State, batches_tracked=None, *, renames=None
                        ) -> dict[str, np.ndarray]:
  """Model variables -> the official PSPNet `state_dict` (numpy, float32, OIHW kernels).

  Every BatchNorm gets its `num_batches_tracked` buffer (which `strict=True`
  loading requires; BatchNorm with momentum 0.1 never reads it): the value from
  `batches_tracked` (a dict by the BatchNorm's semseg name, as an import recorded
  it) or 0. `renames`: another name table (mmseg's), semseg's by default.
  """
  batches_tracked = batches_tracked or {}
  state_dict = {}
  for path, value in checkpoint.flatten(variables.to_pure_dict()).items():
    name = torch_name(path, renames or _SEMSEG_RENAMES)
    state_dict[name] = _to_torch_array(np.asarray(value))
    if name.endswith('.running_mean'):
      bn = semseg_name(path)[:-len('running_mean')]
      state_dict[name[:-len('running_mean')] + _BATCHES_TRACKED] = np.array(
          batches_tracked.get(bn, 0), np.int64)
  return state_dict


def to_mmseg_state_dict(variables: nnx.State, batches_tracked=None) -> dict[str, np.ndarray]:
  """Model variables -> mmsegmentation's PSPNet `state_dict`, in mmseg's order (as
  `to_torch_state_dict`)."""
  state_dict = to_torch_state_dict(variables, batches_tracked, renames=_MMSEG_RENAMES)
  order = functools.partial(_module_order, ranks=_MMSEG_ORDER, model='mmseg\'s PSPNet')
  return {key: state_dict[key] for key in sorted(state_dict, key=order)}


def to_cascadepsp_state_dict(variables: nnx.State, batches_tracked=None
                             ) -> dict[str, np.ndarray]:
  """The refinement module's variables -> the official CascadePSP `state_dict` (no `module.`),
  in the official order (as `to_torch_state_dict`)."""
  state_dict = to_torch_state_dict(variables, batches_tracked, renames=_CASCADEPSP_RENAMES)
  order = functools.partial(_module_order, ranks=_CASCADEPSP_ORDER,
                            model='CascadePSP\'s refinement module')
  return {key: state_dict[key] for key in sorted(state_dict, key=order)}


def _format_problems(title: str, problems: list[str]) -> str:
  shown = '\n  '.join(problems[:12])
  more = f'\n  ... and {len(problems) - 12} more' if len(problems) > 12 else ''
  return f'{title}:\n  {shown}{more}'


def from_torch_state_dict(tensors: dict[str, np.ndarray], variables: nnx.State, *,
                          backbone_only: bool = False, source: str = 'weights',
                          renames=None) -> nnx.State:
  """Returns `variables` with every entry replaced by its tensor from a PyTorch state_dict.

  `backbone_only`: `tensors` is an ImageNet ResNet (an `fc` classifier to
  ignore); only layer0..layer4 (of a PSPNet, or of the refinement module's
  `feats`) are replaced, the heads keep their values.
  `renames`: the file's name table (default: semseg's, or with `backbone_only`
  the top-level stem of semseg's and torchvision's ResNets). Missing,
  unexpected and wrongly shaped tensors are all reported by the file's names
  in one UserError.
  """
  renames = renames or (_RESNET_RENAMES if backbone_only else _SEMSEG_RENAMES)
  used, problems = set(), []
  converted = collections.Counter()  # dtype name -> how many tensors were cast to float32

  def replace(path, value):
    name = checkpoint.dotted_name(path)
    # The refinement module holds its ResNet as `feats`.
    if backbone_only and not name.removeprefix('feats.').startswith(_BACKBONE_PREFIXES):
      return value
    key = torch_name(name, renames)
    if key not in tensors:
      problems.append(f'{key} (for {name}): missing')
      return value
    used.add(key)
    tensor = np.asarray(tensors[key])
    # Every variable of ours is a float; an integer tensor here is a wrong file, not a weight.
    if not jnp.issubdtype(tensor.dtype, jnp.floating):
      problems.append(f'{key}: dtype {tensor.dtype}, the model needs a floating-point tensor')
      return value
    if tensor.shape != _torch_shape(value.shape):
      problems.append(f'{key}: shape {tensor.shape}, the model needs {_torch_shape(value.shape)}')
      return value
    # Checked after the cast: a float64 value beyond float32's range becomes infinite (and is
    # reported below rather than warned about by numpy).
    with np.errstate(over='ignore'):
      array = tensor.astype(np.float32)
    if not np.all(np.isfinite(array)):
      cast = '' if tensor.dtype == np.float32 else f' as float32 (from {tensor.dtype})'
      problems.append(f'{key}: holds NaN or infinite values{cast}')
      return value
    if tensor.dtype != np.float32:
      converted[tensor.dtype.name] += 1
    # A copy on the device: numpy views of torch tensors would change under the model's feet.
    return jnp.array(_from_torch_array(array))

  pure = jax.tree_util.tree_map_with_path(replace, variables.to_pure_dict())
  ignored_prefixes = ('fc.',) if backbone_only else ()  # the ImageNet classifier
  unexpected = [key for key in tensors if key not in used
                and not key.endswith(_BATCHES_TRACKED) and not key.startswith(ignored_prefixes)]
  problems += [f'{key}: unexpected (the model has no such parameter)' for key in sorted(unexpected)]
  if problems:
    raise UserError(_format_problems(f'{source} do not fit the model of the config '
                                      '(check model.backbone, model.deep_stem, '
                                      'model.stem_widths, model.use_ppm, model.head_channels, '
                                      'model.aux_channels, data.num_classes and --format)',
                                      problems))
  if converted:
    # Not an error (half-precision releases are common), but the extra precision of an fp32
    # training is not in the file, and an export writes float32, not the file's dtype.
    logging.warning('%s: %s of %d tensors converted to float32 (the dtype of the model)', source,
                    ', '.join(f'{count} {dtype}' for dtype, count in sorted(converted.items())),
                    len(used))
  result = nnx.State(variables)
  nnx.replace_by_pure_dict(result, pure)
  return result


def from_cascadepsp_state_dict(tensors: dict[str, np.ndarray], variables: nnx.State, *,
                               source: str = 'weights') -> nnx.State:
  """`from_torch_state_dict` for the refinement module from the official CascadePSP
  `state_dict` (keys without `module.`)."""
  return from_torch_state_dict(tensors, variables, source=source, renames=_CASCADEPSP_RENAMES)


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError('reading and writing .pth files needs PyTorch (CPU build is enough): '
                      'pip install -r requirements-torch.txt, or use safetensors files') from error
  return torch


def _torch_file_diagnosis(path: str) -> str | None:
  """Why torch.load refused `path`, when its first and last bytes tell (the loader's own message
  is "KeyError: '101'" for a text file and a miniz internal for a truncated archive)."""
  size = epath.Path(path).stat().length
  with epath.Path(path).open('rb') as file:
    head = file.read(len(_ZIP_START))
    file.seek(max(0, size - _ZIP_END_SEARCH))
    tail = file.read()
  if head.startswith(_ZIP_START):
    return None if _ZIP_END in tail else 'truncated: a zip archive (torch.save) without its end'
  if not head.startswith(_PICKLE_START):
    return (f'not a PyTorch file: it begins with {head!r}, neither a zip archive (torch.save) '
            'nor a pickle (torch.save before PyTorch 1.6)')
  return None


def _unreadable(path: str, what: str, error: Exception, diagnosis: str | None = None
                ) -> UserError:
  """The error for a file a reader refused: the path, its size and a reason that is never empty
  (torch.load of an empty file raises an EOFError without a message)."""
  size = epath.Path(path).stat().length
  if size == 0:
    reason = 'the file is empty'
  elif diagnosis:
    reason = diagnosis
  else:
    reason = f'{type(error).__name__}: {error}' if str(error) else type(error).__name__
  return UserError(f'{path} is not a readable {what} ({size} bytes): {reason}')


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  # The file's raw bytes per tensor: safetensors.numpy.load_file cannot give bfloat16.
  from safetensors import deserialize  # pylint: disable=import-outside-toplevel
  with epath.Path(path).open('rb') as file:
    try:
      entries = deserialize(file.read())
    except Exception as error:  # safetensors raises its own SafetensorError
      raise _unreadable(path, 'safetensors file', error) from error
  tensors = {}
  for key, entry in entries:
    if entry['dtype'] not in _SAFETENSORS_DTYPES:
      raise UserError(f'{path}: tensor {key!r} has dtype {entry["dtype"]}, which this reader '
                      f'does not take ({sorted(_SAFETENSORS_DTYPES)})')
    dtype = _SAFETENSORS_DTYPES[entry['dtype']]
    tensors[key] = np.frombuffer(entry['data'], dtype).reshape(entry['shape'])
  return tensors


class _StandIn:
  """What a bookkeeping global of a training checkpoint (`_STAND_IN_MODULES`) unpickles into:
  takes any constructor arguments and state, keeps none of them, runs nothing."""

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return super().__new__(cls)

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state


def _torch_load(torch, file):
  """torch.load with weights_only=True; a file it refuses for globals that are all training
  bookkeeping (`_STAND_IN_MODULES`, `_STAND_IN_GLOBALS`) is read again with those globals as
  `_StandIn`s (the unpickler calls, builds and sets the state of nothing else). Any other global
  (a class or function the file would import and call) is refused before anything runs."""
  try:
    return torch.load(file, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as error:
    file.seek(0)
    try:  # the GLOBAL opcodes of the file's pickle, read without running any
      unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    except Exception:  # pylint: disable=broad-exception-caught  (a legacy or broken file)
      raise error from None
    if not unsafe:  # refused for another reason
      raise
    refused = [name for name in unsafe
               if not name.startswith(_STAND_IN_MODULES) and name not in _STAND_IN_GLOBALS]
    if refused:
      raise pickle.UnpicklingError(
          f'it would import and call {", ".join(refused)}, which a weights file may not (read '
          'with torch\'s weights-only unpickler; of other globals only the bookkeeping of '
          f'training checkpoints is accepted, as inert stand-ins: {_STAND_IN_MODULES} and '
          f'{_STAND_IN_GLOBALS})') from None
    file.seek(0)
    with torch.serialization.safe_globals([(_StandIn, name) for name in unsafe]):
      return torch.load(file, map_location='cpu', weights_only=True)


def _plain(value):
  """`value` as JSON-able plain data (tuples as lists), or None when it holds anything else."""
  if value is None or isinstance(value, (str, bool, int)):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, (list, tuple)):
    items = [_plain(item) for item in value]
    return None if any(p is None and v is not None for p, v in zip(items, value)) else items
  if isinstance(value, dict) and all(isinstance(key, str) for key in value):
    items = {key: _plain(item) for key, item in value.items()}
    return (None if any(items[key] is None and item is not None for key, item in value.items())
            else items)
  return None


def _plain_meta(meta: dict, path: str) -> dict:
  """The entries of an mmseg checkpoint's `meta` that are plain data (kept for an export)."""
  kept = {key: _plain(value) for key, value in meta.items() if isinstance(key, str)}
  dropped = sorted(str(key) for key in meta if key not in kept
                   or (kept[key] is None and meta[key] is not None))
  if dropped:
    logging.info('%s: meta entries %s are not plain data; not kept', path, dropped)
  return {key: value for key, value in kept.items() if key not in dropped}


def _read_torch(path: str) -> tuple[dict[str, np.ndarray], dict]:
  torch = _import_torch()
  try:
    with epath.Path(path).open('rb') as file:
      loaded = _torch_load(torch, file)
  except Exception as error:  # pickle, zip and torch errors alike mean the same here
    raise _unreadable(path, 'PyTorch checkpoint', error, _torch_file_diagnosis(path)) from error
  extras = {}
  if isinstance(loaded, dict) and isinstance(loaded.get('state_dict'), dict):
    if 'epoch' in loaded:
      extras['epoch'] = int(loaded['epoch'])
    if isinstance(loaded.get('meta'), dict):  # mmseg's (mmcv / mmengine) checkpoints
      extras['mmseg_meta'] = _plain_meta(loaded['meta'], path)
    loaded = loaded['state_dict']
  if not isinstance(loaded, dict):
    raise UserError(f'{path} holds a {type(loaded).__name__}, not a state_dict')
  tensors = {}
  for key, value in loaded.items():
    if not isinstance(value, torch.Tensor):
      raise UserError(f'{path}: entry {key!r} is a {type(value).__name__}, not a tensor')
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
      # numpy has no bfloat16: the same bits as jax's, cast to float32 with the others later.
      tensors[key] = value.view(torch.int16).numpy().view(jnp.bfloat16)
      continue
    try:
      tensors[key] = value.numpy()
    except TypeError as error:  # float8 and other dtypes numpy cannot hold
      raise UserError(f'{path}: entry {key!r} has dtype {value.dtype}: {error}') from error
  return tensors, extras


def read_tensors(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """A .pth (official checkpoint or bare state_dict) or .safetensors file -> (numpy tensors, extras).

  `module.` prefixes (DataParallel / DistributedDataParallel) are stripped;
  extras holds the official checkpoint's `epoch` and the plain-data entries of
  an mmseg checkpoint's `meta` (`mmseg_meta`) when present. Tensors keep
  the file's dtype (bfloat16 as jax's); a file that cannot be read raises a
  UserError that names it and says why.
  """
  if not epath.Path(path).is_file():
    raise MissingFile(f'no weights file at {path}')
  if path.endswith('.safetensors'):
    raw, extras = _read_safetensors(path), {}
  else:
    raw, extras = _read_torch(path)
  tensors = {key.removeprefix('module.'): value for key, value in raw.items()}
  return tensors, extras


# Formats by file extension: the one a path without --format means, and those it fits (the
# deployable ones are pspnet_jax.deploy's). A SavedModel is a directory (no extension); an
# extension not listed here is not checked.
_EXTENSION_FORMATS = {
    '.pth': ('semseg', 'semseg', 'mmseg', 'cascadepsp', *PRETRAINED_FORMATS),
    '.pt': ('semseg', 'semseg', 'mmseg', 'cascadepsp', *PRETRAINED_FORMATS),
    '.safetensors': ('safetensors', 'safetensors', *PRETRAINED_FORMATS),
    '.onnx': ('onnx', 'onnx'), '.tflite': ('tflite', 'tflite'), '.jax': ('jax', 'jax'),
    # CascadePSP's released weights are a file named `model`.
    '': ('savedmodel', 'savedmodel', 'cascadepsp'),
}


def file_format(path: str, given: str | None) -> str:
  """The format of `path` for convert: `given`, checked against the extension, or the
  extension's."""
  extension = os.path.splitext(path.rstrip('/'))[1].lower()
  default, *fitting = _EXTENSION_FORMATS.get(extension, (None,))
  if given is None:
    if default is None:
      raise UserError(f'{path}: no format for the extension {extension!r}; give --format')
    return default
  known = {fmt for formats in _EXTENSION_FORMATS.values() for fmt in formats}
  # An unknown name is left to the caller, which lists the formats it takes.
  if fitting and given in known and given not in fitting:
    raise UserError(f'--format={given} does not fit {path} ({extension or "no extension"} is '
                    f'{", ".join(dict.fromkeys(fitting))}); fix the name or the format')
  return given


def refuse_existing(path: str, overwrite: bool) -> None:
  # lexists: a dangling symlink is a name taken too.
  exists = epath.Path(path).exists() if paths.is_remote(path) else os.path.lexists(path)
  if not overwrite and exists:
    raise AlreadyExists(f'{path} already exists; give --overwrite (overwrite=True) to '
                        'replace it')


def write_atomically(path: str, write, *, overwrite: bool) -> None:
  """`write(temporary_path)`, then the finished file moved onto `path`.

  The temporary file is hidden in the same directory (os.replace is atomic only
  within one file system), so `path` holds the old file or the new one, never
  half of one; it is removed when the write fails or is interrupted (only a
  SIGKILL or a crash can leave a `.NAME.tmp-*` behind). A `gs://` path is
  written into a local temporary folder and copied up.
  """
  refuse_existing(path, overwrite)
  if paths.is_remote(path):
    with tempfile.TemporaryDirectory() as scratch:
      written = os.path.join(scratch, epath.Path(path).name)
      write(written)
      epath.Path(written).copy(path, overwrite=True)
    return
  directory, name = os.path.split(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temporary = os.path.join(directory, f'.{name}.tmp-{uuid.uuid4().hex[:8]}')
  try:
    write(temporary)
    # The data on disk before the name points at it: after a crash, a rename can outlive
    # data still in the page cache and leave an empty file.
    with open(temporary, 'rb') as written:
      os.fsync(written.fileno())
    os.replace(temporary, path)
  except BaseException:  # KeyboardInterrupt too
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise


def write_tensors(state_dict: dict[str, np.ndarray], path: str, fmt: str, epoch: int, *,
                  meta: dict | None = None, overwrite: bool = False) -> None:
  """Writes an official-format .pth ({'epoch', 'state_dict'} with `module.` keys), an mmseg .pth
  ({'meta', 'state_dict'}, keys as given, in their order), CascadePSP's file (the bare
  state_dict with `module.` keys, in their order) or safetensors.

  Atomically (see `write_atomically`); an existing `path` is refused unless `overwrite`.
  """
  if fmt == 'safetensors':
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    write = functools.partial(save_file, state_dict)
  elif fmt == 'mmseg':
    torch = _import_torch()
    # What mmengine's save_checkpoint writes for a model (no optimizer: mmseg's tools load it
    # with load_checkpoint, which takes the state_dict and meta only).
    write = functools.partial(torch.save, {
        'meta': meta or {},
        'state_dict': collections.OrderedDict(
            (key, torch.from_numpy(np.array(value))) for key, value in state_dict.items())})
  elif fmt == 'cascadepsp':
    torch = _import_torch()
    # The official Refiner strips the first 7 characters of every key (DataParallel's).
    write = functools.partial(torch.save, collections.OrderedDict(
        ('module.' + key, torch.from_numpy(np.array(value))) for key, value in state_dict.items()))
  else:
    torch = _import_torch()
    # semseg's test.py loads into nn.DataParallel(model), hence the `module.` prefix.
    write = functools.partial(torch.save, {
        'epoch': epoch,
        'state_dict': {'module.' + key: torch.from_numpy(np.array(value))
                       for key, value in state_dict.items()}})
  write_atomically(path, write, overwrite=overwrite)


def backbone_from_file(variables: nnx.State, path: str, fmt: str, *, deep_stem: bool,
                       stem_widths=_SEMSEG_STEM_WIDTHS) -> nnx.State:
  """`variables` with layer0..layer4 from an ImageNet ResNet file; the heads keep their values.

  `deep_stem` and `stem_widths` (config.model's) must be the stem of `fmt`. The
  refinement module's backbone (`feats`, in `variables`) takes a torchvision
  ResNet, its conv1 zero-extended to the model's input channels.
  """
  refinement = 'feats' in variables
  _check_pretrained_stem(path, fmt, deep_stem, stem_widths, refinement=refinement)
  tensors, _ = read_tensors(path)
  renames = None
  if fmt == 'mmseg-resnet':
    # mmseg's own backbone checkpoints may carry the segmentor's `backbone.` prefix.
    tensors = {key.removeprefix('backbone.'): value for key, value in tensors.items()}
    renames = _MMSEG_RESNET_RENAMES
  if refinement:
    tensors = _with_mask_channels(tensors, variables)
    renames = _CASCADEPSP_BACKBONE_RENAMES
  return from_torch_state_dict(tensors, variables, backbone_only=True, source=f'{path} ({fmt})',
                               renames=renames)


def _with_mask_channels(tensors: dict, variables: nnx.State) -> dict:
  """`tensors` with the RGB conv1 kernel extended by zeros to the refinement module's input
  channels (RGB, mask, two guidance masks), as the official `load_weights_sequential` does: the
  masks start with no influence on the ImageNet features."""
  kernel = tensors.get('conv1.weight')
  channels = variables['feats']['layer0']['conv1']['kernel'].shape[2]
  # A missing or otherwise misshapen kernel is named by from_torch_state_dict.
  if kernel is None or kernel.ndim != 4 or kernel.shape[1] >= channels:
    return tensors
  zeros = np.zeros((kernel.shape[0], channels - kernel.shape[1], *kernel.shape[2:]), kernel.dtype)
  return {**tensors, 'conv1.weight': np.concatenate([kernel, zeros], axis=1)}


def _check_pretrained_stem(path: str, fmt: str, deep_stem: bool, stem_widths, *,
                           refinement: bool = False) -> None:
  if refinement:
    # Its stem is always torchvision's (config.model.deep_stem does not apply).
    if fmt != 'torchvision-resnet':
      raise UserError(f'{path}: CascadePSP\'s refinement module starts from a torchvision ResNet '
                      f'(7x7 stem), not format {fmt}: give '
                      '--config.model.pretrained_format=torchvision-resnet')
    return
  if fmt not in PRETRAINED_FORMATS:
    raise UserError(f'{path}: format {fmt!r} is not an ImageNet backbone; use one of '
                    f'{PRETRAINED_FORMATS}')
  wants_deep, wants_widths = _PRETRAINED_STEMS[fmt]
  if deep_stem != wants_deep:
    raise UserError(f'{path}: format {fmt} holds a {"deep" if wants_deep else "7x7"} stem but '
                    f'the model has config.model.deep_stem={deep_stem}')
  if wants_widths is not None and tuple(stem_widths) != wants_widths:
    hint = (' (the config variant arch=mmseg)' if fmt == 'mmseg-resnet' else
            ' (semseg\'s; mmseg-resnet is the 32-32-64 stem of ResNetV1c)')
    raise UserError(f'{path}: format {fmt} holds a stem of widths {wants_widths} but the model '
                    f'has config.model.stem_widths={tuple(stem_widths)}: set '
                    f'model.stem_widths={wants_widths}{hint}')


def _layout(config, fmt: str) -> str:
  """The names (`_LAYOUTS`) of the files of format `fmt` for the config's model: safetensors
  files have semseg's, or the refinement module's."""
  if fmt in ('mmseg', 'cascadepsp'):
    return fmt
  return 'cascadepsp' if is_refinement(config) else 'semseg'


def _check_layout(tensors: dict, layout: str, path: str) -> None:
  """Refuses a file of another model than `layout`'s: an mmseg checkpoint given as `semseg`, a
  PSPNet as `cascadepsp`, and so on."""
  found = {name: [key for key in tensors if key.startswith(names.prefixes)]
           for name, names in _LAYOUTS.items()}
  # The first layout with keys of its own; semseg's prefixes (layer0.) are no proof alone.
  held = next((name for name in ('mmseg', 'cascadepsp') if found[name]), 'semseg')
  if held == layout:
    return
  wanted = _LAYOUTS[layout]
  if found[held]:
    raise UserError(f'{path} is {_LAYOUTS[held].what} (keys such as {found[held][0]}), not '
                    f'{wanted.what}: import it with {_LAYOUTS[held].how}')
  raise UserError(f'{path} is not {wanted.what}: none of its keys starts with '
                  f'{" / ".join(wanted.prefixes)} (it has {sorted(tensors)[:3]} ...)')


def import_weights(config, workdir: str, path: str, fmt: str) -> str:
  """Writes the weights of `path` as checkpoint 0 of `workdir`; returns the checkpoint path."""
  existing = checkpoint.all_steps(workdir)
  if existing:
    raise AlreadyExists(f'{checkpoint.checkpoint_dir(workdir)} already has checkpoints '
                        f'{existing}; import into an empty --workdir')
  check_task(config, fmt, path)
  meta = {'source': paths.absolute(path), 'format': fmt}

  def fresh_model():
    return create_model(config, rngs=nnx.Rngs(config.seed))

  if fmt in PRETRAINED_FORMATS:
    # Refused before the (eager, slow) initialization; the heads keep their random one.
    _check_pretrained_stem(path, fmt, config.model.deep_stem, config.model.stem_widths,
                           refinement=is_refinement(config))
    variables = checkpoint.model_variables(fresh_model())
    variables = backbone_from_file(variables, path, fmt, deep_stem=config.model.deep_stem,
                                   stem_widths=config.model.stem_widths)
  else:
    # Every variable comes from the file: the model's shapes are all it takes.
    tensors, extras = read_tensors(path)
    layout = _layout(config, fmt)
    _check_layout(tensors, layout, path)
    renames = _LAYOUTS[layout].renames
    if fmt == 'mmseg':
      check_mmseg_architecture(config, f'{path} (--format=mmseg)')
    else:
      extras.pop('mmseg_meta', None)
    abstract = checkpoint.model_variables(nnx.eval_shape(fresh_model))
    variables = from_torch_state_dict(tensors, abstract, source=path, renames=renames)
    # Kept only so that an export gives back the very same file. The counts are kept by the
    # BatchNorms' semseg names, whatever the file's names.
    semseg_bns = {torch_name(name, renames)[:-len('running_mean')]:
                  semseg_name(name)[:-len('running_mean')]
                  for name in checkpoint.flatten(abstract.to_pure_dict()) if name.endswith('.mean')}
    meta.update(extras)
    meta['num_batches_tracked'] = {semseg_bns.get(bn, bn): int(value)
                                   for key, value in tensors.items()
                                   if key.endswith(_BATCHES_TRACKED)
                                   for bn in [key[:-len(_BATCHES_TRACKED)]]}
  return checkpoint.save_model(workdir, 0, variables, meta)


def export_weights(config, workdir: str, path: str, fmt: str, step: int | None = None, *,
                   overwrite: bool = False) -> int:
  """Writes checkpoint `step` (default latest) of `workdir` to `path`; returns the step.

  An existing `path` is refused unless `overwrite`, and the file appears only complete.
  """
  # Before the restore, so that a refusal costs nothing; write_tensors checks again.
  refuse_existing(path, overwrite)
  check_task(config, fmt, f'an export with --format={fmt}')
  if fmt == 'mmseg':
    check_mmseg_architecture(config, 'an export with --format=mmseg')
  # One device holds the weights to write (all of them would each hold a copy).
  loaded = checkpoint.load_model(config, workdir, step,
                                 mesh=sharding.make_mesh(jax.local_devices()[:1]))
  variables = checkpoint.model_variables(loaded.model)
  batches_tracked = loaded.meta.get('num_batches_tracked')
  meta = None
  if fmt == 'mmseg':
    state_dict = to_mmseg_state_dict(variables, batches_tracked)
    meta = _mmseg_meta(config, loaded)
  elif _layout(config, fmt) == 'cascadepsp':
    state_dict = to_cascadepsp_state_dict(variables, batches_tracked)
  else:
    state_dict = to_torch_state_dict(variables, batches_tracked)
  # Counted in steps here; an imported official checkpoint gives its epoch back.
  write_tensors(state_dict, path, fmt, epoch=loaded.meta.get('epoch', loaded.step), meta=meta,
                overwrite=overwrite)
  return loaded.step


def _mmseg_meta(config, loaded: checkpoint.LoadedModel) -> dict:
  """The `meta` of an mmseg export: the one an mmseg import kept, else ours, with the dataset's
  class names and palette (`dataset_meta`, which mmseg's init_model gives the model) when the
  meta has none and the config's dataset has them."""
  meta = loaded.meta.get('mmseg_meta')
  if meta is None:
    meta = {'exported_by': 'pspnet_jax', 'step': loaded.step}
    if loaded.meta.get('source'):
      meta['source'] = loaded.meta['source']
  if 'dataset_meta' in meta or 'CLASSES' in meta:
    return meta
  from pspnet_jax.data import registry  # pylint: disable=import-outside-toplevel
  try:
    names, palette = registry.class_names(config), registry.palette(config)
  except (ValueError, OSError) as error:  # another class count, an unbuilt folder dataset
    logging.info('no dataset_meta in the mmseg export: %s', error)
    return meta
  return {**meta, 'dataset_meta': {'classes': list(names), 'palette': palette.tolist()}}



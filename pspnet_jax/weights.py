"""Weights in and out of other frameworks: the official PyTorch PSPNet, ImageNet ResNets, safetensors.

The flag-free library behind `python -m pspnet_jax.convert` (the command) and
the pretrained-backbone start of training. Our parameter paths mirror
PyTorch's module tree, so every format is one name table: a few regex renames
(the Flax module name -> the index in the official `nn.Sequential`) and the
leaf names (kernel -> weight, mean -> running_mean, ...). Kernels are HWIO
here and OIHW in PyTorch.

Reading or writing `.pth` needs PyTorch (imported only when a .pth is
touched, never by training without one); safetensors files need no torch.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pspnet_jax import checkpoint
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
_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var'}
_BACKBONE_PREFIXES = ('layer0.', 'layer1.', 'layer2.', 'layer3.', 'layer4.')
_BATCHES_TRACKED = 'num_batches_tracked'

# ImageNet backbones (config.model.pretrained_format), by stem; the file may be .pth or
# .safetensors.
PRETRAINED_FORMATS = ('semseg-resnet', 'torchvision-resnet')
IMPORT_FORMATS = ('semseg', 'safetensors', *PRETRAINED_FORMATS)
EXPORT_FORMATS = ('semseg', 'safetensors')


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


def _to_torch_array(array: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1))) if array.ndim == 4 else array


def _from_torch_array(array: np.ndarray) -> np.ndarray:
  return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array


def _torch_shape(shape) -> tuple:
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def to_torch_state_dict(variables: nnx.State, batches_tracked=None) -> dict[str, np.ndarray]:
  """Model variables -> the official PSPNet `state_dict` (numpy, float32, OIHW kernels).

  Every BatchNorm gets its `num_batches_tracked` buffer (which `strict=True`
  loading requires; BatchNorm with momentum 0.1 never reads it): the value from
  `batches_tracked` (a dict by BatchNorm name, as an import recorded it) or 0.
  """
  batches_tracked = batches_tracked or {}
  state_dict = {}
  for path, value in checkpoint.flatten(variables.to_pure_dict()).items():
    name = semseg_name(path)
    state_dict[name] = _to_torch_array(np.asarray(value))
    if name.endswith('.running_mean'):
      bn = name[:-len('running_mean')]
      state_dict[bn + _BATCHES_TRACKED] = np.array(batches_tracked.get(bn, 0), np.int64)
  return state_dict


def _format_problems(title: str, problems: list[str]) -> str:
  shown = '\n  '.join(problems[:12])
  more = f'\n  ... and {len(problems) - 12} more' if len(problems) > 12 else ''
  return f'{title}:\n  {shown}{more}'


def from_torch_state_dict(tensors: dict[str, np.ndarray], variables: nnx.State, *,
                          backbone_only: bool = False, source: str = 'weights') -> nnx.State:
  """Returns `variables` with every entry replaced by its tensor from a PyTorch state_dict.

  `backbone_only`: `tensors` is an ImageNet ResNet (top-level stem, an `fc`
  classifier to ignore); only layer0..layer4 are replaced, the heads keep
  their values. Missing, unexpected and wrongly shaped tensors are all
  reported by name in one ValueError.
  """
  renames = _RESNET_RENAMES if backbone_only else _SEMSEG_RENAMES
  used, problems = set(), []

  def replace(path, value):
    name = checkpoint.dotted_name(path)
    if backbone_only and not name.startswith(_BACKBONE_PREFIXES):
      return value
    key = torch_name(name, renames)
    if key not in tensors:
      problems.append(f'{key} (for {name}): missing')
      return value
    used.add(key)
    tensor = np.asarray(tensors[key])
    if tensor.shape != _torch_shape(value.shape):
      problems.append(f'{key}: shape {tensor.shape}, the model needs {_torch_shape(value.shape)}')
      return value
    if not np.all(np.isfinite(tensor)):
      problems.append(f'{key}: holds NaN or infinite values')
      return value
    # A copy on the device: numpy views of torch tensors would change under the model's feet.
    return jnp.array(_from_torch_array(tensor), jnp.float32)

  pure = jax.tree_util.tree_map_with_path(replace, variables.to_pure_dict())
  ignored_prefixes = ('fc.',) if backbone_only else ()  # the ImageNet classifier
  unexpected = [key for key in tensors if key not in used
                and not key.endswith(_BATCHES_TRACKED) and not key.startswith(ignored_prefixes)]
  problems += [f'{key}: unexpected (the model has no such parameter)' for key in sorted(unexpected)]
  if problems:
    raise ValueError(_format_problems(f'{source} do not fit the model of the config '
                                      '(check model.backbone, model.deep_stem, model.use_ppm, '
                                      'data.num_classes and --format)', problems))
  result = nnx.State(variables)
  nnx.replace_by_pure_dict(result, pure)
  return result


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError('reading and writing .pth files needs PyTorch (CPU build is enough): '
                      'pip install torch==2.13.0, or use safetensors files') from error
  return torch


def read_tensors(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """A .pth (official checkpoint or bare state_dict) or .safetensors file -> (numpy tensors, extras).

  `module.` prefixes (DataParallel / DistributedDataParallel) are stripped;
  extras holds the official checkpoint's `epoch` when present.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no weights file at {path}')
  extras = {}
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    try:
      raw = load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError
      raise ValueError(f'{path} is not a readable safetensors file: {error}') from error
  else:
    torch = _import_torch()
    try:
      loaded = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike mean the same here
      raise ValueError(f'{path} is not a readable PyTorch checkpoint: {error}') from error
    if isinstance(loaded, dict) and isinstance(loaded.get('state_dict'), dict):
      if 'epoch' in loaded:
        extras['epoch'] = int(loaded['epoch'])
      loaded = loaded['state_dict']
    if not isinstance(loaded, dict):
      raise ValueError(f'{path} holds a {type(loaded).__name__}, not a state_dict')
    raw = {}
    for key, value in loaded.items():
      if not isinstance(value, torch.Tensor):
        raise ValueError(f'{path}: entry {key!r} is a {type(value).__name__}, not a tensor')
      raw[key] = value.detach().cpu().numpy()
  tensors = {key.removeprefix('module.'): value for key, value in raw.items()}
  return tensors, extras


def write_tensors(state_dict: dict[str, np.ndarray], path: str, fmt: str, epoch: int) -> None:
  """Writes an official-format .pth ({'epoch', 'state_dict'} with `module.` keys) or safetensors."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if fmt == 'safetensors':
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file(state_dict, path)
    return
  torch = _import_torch()
  # semseg's test.py loads into nn.DataParallel(model), hence the `module.` prefix.
  torch.save({'epoch': epoch, 'state_dict': {'module.' + key: torch.from_numpy(np.array(value))
                                             for key, value in state_dict.items()}}, path)


def backbone_from_file(variables: nnx.State, path: str, fmt: str, *, deep_stem: bool
                       ) -> nnx.State:
  """`variables` with layer0..layer4 from an ImageNet ResNet file; the heads keep their values."""
  if fmt not in PRETRAINED_FORMATS:
    raise ValueError(f'{path}: format {fmt!r} is not an ImageNet backbone; use one of '
                     f'{PRETRAINED_FORMATS}')
  wants_deep = fmt == 'semseg-resnet'
  if deep_stem != wants_deep:
    raise ValueError(f'{path}: format {fmt} holds a {"deep" if wants_deep else "7x7"} stem but '
                     f'the model has config.model.deep_stem={deep_stem}')
  tensors, _ = read_tensors(path)
  return from_torch_state_dict(tensors, variables, backbone_only=True, source=f'{path} ({fmt})')


def import_weights(config, workdir: str, path: str, fmt: str) -> str:
  """Writes the weights of `path` as checkpoint 0 of `workdir`; returns the checkpoint path."""
  existing = checkpoint.all_steps(workdir)
  if existing:
    raise FileExistsError(f'{checkpoint.checkpoint_dir(workdir)} already has checkpoints '
                          f'{existing}; import into an empty --workdir')
  meta = {'source': os.path.abspath(path), 'format': fmt}

  def fresh_model():
    return create_model(config, rngs=nnx.Rngs(config.seed))

  if fmt in PRETRAINED_FORMATS:
    # The heads keep their random initialization.
    variables = checkpoint.model_variables(fresh_model())
    variables = backbone_from_file(variables, path, fmt, deep_stem=config.model.deep_stem)
  else:
    # Every variable comes from the file: the model's shapes are all it takes.
    tensors, extras = read_tensors(path)
    variables = from_torch_state_dict(
        tensors, checkpoint.model_variables(nnx.eval_shape(fresh_model)), source=path)
    # Kept only so that an export gives back the very same file.
    meta.update(extras)
    meta['num_batches_tracked'] = {key[:-len(_BATCHES_TRACKED)]: int(value)
                                   for key, value in tensors.items()
                                   if key.endswith(_BATCHES_TRACKED)}
  return checkpoint.save_model(workdir, 0, variables, meta)


def export_weights(config, workdir: str, path: str, fmt: str, step: int | None = None) -> int:
  """Writes checkpoint `step` (default latest) of `workdir` to `path`; returns the step."""
  loaded = checkpoint.load_model(config, workdir, step)
  state_dict = to_torch_state_dict(checkpoint.model_variables(loaded.model), loaded.meta.get('num_batches_tracked'))
  # Counted in steps here; an imported official checkpoint gives its epoch back.
  write_tensors(state_dict, path, fmt, epoch=loaded.meta.get('epoch', loaded.step))
  return loaded.step



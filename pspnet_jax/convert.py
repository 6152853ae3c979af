"""Weights in and out of other frameworks: the official PyTorch PSPNet, ImageNet ResNets, safetensors.

Our parameter paths mirror PyTorch's module tree, so every format is one name
table: a few regex renames (the Flax module name -> the index in the official
`nn.Sequential`) and the leaf names (kernel -> weight, mean -> running_mean,
...). Kernels are HWIO here and OIHW in PyTorch.

  python -m pspnet_jax.convert --config=configs/ade20k.py --workdir=DIR \\
      --import_path=train_epoch_100.pth --format=semseg
  python -m pspnet_jax.convert --config=configs/ade20k.py --workdir=DIR \\
      --export_path=pspnet50.pth --format=semseg [--step=N]

Reading or writing `.pth` needs PyTorch (only here, never in training);
safetensors files need no torch.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from pspnet_jax import checkpoint, configuration
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

IMPORT_FORMATS = ('semseg', 'safetensors', 'semseg-resnet', 'torchvision-resnet')
EXPORT_FORMATS = ('semseg', 'safetensors')


def torch_name(path: str, renames) -> str:
  """'layer0.bn1.mean' -> 'layer0.1.running_mean' (with the semseg renames)."""
  module, leaf = path.rsplit('.', 1)
  name = module + '.'
  for pattern, replacement in renames:
    name = re.sub(pattern, replacement, name)
  return name + _LEAF_NAMES[leaf]


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
    name = torch_name(path, _SEMSEG_RENAMES)
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


def load_pretrained_backbone(model: nnx.Module, path: str, fmt: str) -> None:
  """Initializes layer0..layer4 of `model` in place from ImageNet ResNet weights; heads untouched."""
  wants_deep = fmt == 'semseg-resnet'
  if model.layer0.deep != wants_deep:
    raise ValueError(f'{path}: format {fmt} holds a {"deep" if wants_deep else "7x7"} stem but '
                     f'the model has config.model.deep_stem={model.layer0.deep}')
  tensors, _ = read_tensors(path)
  variables = checkpoint.model_variables(model)
  nnx.update(model, from_torch_state_dict(tensors, variables, backbone_only=True,
                                          source=f'{path} ({fmt})'))


def init_model(config, *, rngs: nnx.Rngs) -> nnx.Module:
  """A fresh model for training: random init, backbone from `config.model.pretrained` when set."""
  model = create_model(config, rngs=rngs)
  if config.model.pretrained:
    load_pretrained_backbone(model, config.model.pretrained, config.model.pretrained_format)
  return model


def import_weights(config, workdir: str, path: str, fmt: str) -> str:
  """Writes the weights of `path` as checkpoint 0 of `workdir`; returns the checkpoint path."""
  existing = checkpoint.all_steps(workdir)
  if existing:
    raise FileExistsError(f'{checkpoint.checkpoint_dir(workdir)} already has checkpoints '
                          f'{existing}; import into an empty --workdir')
  model = create_model(config, rngs=nnx.Rngs(config.seed))
  meta = {'source': os.path.abspath(path), 'format': fmt}
  if fmt in ('semseg-resnet', 'torchvision-resnet'):
    load_pretrained_backbone(model, path, fmt)
  else:
    tensors, extras = read_tensors(path)
    variables = from_torch_state_dict(tensors, checkpoint.model_variables(model), source=path)
    nnx.update(model, variables)
    # Kept only so that an export gives back the very same file.
    meta.update(extras)
    meta['num_batches_tracked'] = {key[:-len(_BATCHES_TRACKED)]: int(value)
                                   for key, value in tensors.items()
                                   if key.endswith(_BATCHES_TRACKED)}
  return checkpoint.save_model(workdir, 0, checkpoint.model_variables(model), meta)


def export_weights(config, workdir: str, path: str, fmt: str, step: int | None = None) -> int:
  """Writes checkpoint `step` (default latest) of `workdir` to `path`; returns the step."""
  abstract = nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0)))
  variables, step, meta = checkpoint.restore_model(workdir, checkpoint.model_variables(abstract),
                                                   step)
  state_dict = to_torch_state_dict(variables, meta.get('num_batches_tracked'))
  # Counted in steps here; an imported official checkpoint gives its epoch back.
  write_tensors(state_dict, path, fmt, epoch=meta.get('epoch', step))
  return step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  config = _CONFIG.value
  configuration.validate(config)
  if bool(_IMPORT.value) == bool(_EXPORT.value):
    raise app.UsageError('give exactly one of --import_path and --export_path')
  if _IMPORT.value:
    if _FORMAT.value not in IMPORT_FORMATS:
      raise app.UsageError(f'--format={_FORMAT.value} cannot be imported; use one of {IMPORT_FORMATS}')
    where = import_weights(config, _WORKDIR.value, _IMPORT.value, _FORMAT.value)
    logging.info('imported %s (%s) as %s', _IMPORT.value, _FORMAT.value, where)
  else:
    if _FORMAT.value not in EXPORT_FORMATS:
      raise app.UsageError(f'--format={_FORMAT.value} cannot be exported; use one of {EXPORT_FORMATS}')
    step = export_weights(config, _WORKDIR.value, _EXPORT.value, _FORMAT.value, _STEP.value)
    logging.info('exported step %d of %s to %s (%s)', step, _WORKDIR.value, _EXPORT.value,
                 _FORMAT.value)


def _define_flags():
  """The command-line flags, defined only when run as a program: training imports this module."""
  global _CONFIG, _WORKDIR, _IMPORT, _EXPORT, _FORMAT, _STEP  # pylint: disable=global-statement
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (ml_collections).',
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory whose checkpoints are read/written.')
  _IMPORT = flags.DEFINE_string('import_path', None, 'Weights file to import as checkpoint 0.')
  _EXPORT = flags.DEFINE_string('export_path', None, 'File to write the checkpoint to.')
  _FORMAT = flags.DEFINE_string('format', 'semseg', f'import: {IMPORT_FORMATS}; export: '
                                f'{EXPORT_FORMATS}.')
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  _define_flags()
  app.run(main)

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
"""

import collections
import contextlib
import functools
import os
import re
import tempfile
import uuid

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from pspnet_jax import checkpoint, paths
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
  converted = collections.Counter()  # dtype name -> how many tensors were cast to float32

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
    raise ValueError(_format_problems(f'{source} do not fit the model of the config '
                                      '(check model.backbone, model.deep_stem, model.use_ppm, '
                                      'data.num_classes and --format)', problems))
  if converted:
    # Not an error (half-precision releases are common), but the extra precision of an fp32
    # training is not in the file, and an export writes float32, not the file's dtype.
    logging.warning('%s: %s of %d tensors converted to float32 (the dtype of the model)', source,
                    ', '.join(f'{count} {dtype}' for dtype, count in sorted(converted.items())),
                    len(used))
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
                ) -> ValueError:
  """The error for a file a reader refused: the path, its size and a reason that is never empty
  (torch.load of an empty file raises an EOFError without a message)."""
  size = epath.Path(path).stat().length
  if size == 0:
    reason = 'the file is empty'
  elif diagnosis:
    reason = diagnosis
  else:
    reason = f'{type(error).__name__}: {error}' if str(error) else type(error).__name__
  return ValueError(f'{path} is not a readable {what} ({size} bytes): {reason}')


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
      raise ValueError(f'{path}: tensor {key!r} has dtype {entry["dtype"]}, which this reader '
                       f'does not take ({sorted(_SAFETENSORS_DTYPES)})')
    dtype = _SAFETENSORS_DTYPES[entry['dtype']]
    tensors[key] = np.frombuffer(entry['data'], dtype).reshape(entry['shape'])
  return tensors


def _read_torch(path: str) -> tuple[dict[str, np.ndarray], dict]:
  torch = _import_torch()
  try:
    with epath.Path(path).open('rb') as file:
      loaded = torch.load(file, map_location='cpu', weights_only=True)
  except Exception as error:  # pickle, zip and torch errors alike mean the same here
    raise _unreadable(path, 'PyTorch checkpoint', error, _torch_file_diagnosis(path)) from error
  extras = {}
  if isinstance(loaded, dict) and isinstance(loaded.get('state_dict'), dict):
    if 'epoch' in loaded:
      extras['epoch'] = int(loaded['epoch'])
    loaded = loaded['state_dict']
  if not isinstance(loaded, dict):
    raise ValueError(f'{path} holds a {type(loaded).__name__}, not a state_dict')
  tensors = {}
  for key, value in loaded.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f'{path}: entry {key!r} is a {type(value).__name__}, not a tensor')
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
      # numpy has no bfloat16: the same bits as jax's, cast to float32 with the others later.
      tensors[key] = value.view(torch.int16).numpy().view(jnp.bfloat16)
      continue
    try:
      tensors[key] = value.numpy()
    except TypeError as error:  # float8 and other dtypes numpy cannot hold
      raise ValueError(f'{path}: entry {key!r} has dtype {value.dtype}: {error}') from error
  return tensors, extras


def read_tensors(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """A .pth (official checkpoint or bare state_dict) or .safetensors file -> (numpy tensors, extras).

  `module.` prefixes (DataParallel / DistributedDataParallel) are stripped;
  extras holds the official checkpoint's `epoch` when present. Tensors keep
  the file's dtype (bfloat16 as jax's); a file that cannot be read raises a
  ValueError that names it and says why.
  """
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f'no weights file at {path}')
  if path.endswith('.safetensors'):
    raw, extras = _read_safetensors(path), {}
  else:
    raw, extras = _read_torch(path)
  tensors = {key.removeprefix('module.'): value for key, value in raw.items()}
  return tensors, extras


def refuse_existing(path: str, overwrite: bool) -> None:
  # lexists: a dangling symlink is a name taken too.
  exists = epath.Path(path).exists() if paths.is_remote(path) else os.path.lexists(path)
  if not overwrite and exists:
    raise FileExistsError(f'{path} already exists; give --overwrite (overwrite=True) to '
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
                  overwrite: bool = False) -> None:
  """Writes an official-format .pth ({'epoch', 'state_dict'} with `module.` keys) or safetensors.

  Atomically (see `write_atomically`); an existing `path` is refused unless `overwrite`.
  """
  if fmt == 'safetensors':
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    write = functools.partial(save_file, state_dict)
  else:
    torch = _import_torch()
    # semseg's test.py loads into nn.DataParallel(model), hence the `module.` prefix.
    write = functools.partial(torch.save, {
        'epoch': epoch,
        'state_dict': {'module.' + key: torch.from_numpy(np.array(value))
                       for key, value in state_dict.items()}})
  write_atomically(path, write, overwrite=overwrite)


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
  meta = {'source': paths.absolute(path), 'format': fmt}

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


def export_weights(config, workdir: str, path: str, fmt: str, step: int | None = None, *,
                   overwrite: bool = False) -> int:
  """Writes checkpoint `step` (default latest) of `workdir` to `path`; returns the step.

  An existing `path` is refused unless `overwrite`, and the file appears only complete.
  """
  # Before the restore, so that a refusal costs nothing; write_tensors checks again.
  refuse_existing(path, overwrite)
  loaded = checkpoint.load_model(config, workdir, step)
  state_dict = to_torch_state_dict(checkpoint.model_variables(loaded.model),
                                   loaded.meta.get('num_batches_tracked'))
  # Counted in steps here; an imported official checkpoint gives its epoch back.
  write_tensors(state_dict, path, fmt, epoch=loaded.meta.get('epoch', loaded.step),
                overwrite=overwrite)
  return loaded.step



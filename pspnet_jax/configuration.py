"""Config checks: every command validates at start, so a bad value fails by name before any
work; a resumed run compares its config with the one it was started with (`resume_changes`)."""

import importlib.util
import json
import os

import ml_collections
from etils import epath

from pspnet_jax.data.transforms import BATCH_DTYPES, RECIPES
from pspnet_jax.errors import UserError
from pspnet_jax.inference import PROTOCOLS
from pspnet_jax.losses import LOSS_NORMALIZERS
from pspnet_jax.models import DTYPES
from pspnet_jax.models.layers import PRECISIONS
from pspnet_jax.models.cascadepsp import REFINEMENT_BACKBONES
from pspnet_jax.models.resnet import BACKBONES, REMAT_POLICIES
from pspnet_jax.optim import LR_SCALINGS, OPTIMIZERS, SCHEDULES
from pspnet_jax.refinement import MIN_LOCAL_L
from pspnet_jax.weights import PRETRAINED_FORMATS


# configs/ beside pspnet_jax/: config files given relative to the repository resolve from any
# directory.
_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config of `spec` for use from Python: 'FILE.py[:VARIANT]' as --config takes it (FILE
  relative to the current directory or to this repository, e.g. 'configs/ade20k.py:arch=mmseg'),
  or a run's 'WORKDIR/config.json' (the config a training run started with)."""
  if spec.endswith('.json'):
    return ml_collections.ConfigDict(json.loads(epath.Path(spec).read_text()))
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path) and os.path.isfile(os.path.join(_REPOSITORY, path)):
    path = os.path.join(_REPOSITORY, path)
  if not os.path.isfile(path):
    raise UserError(f'no config file {path} (relative to the current directory or to '
                    f'{_REPOSITORY})')
  module_spec = importlib.util.spec_from_file_location('_pspnet_jax_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def workdir_config(workdir: str, config=None, *, example: str = 'configs/FILE.py'):
  """`config` validated, or else the validated `config.json` a training run writes in
  `workdir` (an imported checkpoint has none: the error says to pass the config file, for
  instance `example`)."""
  if config is None:
    saved = epath.Path(workdir) / 'config.json'
    if not saved.exists():
      raise UserError(f'{workdir} has no config.json (not a training run: an imported '
                      f"checkpoint?); pass config=configuration.load_config('{example}')")
    config = load_config(str(saved))
  validate(config)
  return config


def _require(condition: bool, key: str, value, expectation: str) -> None:
  if not condition:
    raise UserError(f'config.{key}={value!r}: {expectation}')


# config.task: what a run trains (configs/default.py).
TASKS = ('segmentation', 'refinement')
# The refinement module's loss weights: one per output, in the official order
# (out_224, out_28, out_56, out_28_2, out_28_3, out_56_2; losses.REFINEMENT_OUTPUTS).
_REFINEMENT_LOSS_WEIGHTS = ('ce_weights', 'l1_weights', 'l2_weights')


def validate(config) -> None:
  """Raises UserError (a ValueError) naming the first key whose value cannot work."""
  data, model = config.data, config.model
  _require(config.task in TASKS, 'task', config.task, f'must be one of {TASKS}')
  if config.task == 'refinement':
    _validate_refinement(config)
  _require(isinstance(data.num_classes, int) and data.num_classes >= 1, 'data.num_classes',
           data.num_classes, 'must be a positive integer')
  _require(0 <= data.ignore_label and data.ignore_label >= data.num_classes, 'data.ignore_label',
           data.ignore_label, f'must be >= data.num_classes ({data.num_classes})')
  _require(data.crop_size >= 33, 'data.crop_size', data.crop_size, 'must be at least 33')
  _require(data.crop_width == 0 or data.crop_width >= 33 and data.augment.recipe == 'mmseg',
           'data.crop_width', data.crop_width, 'must be 0 (square crops) or, with '
           "data.augment.recipe='mmseg', at least 33")
  _require(data.batch_dtype in BATCH_DTYPES, 'data.batch_dtype', data.batch_dtype,
           f'must be one of {BATCH_DTYPES}')
  _require(isinstance(data.worker_count, int) and data.worker_count >= -1, 'data.worker_count',
           data.worker_count, 'must be -1 (by the cores), 0 (threads) or a number of processes')
  _require(data.augment.recipe in RECIPES or config.task == 'refinement', 'data.augment.recipe',
           data.augment.recipe, f'must be one of {sorted(RECIPES)}')
  _require(model.backbone in BACKBONES, 'model.backbone', model.backbone,
           f'must be one of {sorted(BACKBONES)}')
  _require(model.output_stride in (8, 16, 32), 'model.output_stride', model.output_stride,
           'must be 8, 16 or 32')
  _require(len(model.ppm_bins) > 0 and all(isinstance(b, int) and b >= 1 for b in model.ppm_bins),
           'model.ppm_bins', model.ppm_bins, 'must be a non-empty tuple of positive integers')
  for key in ('head_channels', 'aux_channels'):
    _require(isinstance(model[key], int) and model[key] >= 1, f'model.{key}', model[key],
             'must be a positive integer')
  _require(0.0 <= model.dropout < 1.0, 'model.dropout', model.dropout, 'must be in [0, 1)')
  _require(model.zoom_factor in (1, 2, 4, 8), 'model.zoom_factor', model.zoom_factor,
           'must be 1, 2, 4 or 8')
  _require(model.align_corners or model.zoom_factor in (1, 8), 'model.zoom_factor',
           model.zoom_factor, 'must be 1 or 8 with model.align_corners=False (the logits are '
           'resized to the input size)')
  _require(len(model.stem_widths) == 3 and all(isinstance(w, int) and w >= 1
                                               for w in model.stem_widths),
           'model.stem_widths', model.stem_widths, 'must be three positive integers')
  _require(model.aux_weight >= 0.0, 'model.aux_weight', model.aux_weight, 'must be >= 0')
  _require(model.loss_normalizer in LOSS_NORMALIZERS, 'model.loss_normalizer',
           model.loss_normalizer, f'must be one of {LOSS_NORMALIZERS}')
  _require(model.dtype in DTYPES, 'model.dtype', model.dtype, f'must be one of {sorted(DTYPES)}')
  _require(model.logits_dtype in DTYPES, 'model.logits_dtype', model.logits_dtype,
           f'must be one of {sorted(DTYPES)}')
  _require(model.resize_precision in PRECISIONS, 'model.resize_precision', model.resize_precision,
           f'must be one of {sorted(PRECISIONS)}')
  _require(model.remat in REMAT_POLICIES, 'model.remat', model.remat,
           f'must be one of {REMAT_POLICIES}')
  _require(model.pretrained_format in PRETRAINED_FORMATS, 'model.pretrained_format',
           model.pretrained_format, f'must be one of {PRETRAINED_FORMATS}')
  optim = config.optim
  _require(optim.name in OPTIMIZERS, 'optim.name', optim.name, f'must be one of {OPTIMIZERS}')
  _require(optim.schedule in SCHEDULES, 'optim.schedule', optim.schedule,
           f'must be one of {SCHEDULES}')
  _require(all(isinstance(m, int) and m >= 1 for m in optim.milestones)
           and list(optim.milestones) == sorted(optim.milestones), 'optim.milestones',
           optim.milestones, 'must be increasing positive step numbers')
  _require(0 < optim.gamma <= 1, 'optim.gamma', optim.gamma, 'must be in (0, 1]')
  for key in ('adam_b1', 'adam_b2'):
    _require(0 <= optim[key] < 1, f'optim.{key}', optim[key], 'must be in [0, 1)')
  _require(optim.adam_eps > 0, 'optim.adam_eps', optim.adam_eps, 'must be > 0')
  for key in ('base_lr', 'head_lr_mult', 'weight_decay', 'end_lr'):
    _require(optim[key] >= 0, f'optim.{key}', optim[key], 'must be >= 0')
  _require(0 <= optim.momentum < 1, 'optim.momentum', optim.momentum, 'must be in [0, 1)')
  _require(optim.power > 0, 'optim.power', optim.power, 'must be > 0')
  _require(optim.lr_scaling in LR_SCALINGS, 'optim.lr_scaling', optim.lr_scaling,
           f'must be one of {LR_SCALINGS}')
  _require(isinstance(optim.reference_batch_size, int) and optim.reference_batch_size >= 1,
           'optim.reference_batch_size', optim.reference_batch_size, 'must be a positive integer')
  _require(isinstance(optim.warmup_steps, int) and optim.warmup_steps >= 0, 'optim.warmup_steps',
           optim.warmup_steps, 'must be a non-negative integer')
  _require(optim.trust_coefficient > 0, 'optim.trust_coefficient', optim.trust_coefficient,
           'must be > 0')
  train = config.train
  for key in ('batch_size', 'log_every', 'checkpoint_every', 'max_nonfinite_steps'):
    _require(isinstance(train[key], int) and train[key] >= 1, f'train.{key}', train[key],
             'must be a positive integer')
  _require(train.num_steps > 0 or train.num_epochs > 0, 'train.num_epochs', train.num_epochs,
           'must be positive when train.num_steps is 0')
  evaluation = config.eval
  _require(evaluation.batch_size >= 1, 'eval.batch_size', evaluation.batch_size,
           'must be a positive integer')
  _require(evaluation.protocol in PROTOCOLS, 'eval.protocol', evaluation.protocol,
           f'must be one of {PROTOCOLS}')
  _require(evaluation.crop_size >= 33, 'eval.crop_size', evaluation.crop_size,
           'must be at least 33')
  _require(evaluation.base_size >= 1, 'eval.base_size', evaluation.base_size,
           'must be a positive integer')
  for key in ('mmseg_scale', 'mmseg_crop', 'mmseg_stride'):
    _require(len(evaluation[key]) == 2 and all(isinstance(side, int) and side >= 1
                                               for side in evaluation[key]),
             f'eval.{key}', evaluation[key], 'must be two positive integers')
  _require(len(evaluation.scales) > 0 and all(s > 0 for s in evaluation.scales), 'eval.scales',
           evaluation.scales, 'must be a non-empty tuple of positive numbers')


def _validate_refinement(config) -> None:
  """The keys only CascadePSP's refinement runs have (configs/cascadepsp.py)."""
  for section in ('refine', 'loss'):
    _require(section in config, section, None, "is missing: refinement configs start from "
             "configs/cascadepsp.py")
  _require(config.data.num_classes == 2, 'data.num_classes', config.data.num_classes,
           'must be 2 (background, foreground) for refinement')
  _require(config.model.backbone in REFINEMENT_BACKBONES, 'model.backbone',
           config.model.backbone, f'must be one of {REFINEMENT_BACKBONES} for refinement')
  widths = config.model.refine_widths
  _require(len(widths) == 4 and all(isinstance(w, int) and w >= 1 for w in widths),
           'model.refine_widths', widths, 'must be four positive integers')
  _require(not config.eval.at_end_of_training, 'eval.at_end_of_training',
           config.eval.at_end_of_training, 'must be False for refinement (its evaluation is the '
           'refinement of data.eval_split at every train.eval_every)')
  _require(config.data.augment.recipe == 'cascadepsp', 'data.augment.recipe',
           config.data.augment.recipe, "must be 'cascadepsp' for refinement")
  _require(config.data.crop_size % 8 == 0, 'data.crop_size', config.data.crop_size,
           'must be a multiple of 8 for the refinement module')
  refine = config.refine
  _require(isinstance(refine.L, int) and refine.L >= MIN_LOCAL_L, 'refine.L', refine.L,
           f'must be an integer >= {MIN_LOCAL_L} (the local step advances its L x L patches by '
           'L // 2 - 32 pixels)')
  _require(isinstance(refine.batch_size, int) and refine.batch_size >= 0, 'refine.batch_size',
           refine.batch_size, 'must be 0 (the device count) or a positive integer')
  loss = config.loss
  for key in _REFINEMENT_LOSS_WEIGHTS:
    _require(len(loss[key]) == 6 and all(w >= 0 for w in loss[key]), f'loss.{key}', loss[key],
             'must be six weights >= 0')
  _require(loss.grad_weight >= 0, 'loss.grad_weight', loss.grad_weight, 'must be >= 0')


# Keys a resumed run may change freely: how often it logs, saves and evaluates, where the
# prepared data lives, how the loader is parallelized (the batches do not depend on it),
# how evaluation runs, and the pretrained file and its format (read only by
# a fresh run).
# Every other key changes what the run computes.
RESUME_FREE_KEYS = ('train.log_every', 'train.checkpoint_every', 'train.eval_every',
                    'train.max_nonfinite_steps', 'data.data_dir', 'data.worker_count',
                    'data.prefetch', 'data.eval_split', 'eval.', 'model.pretrained', 'refine.')


# Keys added after checkpoints were first written, with the value that computes what the
# code computed before the key existed: a checkpoint whose config lacks such a key resumes
# under that value as unchanged. Every new key that changes the computation goes here.
ADDED_KEYS = {'data.batch_dtype': 'float32', 'model.logits_dtype': 'float32',
              'model.resize_precision': 'highest', 'model.remat': 'none',
              'optim.lr_scaling': 'none', 'optim.reference_batch_size': 16, 'optim.warmup_steps': 0,
              'optim.trust_ratio': False, 'optim.trust_coefficient': 0.001,
              'model.stem_widths': [64, 64, 128], 'model.contract_dilation': False,
              'model.ppm_align_corners': True, 'model.align_corners': True,
              'model.dilate_basic_conv2': True, 'model.head_channels': 512,
              'model.aux_channels': 256, 'data.crop_width': 0, 'model.loss_normalizer': 'valid',
              'optim.end_lr': 0.0, 'task': 'segmentation', 'optim.name': 'sgd',
              'optim.schedule': 'poly', 'optim.milestones': [], 'optim.gamma': 0.1,
              'optim.adam_b1': 0.9, 'optim.adam_b2': 0.999, 'optim.adam_eps': 1e-8}


def flatten_config(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten_config(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def resume_changes(saved: dict, config, allowed=()) -> list[str]:
  """The config's changes from `saved` (a checkpoint's config, as JSON) as 'key: old -> new'.

  Keys of RESUME_FREE_KEYS are not compared. Raises UserError naming every
  other changed key that `allowed` does not name, with the flag that allows
  them; returns the allowed changes, for the log.
  """
  current = flatten_config(json.loads(config.to_json()))
  unknown = sorted(set(allowed) - current.keys())
  if unknown:
    raise UserError(f'--allow_config_change names keys the config does not have: {unknown}')
  saved = {**ADDED_KEYS, **flatten_config(saved)}
  absent = '<absent>'
  changed = sorted(key for key in saved.keys() | current.keys()
                   if saved.get(key, absent) != current.get(key, absent)
                   and not key.startswith(RESUME_FREE_KEYS))
  refused = [key for key in changed if key not in allowed]
  describe = lambda key: f'{key}: {saved.get(key, absent)!r} -> {current.get(key, absent)!r}'
  if refused:
    raise UserError(
        'the config differs from the one the run was started with in keys that change what it '
        f'computes: {"; ".join(describe(key) for key in refused)}. Resume with the original '
        'values, start a new --workdir, or, if the change is intended (a longer schedule), '
        f'pass --allow_config_change={",".join(refused)}')
  return [describe(key) for key in changed]

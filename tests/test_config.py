"""Config files, variants and validation: every bad value fails by its key."""

import importlib
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from configs import default
from pspnet_jax import configuration
from pspnet_jax.data import registry
from pspnet_jax.models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('name,classes,crop,epochs,base_size,mmseg_scale', [
    ('ade20k', 150, 473, 100, 512, (2048, 512)), ('cityscapes', 19, 713, 200, 2048, (2048, 1024)),
    ('voc2012', 21, 473, 50, 512, (2048, 512))])
def test_dataset_configs_describe_the_official_recipe(name, classes, crop, epochs, base_size,
                                                      mmseg_scale):
  config = importlib.import_module(f'configs.{name}').get_config()
  configuration.validate(config)
  assert (config.data.name, config.data.num_classes, config.data.crop_size) == (name, classes, crop)
  # semseg's config/<dataset>/*.yaml: batch 16, base lr 0.01, poly 0.9, these epochs and sizes.
  assert (config.train.batch_size, config.train.num_epochs, config.train.num_steps) == (16, epochs, 0)
  assert (config.optim.base_lr, config.optim.power, config.optim.head_lr_mult) == (0.01, 0.9, 10)
  assert (config.eval.base_size, config.eval.crop_size) == (base_size, crop)
  augment = config.data.augment
  assert (augment.scale_min, augment.scale_max, augment.rotate_degrees) == (0.5, 2.0, 10.0)
  # mmseg's _base_/datasets/<dataset>.py RandomResize scale, for recipe='mmseg'.
  assert tuple(augment.mmseg_base_scale) == mmseg_scale
  assert config.model.backbone == 'resnet50' and config.model.deep_stem
  assert config.model.output_stride == 8 and tuple(config.model.ppm_bins) == (1, 2, 3, 6)
  assert config.model.aux_weight == 0.4 and config.data.ignore_label == 255
  deeper = importlib.import_module(f'configs.{name}').get_config('backbone=101')
  assert deeper.model.backbone == 'resnet101'
  model = nnx.eval_shape(lambda: create_model(deeper, rngs=nnx.Rngs(0)))
  assert model.cls.classifier.kernel.shape == (1, 1, 512, classes)


@pytest.mark.parametrize('name', [n for n, d in registry.DATASETS.items() if d.recipe])
def test_dataset_configs_take_classes_and_recipe_from_the_registry(name):
  dataset = registry.get(name)
  assert dataset.config_file == f'configs/{name}.py'
  config = importlib.import_module(f'configs.{name}').get_config()
  recipe = dataset.recipe
  assert config.data.num_classes == len(dataset.class_names)
  assert (config.data.crop_size, config.eval.crop_size) == (recipe.crop_size, recipe.crop_size)
  assert config.eval.base_size == recipe.eval_base_size
  assert config.train.num_epochs == recipe.num_epochs
  assert tuple(config.data.augment.mmseg_base_scale) == recipe.mmseg_base_scale


def test_defaults_are_ade20ks_recipe():
  assert default.get_config().to_dict() == default.for_dataset('ade20k', None).to_dict()
  with pytest.raises(ValueError, match="'folder' has no official recipe"):
    default.for_dataset('folder', None)


@pytest.mark.parametrize('file,arg', [
    ('ade20k', 'arch=mmseg'), ('ade20k', 'arch=mmseg,backbone=101,eval=ms'),
    ('voc2012', 'arch=mmseg'), ('cityscapes', 'arch=mmseg'),
    ('cityscapes', 'arch=mmseg,crop=512x1024,backbone=18')])
def test_mmseg_presets_validate_and_build_mmsegs_model(file, arg):
  config = importlib.import_module(f'configs.{file}').get_config(arg)
  configuration.validate(config)
  assert config.eval.protocol.startswith('mmseg_') and config.model.align_corners is False
  if file == 'ade20k' and config.model.backbone == 'resnet50':
    # mmseg 1.2.2's pspnet_r50-d8 ADE20K model: 49,076,364 parameters (mmseg-pspnet.md).
    model = nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0)))
    assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == 49_076_364


@pytest.mark.parametrize('arg,message', [('backbone=77', 'backbone=77'), ('depth=50', 'depth'),
                                         ('backbone', 'not key=value'),
                                         ('arch=detectron', 'arch=detectron'),
                                         ('arch=mmseg,crop=769', 'crop=769'),
                                         ('crop=512', 'arch=mmseg presets')])
def test_bad_variants_are_named(arg, message):
  with pytest.raises(ValueError, match=message):
    default.for_dataset('ade20k', arg)


@pytest.mark.parametrize('key,value', [
    ('model.backbone', 'resnet51'), ('model.output_stride', 4), ('model.dtype', 'float16'),
    ('model.dropout', 1.5), ('data.num_classes', 0), ('data.ignore_label', 100),
    ('model.ppm_bins', ()), ('model.pretrained_format', 'onnx'), ('model.zoom_factor', 3),
    ('train.batch_size', 0), ('train.log_every', 0), ('train.num_epochs', 0),
    ('eval.batch_size', 0), ('data.augment.recipe', 'autoaugment'),
    ('optim.lr_scaling', 'cube'), ('optim.reference_batch_size', 0), ('optim.warmup_steps', -1),
    ('optim.trust_coefficient', 0.0)])
def test_validation_names_the_bad_key(key, value):
  config = default.get_config()
  section, field = key.rsplit('.', 1)
  config[section][field] = value
  with pytest.raises(ValueError, match=f'config.{key}='):
    configuration.validate(config)


@pytest.mark.slow
def test_command_line_override_is_validated():
  result = subprocess.run(
      [sys.executable, '-m', 'pspnet_jax.convert', '--config=configs/ade20k.py',
       '--config.model.output_stride=4', '--workdir=/tmp/unused', '--export_path=/tmp/x.pth'],
      cwd=REPO, capture_output=True, text=True)
  assert result.returncode != 0
  assert 'config.model.output_stride=4' in result.stderr

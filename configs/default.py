"""The config schema: every key pspnet_jax reads, with its default and meaning.

Dataset files (`ade20k.py`, `cityscapes.py`, `voc2012.py`) start from
`get_config()` here and change what their recipe changes. Any key can be
overridden on the command line: `--config.model.backbone=resnet101`.
"""

import ml_collections

BACKBONE_DEPTHS = (18, 34, 50, 101, 152)


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Seeds parameter initialization (and, later, data order and dropout).
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # Dataset name: ade20k | cityscapes | voc2012 (and synthetic, own folders, later).
  config.data.name = 'ade20k'
  # TFDS data directory; None uses TFDS's default (~/tensorflow_datasets).
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  # Training crop (square, 8k+1 as in the official code: 473 or 713).
  config.data.crop_size = 473
  # Number of classes the model predicts.
  config.data.num_classes = 150
  # Label value that is ignored by the loss and the metrics.
  config.data.ignore_label = 255

  config.model = ml_collections.ConfigDict()
  # Backbone: resnet18 | resnet34 | resnet50 | resnet101 | resnet152.
  config.model.backbone = 'resnet50'
  # True: semseg's deep stem (three 3x3 convs); False: torchvision's 7x7 conv.
  config.model.deep_stem = True
  # Backbone output stride: 8 (dilated layer3/layer4, the paper), 16 or 32.
  config.model.output_stride = 8
  # Pyramid pooling module; False gives the dilated-FCN baseline of the paper's ablation.
  config.model.use_ppm = True
  # Pyramid bin sizes; each branch reduces channels to C / len(bins).
  config.model.ppm_bins = (1, 2, 3, 6)
  # Dropout2d rate before both classifiers.
  config.model.dropout = 0.1
  # Logits are upsampled to (H - 1) / 8 * zoom_factor + 1 (8: input size; 1: feature size).
  config.model.zoom_factor = 8
  # Weight of the auxiliary (layer3) loss in the total loss; 0 disables it.
  config.model.aux_weight = 0.4
  # Compute dtype: float32 or bfloat16 (parameters and BatchNorm statistics stay float32).
  config.model.dtype = 'float32'
  # ImageNet backbone weights to start from ('' = random init), read by
  # pspnet_jax.convert.init_model at the start of training: a .pth or .safetensors file.
  config.model.pretrained = ''
  # Layout of model.pretrained: semseg-resnet (deep stem, semseg's resnet50_v2.pth)
  # or torchvision-resnet (7x7 stem, torchvision's resnet50-*.pth).
  config.model.pretrained_format = 'semseg-resnet'

  config.optim = ml_collections.ConfigDict()
  # Learning rate of the backbone (layer0..layer4) at step 0; poly-decayed to 0.
  config.optim.base_lr = 0.01
  # The pyramid pooling and both heads learn this many times faster.
  config.optim.head_lr_mult = 10.0
  # Added to the gradient before momentum (PyTorch SGD), on every parameter.
  config.optim.weight_decay = 1e-4
  # SGD momentum (no dampening, no Nesterov).
  config.optim.momentum = 0.9
  # Exponent of the poly decay: lr(k) = base_lr * (1 - k / num_steps) ** power.
  config.optim.power = 0.9
  return config


def parse_variant(arg: str | None) -> dict:
  """'backbone=101,foo=bar' (the part after ':' in --config=file.py:ARG) -> {'backbone': '101', ...}."""
  if not arg:
    return {}
  variant = {}
  for item in arg.split(','):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'config variant {item!r} is not key=value (in {arg!r})')
    variant[key.strip()] = value.strip()
  return variant


def for_dataset(name: str, num_classes: int, crop_size: int,
                arg: str | None) -> ml_collections.ConfigDict:
  """The schema's defaults for dataset `name`, with the `backbone=<depth>` variant from `arg`."""
  config = get_config()
  config.data.name = name
  config.data.num_classes = num_classes
  config.data.crop_size = crop_size
  variant = parse_variant(arg)
  depth = variant.pop('backbone', None)
  if variant:
    raise ValueError(f'unknown config variant keys {sorted(variant)}; known: backbone')
  if depth is not None:
    if not depth.isdigit() or int(depth) not in BACKBONE_DEPTHS:
      raise ValueError(f'backbone={depth}: choose one of {BACKBONE_DEPTHS}')
    config.model.backbone = f'resnet{depth}'
  return config

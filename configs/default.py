"""The config schema: every key pspnet_jax reads, with its default and meaning.

The defaults are ADE20K's official recipe. Dataset files (`ade20k.py`,
`cityscapes.py`, `voc2012.py`) are `for_dataset(name)`: the same schema with
that dataset's classes and recipe, from `pspnet_jax.data.registry`. Any key can
be overridden on the command line: `--config.model.backbone=resnet101`.
"""

import ml_collections

from pspnet_jax import architectures
from pspnet_jax.data import labels, registry

BACKBONE_DEPTHS = (18, 34, 50, 101, 152)
# semseg's multi-scale evaluation (config/*/*.yaml: scales); mmseg's TTA img_ratios too.
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def get_config() -> ml_collections.ConfigDict:
  """The schema with ADE20K's classes and official recipe as the defaults."""
  return _schema(registry.get('ade20k'))


def _schema(dataset: registry.Dataset) -> ml_collections.ConfigDict:
  """Every key, with `dataset`'s class count and official recipe where they depend on it."""
  recipe = dataset.recipe
  config = ml_collections.ConfigDict()
  # Seeds parameter initialization, data order, augmentation and dropout.
  config.seed = 0
  # What the run trains: 'segmentation' (PSPNet, these defaults) or 'refinement' (CascadePSP's
  # refinement module on image + coarse mask pairs, configs/cascadepsp.py).
  config.task = 'segmentation'

  config.data = ml_collections.ConfigDict()
  # Dataset name, a key of pspnet_jax.data.registry.DATASETS: synthetic | ade20k | cityscapes
  # | voc2012 | folder (see data.folder_dir).
  config.data.name = dataset.name
  # TFDS data directory; None uses TFDS's default (~/tensorflow_datasets).
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  # data.name = 'folder': the folder `python -m pspnet_jax.data.prepare --dataset=folder`
  # built from (its name picks the dataset in data_dir; layout in pspnet_jax/data/folder.py).
  config.data.folder_dir = ml_collections.config_dict.placeholder(str)
  # Training crop (square, 8k+1 as in the official code: 473 or 713).
  config.data.crop_size = recipe.crop_size
  # 0: square crops; else their width, for crop_size x crop_width crops (mmseg's recipe only,
  # e.g. Cityscapes 512 x 1024).
  config.data.crop_width = 0
  # Number of classes the model predicts (training refuses one that is not the dataset's).
  config.data.num_classes = dataset.num_classes
  # Label value that is ignored by the loss and the metrics.
  config.data.ignore_label = labels.IGNORE_LABEL
  # TFDS splits for training and for the periodic evaluation.
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  # Grain worker processes per host for augmentation (0: threads of the training
  # process; -1: by the host's cores, `pipeline.worker_count`). Free to change on a resume:
  # the batches do not depend on it.
  config.data.worker_count = -1
  # Training images on their way to the devices: float32 (normalized on the host: the
  # official augmentation to the last bit) or uint8 (RGB rounded to the nearest grey level
  # after augmentation, at most 0.0087 once normalized, and normalized by the training step
  # on the devices: a quarter of the bytes through the host and the host-to-device link;
  # the choice for accelerators, README's "Feeding them"). Labels travel as uint8 either way.
  config.data.batch_dtype = 'float32'
  # Batches each worker prepares ahead of the training step.
  config.data.prefetch = 2
  # Normalization, RGB order: (pixel - mean) / std; the ImageNet statistics times 255.
  config.data.mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
  config.data.std = (0.229 * 255, 0.224 * 255, 0.225 * 255)

  # The training augmentation (pspnet_jax.data.transforms.train_augment).
  config.data.augment = ml_collections.ConfigDict()
  # 'semseg': the official PSPNet chain (scale, rotate, blur, flip, crop; the keys
  # scale_min .. flip_prob); 'mmseg': mmsegmentation's (resize, crop with
  # cat_max_ratio, flip, photometric distortion, pad; flip_prob and the keys below it).
  config.data.augment.recipe = 'semseg'
  # RandScale: a uniform factor in [scale_min, scale_max] for both sides (cv2 linear / nearest).
  config.data.augment.scale_min = 0.5
  config.data.augment.scale_max = 2.0
  # RandRotate: an angle uniform in [-rotate_degrees, rotate_degrees] with probability
  # rotate_prob, around the centre; image border = mean, label border = ignore_label.
  config.data.augment.rotate_degrees = 10.0
  config.data.augment.rotate_prob = 0.5
  # RandomGaussianBlur: 5x5 kernel with probability blur_prob.
  config.data.augment.blur_prob = 0.5
  # RandomHorizontalFlip probability.
  config.data.augment.flip_prob = 0.5
  # mmseg RandomResize: the (long, short) box the image is fitted into keeping its aspect
  # ratio, times a ratio uniform in [mmseg_ratio_min, mmseg_ratio_max]; mmseg uses
  # (2048, 512) for ADE20K and VOC, (2048, 1024) for Cityscapes.
  config.data.augment.mmseg_base_scale = recipe.mmseg_base_scale
  config.data.augment.mmseg_ratio_min = 0.5
  config.data.augment.mmseg_ratio_max = 2.0
  # mmseg RandomCrop: up to 10 windows are drawn until no class covers cat_max_ratio
  # or more of the crop's non-ignored pixels; 1.0 takes the first window.
  config.data.augment.cat_max_ratio = 0.75
  # mmseg PhotoMetricDistortion, each part with probability 0.5: brightness shift in
  # [-brightness_delta, brightness_delta], contrast and saturation factors in
  # [min, max], hue shift an integer in [-hue_delta, hue_delta) (at least 1) on OpenCV's
  # 0..179 hue scale.
  config.data.augment.brightness_delta = 32.0
  config.data.augment.contrast_min = 0.5
  config.data.augment.contrast_max = 1.5
  config.data.augment.saturation_min = 0.5
  config.data.augment.saturation_max = 1.5
  config.data.augment.hue_delta = 18

  # The synthetic context dataset (data.name = 'synthetic'); built on first use.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.num_train = 400
  config.data.synthetic.num_validation = 100
  # Image sides are drawn uniformly from [min_size, max_size].
  config.data.synthetic.min_size = 129
  config.data.synthetic.max_size = 257

  config.model = ml_collections.ConfigDict()
  # Backbone: resnet18 | resnet34 | resnet50 | resnet101 | resnet152.
  config.model.backbone = 'resnet50'
  # True: semseg's deep stem (three 3x3 convs); False: torchvision's 7x7 conv.
  config.model.deep_stem = True
  # Widths of the deep stem's three convs; layer1's input width is the last. semseg:
  # (64, 64, 128); mmseg's ResNetV1c: (32, 32, 64) (the variant arch=mmseg).
  config.model.stem_widths = (64, 64, 128)
  # False: every 3x3 conv of a dilated stage has the stage's dilation (semseg); True: the
  # first block of each dilated stage has half of it (mmseg's contract_dilation: layer3
  # 1,2,2,.. and layer4 2,4,4 at output stride 8).
  config.model.contract_dilation = False
  # ResNet-18/34: whether a basic block's second 3x3 conv is dilated too (semseg True; mmseg's
  # BasicBlock dilates only the first, False).
  config.model.dilate_basic_conv2 = True
  # align_corners of the pyramid pooling's upsampling (semseg True, mmseg False).
  config.model.ppm_align_corners = True
  # The logits' upsampling. True (semseg): to (H - 1) / 8 * zoom_factor + 1 with
  # align_corners=True, inputs 8k+1. False (mmseg): to the input's size (zoom_factor 8), any
  # size, align_corners=False.
  config.model.align_corners = True
  # Backbone output stride: 8 (dilated layer3/layer4, the paper), 16 or 32.
  config.model.output_stride = 8
  # Pyramid pooling module; False gives the dilated-FCN baseline of the paper's ablation.
  config.model.use_ppm = True
  # Pyramid bin sizes; each branch reduces channels to C / len(bins).
  config.model.ppm_bins = (1, 2, 3, 6)
  # Hidden channels of the main head (its 3x3 conv) and of the aux head: semseg 512 and 256
  # for every backbone; mmseg's R18 configs 128 and 64.
  config.model.head_channels = 512
  config.model.aux_channels = 256
  # Dropout2d rate before both classifiers.
  config.model.dropout = 0.1
  # Logits are upsampled to (H - 1) / 8 * zoom_factor + 1 (8: input size; 1: feature size).
  config.model.zoom_factor = 8
  # Weight of the auxiliary (layer3) loss in the total loss; 0 disables it.
  config.model.aux_weight = 0.4
  # The pixel losses' sum is divided by the labelled pixels ('valid', semseg) or by all the
  # batch's pixels ('all', mmseg's CrossEntropyLoss default avg_non_ignore=False).
  config.model.loss_normalizer = 'valid'
  # Compute dtype: float32 or bfloat16 (parameters and BatchNorm statistics stay float32).
  config.model.dtype = 'float32'
  # Dtype of the upsampled logits, float32 or bfloat16. They are the step's largest
  # tensors (batch x crop^2 x classes, twice with the aux head, and their gradients);
  # bfloat16 halves them, and the loss still takes its softmax in float32. Evaluation and
  # prediction compute their probabilities in float32 either way. BENCHMARKS.md has the
  # planner's numbers and the loss difference.
  config.model.logits_dtype = 'float32'
  # Matmul precision of the resize and adaptive-pooling maps: highest (float32 inputs stay
  # exact, matching PyTorch) or default (TF32 on GPUs, one bfloat16 pass on TPUs: cheaper,
  # ~1e-3 relative on float32 inputs). bfloat16 inputs take one pass either way.
  config.model.resize_precision = 'highest'
  # Rematerialization of the backbone in training: none | block (keep each residual block's
  # input, recompute the block in the backward) | stage (keep each stage's input). Saves
  # activation memory for FLOPs (BENCHMARKS.md, planner table); the values agree to float
  # rounding (the recomputed forward may fuse differently).
  config.model.remat = 'none'
  # ImageNet backbone weights to start from ('' = random init): a .pth or .safetensors
  # file, a URL, or a known name (pspnet_jax/pretrained.py: torchvision:resnet50,
  # mmseg:resnet50_v1c, semseg:resnet50_v2, ...; downloaded once into ~/.cache/pspnet_jax,
  # checked), read once when a run starts fresh (a resumed run never reads it). The
  # official results start from semseg:resnet50_v2 / resnet101_v2 (semseg's initmodel).
  config.model.pretrained = ''
  # Layout of model.pretrained: semseg-resnet (deep stem, semseg's resnet50_v2.pth),
  # torchvision-resnet (7x7 stem, torchvision's resnet50-*.pth) or mmseg-resnet
  # (ResNetV1c, open-mmlab's resnet50_v1c, for arch=mmseg).
  config.model.pretrained_format = 'semseg-resnet'

  config.optim = ml_collections.ConfigDict()
  # 'sgd': torch.optim.SGD(momentum, weight_decay), semseg's. 'adam': torch.optim.Adam with
  # weight_decay added to the gradient (L2, not AdamW's decoupled decay), CascadePSP's.
  config.optim.name = 'sgd'
  # 'poly': base * (1 - k / num_steps) ** power (semseg); 'multistep': base * gamma ** (number
  # of milestones <= k), torch's MultiStepLR stepped once per iteration (CascadePSP).
  config.optim.schedule = 'poly'
  config.optim.milestones = ()
  config.optim.gamma = 0.1
  # Adam's moment decays and epsilon (optim.name='adam'), torch's defaults.
  config.optim.adam_b1 = 0.9
  config.optim.adam_b2 = 0.999
  config.optim.adam_eps = 1e-8
  # Learning rate of the backbone (layer0..layer4) at step 0; poly-decayed to 0.
  config.optim.base_lr = 0.01
  # The pyramid pooling and both heads learn this many times faster.
  config.optim.head_lr_mult = 10.0
  # Added to the gradient before momentum (PyTorch SGD), on every parameter.
  config.optim.weight_decay = 1e-4
  # SGD momentum (no dampening, no Nesterov).
  config.optim.momentum = 0.9
  # Exponent of the poly decay: lr(k) = (base_lr - end_lr) * (1 - k / num_steps) ** power
  # + end_lr.
  config.optim.power = 0.9
  # The backbone's rate at the end of the poly decay (the heads': head_lr_mult times it);
  # semseg 0, mmseg's PolyLR eta_min 1e-4.
  config.optim.end_lr = 0.0
  # Large global batches (pspnet_jax/optim.py; the README's "Large global batches"). The
  # defaults are the official optimizer unchanged.
  # Scaling of both groups' base rates with the global batch B (train.batch_size): none |
  # linear (x B / reference_batch_size) | sqrt (x sqrt(B / reference_batch_size)).
  config.optim.lr_scaling = 'none'
  # The global batch base_lr was tuned for (semseg: 16).
  config.optim.reference_batch_size = 16
  # Linear warmup: step k (0-based) runs at the poly rate times min(1, (k + 1) /
  # (warmup_steps + 1)); the poly decay still spans all steps. 0: none.
  config.optim.warmup_steps = 0
  # LARS's layer-wise trust ratio on the kernels (not BatchNorm, not biases): each kernel's
  # d = gradient + weight_decay * w is multiplied by trust_coefficient * ||w|| / ||d|| before
  # the momentum. Changes what base_lr means: retune it.
  config.optim.trust_ratio = False
  # LARS's eta (You et al. 2017; optax.lars's default).
  config.optim.trust_coefficient = 0.001

  config.train = ml_collections.ConfigDict()
  # Global batch size over all devices of all hosts (semseg: 16).
  config.train.batch_size = 16
  # Length of the run in steps; when 0, num_epochs * (train examples // batch_size).
  config.train.num_steps = 0
  config.train.num_epochs = recipe.num_epochs
  # Console / TensorBoard / metrics.jsonl every log_every steps.
  config.train.log_every = 50
  # Checkpoint every checkpoint_every steps (and always at the end).
  config.train.checkpoint_every = 1000
  # Evaluate on data.eval_split every eval_every steps (and at the end); 0: only at the end.
  config.train.eval_every = 5000
  # Stop after this many consecutive steps with a non-finite loss (each is skipped).
  config.train.max_nonfinite_steps = 10

  config.eval = ml_collections.ConfigDict()
  # Protocol of `python -m pspnet_jax.evaluate` and `pspnet_jax.predict` (pspnet_jax/inference.py),
  # judged at each image's original size: slide = semseg's tool/test.py: per scale, the long
  # side resized to scale * base_size, padded to at least crop_size with the mean colour,
  # crop_size windows with stride ceil(crop_size * 2/3), softmax averaged with the mirror's
  # (flip), over windows and over scales; whole = one window: the long side resized to
  # crop_size. The periodic evaluation during training is always a quicker whole check at
  # the network's resolution.
  config.eval.protocol = 'slide'
  config.eval.base_size = recipe.eval_base_size
  config.eval.crop_size = recipe.crop_size
  # Single scale (the default) or MULTI_SCALES (the config variant eval=ms).
  config.eval.scales = (1.0,)
  config.eval.flip = True
  # mmsegmentation's protocols (eval.protocol mmseg_whole / mmseg_slide, pspnet_jax/inference.py):
  # the uint8 image resized (keeping its aspect ratio, cv2 bilinear) to fit the (long, short)
  # box mmseg_scale; mmseg_whole: one pass over the whole resized image; mmseg_slide: windows
  # of mmseg_crop (H, W) every mmseg_stride (H, W), clamped to the image, never padded, logits
  # averaged. The logits are resized (bilinear, align_corners=False) to the original size. With
  # eval.scales other than (1.0,) or eval.flip, mmseg's test-time augmentation instead: each
  # scale rescales the original image by that factor, each with its mirror, softmax averaged.
  config.eval.mmseg_scale = recipe.mmseg_base_scale
  config.eval.mmseg_crop = (512, 512)
  config.eval.mmseg_stride = (341, 341)
  # Windows per evaluation step over all devices (the periodic evaluation: images per step;
  # padded at the end of the split).
  config.eval.batch_size = 16
  # True: training ends with this protocol on data.eval_split (after the periodic check of
  # the last step); rows eval_<protocol>/... in metrics.jsonl, results in WORKDIR/eval/.
  config.eval.at_end_of_training = False
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


# mmsegmentation's PSPNet R*-D8 configs (mmseg 1.2.2, configs/pspnet/pspnet_r50-d8_*), by
# dataset and crop: training crop, test Resize box, test mode (slide: crop and stride), the
# model zoo's longest schedule, global batch. (dataset, crop) -> settings.
_MMSEG_PRESETS = {
    ('ade20k', '512'): dict(crop=512, box=(2048, 512), mode='whole', steps=160_000, batch=16),
    ('voc2012', '512'): dict(crop=512, box=(2048, 512), mode='whole', steps=40_000, batch=16),
    ('cityscapes', '769'): dict(crop=769, box=(2049, 1025), mode='slide', window=(769, 769),
                                stride=(513, 513), steps=80_000, batch=8),
    ('cityscapes', '512x1024'): dict(crop=(512, 1024), box=(2048, 1024), mode='whole',
                                     steps=80_000, batch=8),
}
_MMSEG_DEFAULT_CROP = {'ade20k': '512', 'voc2012': '512', 'cityscapes': '769'}


def _mmseg_preset(config: ml_collections.ConfigDict, name: str, crop: str | None) -> None:
  """Switches `config` to mmsegmentation's PSPNet and its recipe (`mmseg-pspnet.md`)."""
  crop = crop or _MMSEG_DEFAULT_CROP.get(name)
  preset = _MMSEG_PRESETS.get((name, crop))
  if preset is None:
    known = sorted(c for n, c in _MMSEG_PRESETS if n == name)
    raise ValueError(f'arch=mmseg,crop={crop}: {name} has the mmseg crops {known}')
  model = config.model
  # ResNetV1c (deep stem 32-32-64, contract_dilation), align_corners=False everywhere.
  for key, value in architectures.MMSEG_ARCHITECTURE.items():
    model[key] = value
  model.loss_normalizer = 'all'
  model.pretrained_format = 'mmseg-resnet'
  # mmseg's configs start from open-mmlab://resnet{18,50,101}_v1c (downloaded on first use).
  depth = model.backbone.removeprefix('resnet')
  model.pretrained = f'mmseg:resnet{depth}_v1c' if depth in ('18', '50', '101') else ''
  if model.backbone == 'resnet18':  # pspnet_r18-d8: decode head 128, aux head 64 channels
    model.head_channels, model.aux_channels = 128, 64
  crop = preset['crop']
  config.data.crop_size, config.data.crop_width = (crop, 0) if isinstance(crop, int) else crop
  config.data.augment.recipe = 'mmseg'
  config.data.augment.mmseg_base_scale = preset['box']
  # schedule_*k: SGD lr 0.01, momentum 0.9, weight decay 5e-4, PolyLR power 0.9 to 1e-4,
  # one learning rate for all parameters.
  optim = config.optim
  optim.base_lr, optim.head_lr_mult, optim.weight_decay, optim.end_lr = 0.01, 1.0, 5e-4, 1e-4
  config.train.batch_size = preset['batch']
  config.train.num_steps = preset['steps']
  config.train.checkpoint_every = 8000
  config.train.eval_every = 16000
  evaluation = config.eval
  evaluation.protocol = f'mmseg_{preset["mode"]}'
  evaluation.mmseg_scale = preset['box']
  evaluation.mmseg_crop = preset.get('window', (512, 512))
  evaluation.mmseg_stride = preset.get('stride', evaluation.mmseg_stride)
  evaluation.flip = False


def for_dataset(name: str, arg: str | None) -> ml_collections.ConfigDict:
  """semseg's recipe for dataset `name` (registry), with the variants of `arg`:
  `backbone=<depth>`, `eval=ms` (multi-scale evaluation with flips; `eval=ss`, single
  scale, is the default) and `arch=mmseg` (mmsegmentation's PSPNet and recipe, with
  `crop=769` or `crop=512x1024` on Cityscapes), e.g.
  --config=configs/ade20k.py:backbone=101,eval=ms or configs/cityscapes.py:arch=mmseg.
  """
  dataset = registry.get(name)
  if dataset.recipe is None:
    raise ValueError(f'dataset {name!r} has no official recipe; start from get_config()')
  config = _schema(dataset)
  variant = parse_variant(arg)
  depth = variant.pop('backbone', None)
  scales = variant.pop('eval', 'ss')
  arch = variant.pop('arch', 'semseg')
  crop = variant.pop('crop', None)
  if variant:
    raise ValueError(f'unknown config variant keys {sorted(variant)}; known: backbone, eval, '
                     'arch, crop')
  if depth is not None:
    if not depth.isdigit() or int(depth) not in BACKBONE_DEPTHS:
      raise ValueError(f'backbone={depth}: choose one of {BACKBONE_DEPTHS}')
    config.model.backbone = f'resnet{depth}'
  if scales not in ('ss', 'ms'):
    raise ValueError(f'eval={scales}: choose ss (single scale) or ms (multi-scale)')
  if arch not in ('semseg', 'mmseg'):
    raise ValueError(f'arch={arch}: choose semseg (the official PSPNet) or mmseg')
  if arch == 'mmseg':
    _mmseg_preset(config, name, crop)
  elif crop is not None:
    raise ValueError('crop= selects one of the arch=mmseg presets; semseg crops are '
                     '--config.data.crop_size')
  if scales == 'ms':
    # mmseg's tta_pipeline has the same six factors (of the original size) and flips.
    config.eval.scales = MULTI_SCALES
    config.eval.flip = True
  return config

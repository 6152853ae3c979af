"""CascadePSP (Cheng et al., CVPR 2020): the refinement module and its official training recipe.

  # The official recipe on the official training mix (prepare it first, see the README):
  python -m pspnet_jax.data.prepare --dataset=cascadepsp_mix --manual_dir=CascadePSP/data
  python -m pspnet_jax.main --config=configs/cascadepsp.py --workdir=runs/cascadepsp

  # The CPU demo: a ResNet-18 refinement module on generated masks (nothing downloaded)
  python -m pspnet_jax.main --config=configs/cascadepsp.py:demo --workdir=runs/refine_demo

  # Refine masks with a trained (or imported, `convert --format=cascadepsp`) model
  python -m pspnet_jax.refine --config=configs/cascadepsp.py --workdir=runs/cascadepsp \\
      --image=photo.jpg --mask=coarse.png --output=refined/

The official recipe (hkchengrex/CascadePSP train.py and util/hyper_para.py):
ResNet-50 refinement module from torchvision's ImageNet weights (the three
extra input channels of conv1 zero), Adam lr 2.25e-4 with weight decay 1e-4
(L2), x0.1 at iterations 22,500 and 37,500 of 45,000, batch 12 of 224x224
random crops with flips, colour jitter and random grey, the input masks made
from the ground truth by the official boundary perturbation (IoU target
0.8-1.0), and the loss weights below. The official model was trained on two
GPUs with DataParallel; here the batch is sharded over every device with
synchronized BatchNorm. Evaluation refines data.eval_split's input masks with
the official global + local steps at refine.L and reports the refined and
input masks' IoU and boundary accuracy (mBA).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The official recipe; `configs/cascadepsp.py:demo` is the CPU demo on generated masks."""
  if arg not in (None, '', 'demo'):
    raise ValueError(f'config variant {arg!r}: the only variant is demo '
                     '(configs/cascadepsp.py:demo)')
  config = default.get_config()
  config.task = 'refinement'

  data = config.data
  data.name = 'cascadepsp_mix'
  data.num_classes = 2
  data.crop_size = 224
  data.eval_split = 'validation'
  augment = data.augment
  augment.recipe = 'cascadepsp'
  augment.flip_prob = 0.5
  # torchvision ColorJitter(0.2, 0.05, 0.05, 0) and RandomGrayscale(p=0.1).
  augment.jitter_brightness = 0.2
  augment.jitter_contrast = 0.05
  augment.jitter_saturation = 0.05
  augment.grayscale_prob = 0.1
  # The boundary perturbation stops once the input mask's IoU with the ground truth falls
  # below a target drawn uniformly from [min, max].
  augment.perturb_iou_min = 0.8
  augment.perturb_iou_max = 1.0

  model = config.model
  model.backbone = 'resnet50'
  model.deep_stem = False
  # The file the official training starts from (extractors.py's model_urls); its name carries
  # the SHA-256 prefix that pspnet_jax.pretrained checks.
  model.pretrained = 'https://download.pytorch.org/models/resnet50-19c8e357.pth'
  model.pretrained_format = 'torchvision-resnet'
  # The pyramid pooling's output and the decoders' widths at strides 4, 2 and 1 (the official
  # module's; models/cascadepsp.py).
  model.refine_widths = (1024, 512, 256, 32)

  # The loss weights of the six outputs, in the order out_224, out_28, out_56, out_28_2,
  # out_28_3, out_56_2 (losses.REFINEMENT_OUTPUTS), and of the Sobel-gradient term on out_224.
  config.loss = ml_collections.ConfigDict()
  config.loss.ce_weights = (0.0, 1.0, 0.5, 1.0, 1.0, 0.5)
  config.loss.l1_weights = (1.0, 0.0, 0.25, 0.0, 0.0, 0.25)
  config.loss.l2_weights = (1.0, 0.0, 0.25, 0.0, 0.0, 0.25)
  config.loss.grad_weight = 5.0

  optim = config.optim
  optim.name = 'adam'
  optim.schedule = 'multistep'
  optim.base_lr = 2.25e-4
  optim.head_lr_mult = 1.0
  optim.weight_decay = 1e-4
  optim.milestones = (22_500, 37_500)
  optim.gamma = 0.1

  train = config.train
  train.batch_size = 12
  train.num_steps = 45_000
  train.log_every = 50
  train.checkpoint_every = 5_000
  train.eval_every = 5_000

  # Inference (pspnet_jax.refine, and evaluation during training): the official global step
  # at L on the long side, then the local step on L x L patches at full resolution (skipped
  # with fast=True); batch_size patches per device step (0: one per device).
  config.refine = ml_collections.ConfigDict()
  config.refine.L = 900
  config.refine.fast = False
  config.refine.batch_size = 0

  if arg == 'demo':
    _demo(config)
  return config


def _demo(config: ml_collections.ConfigDict) -> None:
  """The CPU demo: a narrow ResNet-18 refinement module trained from scratch on generated masks.

  The decoders are narrowed to (128, 64, 32, 16): with the official widths they cost several
  times the backbone. The images are all 96x96 so that evaluation compiles the module once
  per step (the global step runs at the image's own size, L = 96).
  """
  config.data.name = 'synthetic_masks'
  config.data.crop_size = 64
  config.data.synthetic.min_size = 96
  config.data.synthetic.max_size = 96
  config.model.backbone = 'resnet18'
  config.model.refine_widths = (128, 64, 32, 16)
  config.model.pretrained = ''
  config.optim.base_lr = 1e-3
  config.optim.milestones = (450,)
  config.train.batch_size = 8
  config.train.num_steps = 600
  config.train.log_every = 50
  config.train.checkpoint_every = 150
  config.train.eval_every = 150
  config.refine.L = 96

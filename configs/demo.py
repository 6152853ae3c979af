"""The demo: PSPNet on the built-in synthetic context dataset, sized for a 2-core CPU.

  python -m pspnet_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m pspnet_jax.main --config=configs/demo.py --workdir=runs/demo_fcn \\
      --config.model.use_ppm=False        # the dilated-FCN baseline

Nothing is downloaded: the dataset (pspnet_jax/data/synthetic.py) is generated
and written as TFDS ArrayRecord on first use. Boats and cars look identical and
only a band of water or road far away tells them apart, the paper's motivating
failure in miniature. Same recipe as the real datasets (poly SGD with 10x
heads, aux loss, semseg augmentation), with a ResNet-18 at output stride 16
and small crops so the whole run fits in five minutes on a 2-core CPU.

Expected (2026-11-24, 2-core CPU, 4 min 9 s): mIoU 62.6, boat / car IoU
58.5 / 55.3; the FCN baseline 51.8, boat / car 0.2 / 28.9. Details in the README.
"""

from configs import default
from pspnet_jax.data import registry


def get_config():
  config = default.get_config()
  config.data.name = 'synthetic'
  config.data.num_classes = registry.get('synthetic').num_classes
  config.data.crop_size = 129
  config.data.synthetic.num_train = 400
  config.data.synthetic.num_validation = 100
  config.data.synthetic.min_size = 129
  config.data.synthetic.max_size = 193
  # Crops should usually contain the cue band, so scale less than semseg's 0.5-2.0.
  config.data.augment.scale_min = 0.75
  config.data.augment.scale_max = 1.25

  config.model.backbone = 'resnet18'
  config.model.output_stride = 16

  config.train.batch_size = 8
  config.train.num_steps = 250
  config.train.log_every = 25
  config.train.checkpoint_every = 125
  config.train.eval_every = 125

  config.eval.batch_size = 16
  # The images are about the crop's size: one window each.
  config.eval.protocol = 'whole'
  config.eval.crop_size = config.data.crop_size
  return config

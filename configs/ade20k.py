"""ADE20K (SceneParse150): 150 classes, crop 473; PSPNet-50, or PSPNet-101 with `configs/ade20k.py:backbone=101`.

The model is the official one (deep stem, output stride 8, pyramid bins
1/2/3/6, aux loss 0.4 on layer3). Import the official weights with:
  python -m pspnet_jax.convert --config=configs/ade20k.py --workdir=DIR \\
      --import_path=train_epoch_N.pth --format=semseg
The published results start from semseg's ImageNet ResNet: train with
--config.model.pretrained=semseg:resnet50_v2 (resnet101_v2 for backbone=101;
downloaded by hand, pspnet_jax/pretrained.py says from where); the default is random.
`:arch=mmseg` is mmsegmentation's PSPNet and recipe, starting from mmseg:resnet50_v1c
(README "Using mmsegmentation checkpoints").
"""

from configs import default


def get_config(arg: str | None = None):
  return default.for_dataset('ade20k', arg)

"""The PyTorch reference: a twin of the official PSPNet (hszhao/semseg model/pspnet.py +
model/resnet.py) and semseg's training iteration.

Written independently of the Flax model, as the reference it is measured
against: same module structure and state_dict keys as the official code, built
and initialized the official way: a plain ResNet whose convs get Kaiming normal
(fan_out) weights and whose BatchNorms start at 1 and 0, its layer3/layer4
convs then patched to stride 1 and dilated; the PPM and the heads, built
afterwards, keep PyTorch's default initialization. It extends the official
code only where the Flax model does: basic blocks (ResNet-18/34, whose two 3x3
convs are both dilated), the 7x7 stem, output stride 16/32, and input sizes
other than 8k+1. Its switches give mmsegmentation's PSPNet from the same layers
(`mmseg-pspnet.md`): stem widths 32-32-64, the contracted first dilation, basic
blocks whose second conv is undilated, align_corners=False in the pyramid and
in the final resize (to the input's size), and the heads' widths.

It imports torch (requirements-dev.txt), so nothing on the training path
imports it: tests, benchmarks and conversion import it where they need it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pspnet_jax import optim

STAGES = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)), 50: ('bottleneck', (3, 4, 6, 3)),
          101: ('bottleneck', (3, 4, 23, 3)), 152: ('bottleneck', (3, 8, 36, 3))}


def conv3x3(cin, cout, stride=1):
  return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):
  """semseg's ResNet: deep_base gives conv1/conv2/conv3 (`stem_widths`, semseg's 64, 64, 128),
  else torchvision's 7x7."""

  def __init__(self, layers=50, deep_base=True, stem_widths=(64, 64, 128)):
    super().__init__()
    kind, sizes = STAGES[layers]
    block = BasicBlock if kind == 'basic' else Bottleneck
    self.deep_base = deep_base
    if deep_base:
      first, second, third = stem_widths
      self.inplanes = third
      self.conv1 = conv3x3(3, first, stride=2)
      self.bn1 = nn.BatchNorm2d(first)
      self.conv2 = conv3x3(first, second)
      self.bn2 = nn.BatchNorm2d(second)
      self.conv3 = conv3x3(second, third)
      self.bn3 = nn.BatchNorm2d(third)
    else:
      self.inplanes = 64
      self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, 64, sizes[0])
    self.layer2 = self._make_layer(block, 128, sizes[1], stride=2)
    self.layer3 = self._make_layer(block, 256, sizes[2], stride=2)
    self.layer4 = self._make_layer(block, 512, sizes[3], stride=2)
    # The official initialization, at the end of ResNet.__init__: only the
    # backbone's modules exist yet, so PSPNet's PPM and heads keep the default.
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(module, nn.BatchNorm2d):
        nn.init.constant_(module.weight, 1)
        nn.init.constant_(module.bias, 0)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class PPM(nn.Module):

  def __init__(self, in_dim, reduction_dim, bins, align_corners=True):
    super().__init__()
    self.align_corners = align_corners
    self.features = nn.ModuleList([
        nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, reduction_dim, 1, bias=False),
                      nn.BatchNorm2d(reduction_dim), nn.ReLU()) for b in bins])

  def forward(self, x):
    size = x.shape[2:]
    return torch.cat([x] + [F.interpolate(f(x), size, mode='bilinear',
                                          align_corners=self.align_corners)
                            for f in self.features], 1)


def _dilate(layer, dilation, contract=False, basic_conv2=True):
  """The official patch: stride 1 everywhere, every 3x3 conv dilated (and padded) by `dilation`.

  mmseg's switches: `contract` gives block 0 half the dilation; `basic_conv2=False` leaves a
  basic block's conv2 undilated.
  """
  for name, module in layer.named_modules():
    if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
      rate = dilation // 2 if contract and name.startswith('0.') else dilation
      if not basic_conv2 and isinstance(layer[0], BasicBlock) and name.endswith('conv2'):
        rate = 1
      module.dilation, module.padding, module.stride = (rate,) * 2, (rate,) * 2, (1, 1)
    elif 'downsample.0' in name:
      module.stride = (1, 1)


class PSPNet(nn.Module):

  def __init__(self, layers=50, bins=(1, 2, 3, 6), dropout=0.1, classes=150, zoom_factor=8,
               use_ppm=True, deep_base=True, output_stride=8, stem_widths=(64, 64, 128),
               contract_dilation=False, dilate_basic_conv2=True, ppm_align_corners=True,
               align_corners=True, head_channels=512, aux_channels=256):
    super().__init__()
    self.zoom_factor = zoom_factor
    self.use_ppm = use_ppm
    self.align_corners = align_corners
    resnet = ResNet(layers, deep_base, stem_widths)
    if deep_base:
      self.layer0 = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.conv2, resnet.bn2,
                                  resnet.relu, resnet.conv3, resnet.bn3, resnet.relu, resnet.maxpool)
    else:
      self.layer0 = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
    self.layer1, self.layer2, self.layer3, self.layer4 = (
        resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
    dilations = {8: ((self.layer3, 2), (self.layer4, 4)), 16: ((self.layer4, 2),), 32: ()}
    for layer, dilation in dilations[output_stride]:
      _dilate(layer, dilation, contract_dilation, dilate_basic_conv2)
    expansion = 1 if STAGES[layers][0] == 'basic' else 4
    fea_dim = 512 * expansion
    if use_ppm:
      self.ppm = PPM(fea_dim, fea_dim // len(bins), bins, ppm_align_corners)
      fea_dim *= 2
    self.cls = nn.Sequential(nn.Conv2d(fea_dim, head_channels, 3, padding=1, bias=False),
                             nn.BatchNorm2d(head_channels), nn.ReLU(), nn.Dropout2d(p=dropout),
                             nn.Conv2d(head_channels, classes, 1))
    self.aux = nn.Sequential(nn.Conv2d(256 * expansion, aux_channels, 3, padding=1, bias=False),
                             nn.BatchNorm2d(aux_channels), nn.ReLU(), nn.Dropout2d(p=dropout),
                             nn.Conv2d(aux_channels, classes, 1))

  def forward(self, x, return_aux=False):
    if self.align_corners:
      h = int((x.shape[2] - 1) / 8 * self.zoom_factor + 1)
      w = int((x.shape[3] - 1) / 8 * self.zoom_factor + 1)
    else:  # mmseg: back to the input's size
      h, w = x.shape[2:]
    x = self.layer0(x)
    x = self.layer1(x)
    x = self.layer2(x)
    x_tmp = self.layer3(x)
    x = self.layer4(x_tmp)
    if self.use_ppm:
      x = self.ppm(x)
    x = self.cls(x)
    if self.zoom_factor != 1:
      x = F.interpolate(x, size=(h, w), mode='bilinear', align_corners=self.align_corners)
    if not return_aux:
      return x
    aux = self.aux(x_tmp)
    if self.zoom_factor != 1:
      aux = F.interpolate(aux, size=(h, w), mode='bilinear', align_corners=self.align_corners)
    return x, aux


def from_config(config) -> PSPNet:
  """The twin of the model an ml_collections config describes (config.model, config.data)."""
  model = config.model
  return PSPNet(int(model.backbone.removeprefix('resnet')), bins=tuple(model.ppm_bins),
                dropout=model.dropout, classes=config.data.num_classes,
                zoom_factor=model.zoom_factor, use_ppm=model.use_ppm,
                deep_base=model.deep_stem, output_stride=model.output_stride,
                stem_widths=tuple(model.stem_widths), contract_dilation=model.contract_dilation,
                dilate_basic_conv2=model.dilate_basic_conv2,
                ppm_align_corners=model.ppm_align_corners, align_corners=model.align_corners,
                head_channels=model.head_channels, aux_channels=model.aux_channels)


def semseg_train_step(model: PSPNet, config, num_steps: int):
  """semseg's training iteration (its train.py) on `model`, put in train mode.

  Returns `step(images, target) -> loss`: images a float32 NCHW tensor, target
  (N, H, W) int64 with config.data.ignore_label for unlabeled pixels; the loss
  (a float) is CrossEntropyLoss(ignore_index) of the main logits plus
  config.model.aux_weight times that of the aux logits. Each call runs
  backward and a torch SGD step (momentum, weight decay added to the gradient;
  ppm/cls/aux at config.optim.head_lr_mult times the base rate), then sets the
  poly rate base * (1 - iteration / num_steps) ** power for the next one, as
  semseg does after every iteration.
  """
  model.train()
  opt = config.optim
  head, backbone = [], []
  for name, parameter in model.named_parameters():
    (head if name.split('.')[0] in optim.HEAD_MODULES else backbone).append(parameter)
  sgd = torch.optim.SGD(
      [{'params': backbone}, {'params': head, 'lr': opt.base_lr * opt.head_lr_mult}],
      lr=opt.base_lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
  criterion = nn.CrossEntropyLoss(ignore_index=config.data.ignore_label)
  iteration = 0

  def step(images: torch.Tensor, target: torch.Tensor) -> float:
    nonlocal iteration
    logits, aux_logits = model(images, return_aux=True)
    loss = criterion(logits, target) + config.model.aux_weight * criterion(aux_logits, target)
    sgd.zero_grad()
    loss.backward()
    sgd.step()
    iteration += 1
    lr = opt.base_lr * (1 - iteration / num_steps) ** opt.power
    sgd.param_groups[0]['lr'], sgd.param_groups[1]['lr'] = lr, lr * opt.head_lr_mult
    # .item() waits for the step to finish, which timing on an accelerator needs.
    return loss.item()

  return step

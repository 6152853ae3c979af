"""Class names and colour palettes of the supported datasets, and Cityscapes' labelId -> trainId.

Names and palettes make predictions and per-class metric tables readable; the
lists are transcribed in the official order, so index k is the model's class k:

  ade20k      the 150 SceneParse150 classes (semseg's `ade20k_names.txt`,
              mmsegmentation's ADE20KDataset) with the standard ADE palette
  cityscapes  the 19 trainIds with cityscapesScripts' colours
  voc2012     background + the 20 PASCAL VOC classes with the VOC palette
  synthetic   `synthetic.CLASS_NAMES` with colours close to how each is drawn

The standard ADE palette gives 'road' (6) and 'skyscraper' (48) the same
grey; it is kept as published so renderings match other tools.

These are the tables; `registry` is the index of datasets that uses them (and
gives a folder dataset its own names, with `voc_palette` colours).
"""

import numpy as np

from pspnet_jax.data import labels, synthetic

_ADE20K_NAMES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain',
    'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
    'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing',
    'cushion', 'base', 'box', 'column', 'signboard', 'chest of drawers', 'counter', 'sand', 'sink',
    'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case',
    'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase', 'blind',
    'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth',
    'television receiver', 'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister',
    'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain',
    'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen',
    'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan',
    'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass',
    'clock', 'flag')

_ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255))

# trainId -> (name, colour), cityscapesScripts' `helpers/labels.py`.
_CITYSCAPES_CLASSES = (
    ('road', (128, 64, 128)), ('sidewalk', (244, 35, 232)), ('building', (70, 70, 70)),
    ('wall', (102, 102, 156)), ('fence', (190, 153, 153)), ('pole', (153, 153, 153)),
    ('traffic light', (250, 170, 30)), ('traffic sign', (220, 220, 0)),
    ('vegetation', (107, 142, 35)), ('terrain', (152, 251, 152)), ('sky', (70, 130, 180)),
    ('person', (220, 20, 60)), ('rider', (255, 0, 0)), ('car', (0, 0, 142)),
    ('truck', (0, 0, 70)), ('bus', (0, 60, 100)), ('train', (0, 80, 100)),
    ('motorcycle', (0, 0, 230)), ('bicycle', (119, 11, 32)))

# The trainId of each of the 34 labelIds 0..33, in labelId order (255: not trained on,
# ignored). The license plate has labelId -1 and never occurs in the label images.
_CITYSCAPES_TRAIN_IDS = (
    255, 255, 255, 255, 255, 255, 255,  # unlabeled, ego vehicle, rectification border,
                                        # out of roi, static, dynamic, ground
    0, 1, 255, 255,                     # road, sidewalk, parking, rail track
    2, 3, 4, 255, 255, 255,             # building, wall, fence, guard rail, bridge, tunnel
    5, 255, 6, 7,                       # pole, polegroup, traffic light, traffic sign
    8, 9, 10, 11, 12,                   # vegetation, terrain, sky, person, rider
    13, 14, 15, 255, 255, 16, 17, 18)   # car, truck, bus, caravan, trailer, train,
                                        # motorcycle, bicycle

# labelId -> trainId as a 256-entry lookup table, so a whole label image maps with
# `CITYSCAPES_LABEL_TO_TRAIN[label_ids]`; every value outside 0..33 maps to 255.
CITYSCAPES_LABEL_TO_TRAIN = np.full(256, labels.IGNORE_LABEL, np.uint8)
CITYSCAPES_LABEL_TO_TRAIN[:len(_CITYSCAPES_TRAIN_IDS)] = _CITYSCAPES_TRAIN_IDS

_VOC2012_NAMES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor')

# Ground, water, road, tree and marker close to the colours the renderer paints them,
# so predictions read like the images; boats and cars are painted alike, so they get
# two contrasting colours (orange, red) that make the confusion between them visible.
_SYNTHETIC_PALETTE = ((125, 115, 95), (35, 85, 150), (90, 90, 96), (240, 140, 20),
                      (200, 30, 30), (45, 140, 45), (210, 60, 200))


def voc_palette(num_classes: int) -> np.ndarray:
  """The PASCAL VOC palette: bits 0, 1, 2 of the class index feed the top bits of R, G, B.

  Bit 3j + c of the index becomes bit 7 - j of channel c, so neighbouring classes
  get far-apart colours: 1 -> (128, 0, 0), 2 -> (0, 128, 0), 15 -> (192, 128, 128).
  """
  index = np.arange(num_classes)
  colours = np.zeros((num_classes, 3), np.int64)
  for j in range(8):
    for channel in range(3):
      colours[:, channel] |= ((index >> (3 * j + channel)) & 1) << (7 - j)
  return colours.astype(np.uint8)


_NAMES = {
    'ade20k': _ADE20K_NAMES,
    'cityscapes': tuple(name for name, _ in _CITYSCAPES_CLASSES),
    'voc2012': _VOC2012_NAMES,
    'synthetic': tuple(synthetic.CLASS_NAMES),
}
_PALETTES = {
    'ade20k': np.array(_ADE20K_PALETTE, np.uint8),
    'cityscapes': np.array([colour for _, colour in _CITYSCAPES_CLASSES], np.uint8),
    'voc2012': voc_palette(len(_VOC2012_NAMES)),
    'synthetic': np.array(_SYNTHETIC_PALETTE, np.uint8),
}


def _check(dataset_name: str) -> None:
  if dataset_name not in _NAMES:
    raise ValueError(f'No class names for dataset {dataset_name!r}; known: {", ".join(_NAMES)}')


def class_names(dataset_name: str) -> tuple[str, ...]:
  """The class names of `dataset_name`, index k naming the model's class k."""
  _check(dataset_name)
  return _NAMES[dataset_name]


def palette(dataset_name: str) -> np.ndarray:
  """The (num_classes, 3) uint8 RGB colours of `dataset_name`; a fresh array the caller may edit."""
  _check(dataset_name)
  return _PALETTES[dataset_name].copy()

"""CascadePSP's scene-parsing refinement (pspnet_jax/scene_refinement.py) against the official
scripts of hkchengrex/CascadePSP, transcribed here, and wired to `predict` and `evaluate`.

  - the split against ade_expand_inst.py's component loop (cv2 on the whole image), and the
    crops against dataset/make_bb_trans.py and split_dataset.py's PIL crop;
  - the single pass, with the official torch refinement module as the model, against
    eval_helper.py's process_im_single_pass(model, im, seg, 224, para) of the repository
    (not the PyPI package's, which resizes to L both ways) to the bit, in its three size
    branches; the whole chain (split, crop, pass, uint8, recombination) against the
    official scripts in a row; and our JAX module holding the same weights through a
    Refiner against the official module;
  - the recombination against eval_post_ade.py's loop, with its PIL resize and ADE20K's
    1-based stuff list;
  - `predict` and `evaluate` with --refine_workdir on tiny data: the refined mIoU the command
    reports is that of the refined class maps it wrote, counted here in numpy.
"""

import json
import os
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from PIL import Image

import cascadepsp_reference as ref
from cascadepsp_parity import random_official
from demo_runs import REPO, demo_config
from parity import nchw, nhwc
from pspnet_jax import checkpoint, configuration, refinement, scene_refinement, weights
from pspnet_jax.data import pipeline
from pspnet_jax.errors import UserError
from pspnet_jax.models import create_model
from pspnet_jax.models.cascadepsp import RefinementModule


# ------------------------------------------------------------------------------------------
# The official scripts, transcribed (numpy, cv2, PIL and torch as they use them).


def get_disk_kernel(size):
  """scripts/ade20K/ade_expand_inst.py."""
  r = size // 2
  y, x = np.ogrid[-r:size - r, -r:size - r]
  mask = x * x + y * y <= r * r
  array = np.zeros((size, size)).astype('uint8')
  array[mask] = 1
  return array


def official_split(seg_img):
  """ade_expand_inst.py's loop over one prediction: [(class, comp_seg 0/255)] in its order."""
  disc_kernel = get_disk_kernel(10)
  written = []
  for c in np.unique(seg_img):
    class_seg = (seg_img == c).astype('uint8')
    if class_seg.sum() <= 32 * 32:
      continue
    class_seg_dilated = cv2.dilate(class_seg, disc_kernel)
    _, components_map = cv2.connectedComponents(class_seg_dilated, connectivity=8)
    components = np.unique(components_map)
    components = components[components != 0]
    for comp in components:
      comp_map = (components_map == comp).astype('uint8')
      comp_map = cv2.erode(comp_map, disc_kernel)
      if comp_map.sum() <= 32 * 32:
        continue
      comp_seg = (comp_map * class_seg) * 255
      written.append((int(c), comp_seg))
  return written


def get_bb_position(mask):
  """dataset/make_bb_trans.py."""
  mask = mask > 0.5
  rows = np.any(mask, axis=1)
  cols = np.any(mask, axis=0)
  rmin, rmax = np.where(rows)[0][[0, -1]]
  cmin, cmax = np.where(cols)[0][[0, -1]]
  return rmin, rmax, cmin, cmax


def scale_bb_by(rmin, rmax, cmin, cmax, im_height, im_width, h_scale, w_scale):
  """dataset/make_bb_trans.py."""
  height = rmax - rmin
  width = cmax - cmin
  rmin -= h_scale * height / 2
  rmax += h_scale * height / 2
  cmin -= w_scale * width / 2
  cmax += w_scale * width / 2
  rmin = int(max(0, rmin))
  rmax = int(min(im_height - 1, rmax))
  cmin = int(max(0, cmin))
  cmax = int(min(im_width - 1, cmax))
  rmax = max(rmin, rmax)
  cmax = max(cmin, cmax)
  return rmin, rmax, cmin, cmax


def official_tensors(im, seg):
  """SplitTransformDataset's transforms (perturb=False): ToTensor and Normalize, ImageNet's
  statistics for the image, 0.5 / 0.5 for the mask."""
  im = torch.from_numpy(im.transpose(2, 0, 1).copy()).float().div(255)
  im = (im - torch.tensor(refinement.IMAGE_MEAN)[:, None, None]) / torch.tensor(
      refinement.IMAGE_STD)[:, None, None]
  seg = (torch.from_numpy(seg[None].copy()).float().div(255) - 0.5) / 0.5
  return im[None], seg[None]


def official_crops(image, comp_seg):
  """SplitTransformDataset.__getitem__ with perturb=False on a component (torchvision's
  functional.crop of a PIL image is Image.crop)."""
  seg = Image.fromarray(comp_seg)
  im = Image.fromarray(image)
  im_width, im_height = seg.size
  try:
    bb_pos = get_bb_position(np.array(seg))
    rmin, rmax, cmin, cmax = scale_bb_by(*bb_pos, im_height, im_width, 0.25, 0.25)
  except IndexError:   # the official bare except: an empty mask has no box
    rmin = cmin = 0
    rmax = im_height
    cmax = im_width
  if rmax - rmin == 0 or cmax - cmin == 0:
    crop_lambda = lambda x: x
  else:
    crop_lambda = lambda x: x.crop((cmin, rmin, cmax, rmax))
  return official_tensors(np.array(crop_lambda(im)), np.array(crop_lambda(seg)))


def process_im_single_pass(model, im, seg, min_size, para):
  """The repository's eval_helper.py (min_size up, para['L'] down)."""
  max_size = para['L']
  _, _, h, w = im.shape
  if max(h, w) < min_size:
    im = ref.eval_helper.resize_max_side(im, min_size, 'bicubic')
    seg = ref.eval_helper.resize_max_side(seg, min_size, 'bilinear')
  if max(h, w) > max_size:
    im = ref.eval_helper.resize_max_side(im, max_size, 'area')
    seg = ref.eval_helper.resize_max_side(seg, max_size, 'area')
  images = ref.eval_helper.safe_forward(model, im, seg)
  if max(h, w) < min_size:
    images['pred_224'] = F.interpolate(images['pred_224'], size=(h, w), mode='area')
  elif max(h, w) > max_size:
    images['pred_224'] = F.interpolate(images['pred_224'], size=(h, w), mode='bilinear',
                                       align_corners=False)
  return images


def official_refined_mask(model, im, seg, L):
  """eval.py --ade for one crop's tensors: the _mask.png it writes (uint8 at the crop's size)."""
  with torch.no_grad():
    images = process_im_single_pass(model, im, seg, 224, {'L': L})
  if (seg[0] + 1).sum() < 2:   # "Suppress close-to-zero segmentation input"
    images['pred_224'][0] = 0
  return (images['pred_224'][0, 0].numpy() * 255).astype('uint8')   # tensor_to_gray_im


BACKGROUND_CLASSES = [1, 2, 3, 4, 6, 7, 10, 12, 14, 17, 22, 26, 27, 29, 30, 47, 49, 52, 53, 55,
                      60, 61, 62, 69, 80, 85, 92, 95, 97, 102, 106, 110, 114, 129, 141]


def official_recombination(seg, masks):
  """eval_post_ade.py's loop: `seg` the 1-based prediction, `masks` [(this_class, the _seg.png
  of the split, the _mask.png of eval.py)] in the order its glob finds them."""
  mask = seg.copy()
  confidence = np.zeros_like(seg) + 0.5
  for this_class, split_seg, class_mask in masks:
    class_mask_prob = class_mask.astype('float') / 255
    class_seg = split_seg.astype('float') / 255
    try:
      rmin, rmax, cmin, cmax = get_bb_position(class_seg)
      rmin, rmax, cmin, cmax = scale_bb_by(rmin, rmax, cmin, cmax, seg.shape[0], seg.shape[1],
                                           0.25, 0.25)
    except IndexError:
      rmin = cmin = 0
      rmax, cmax = seg.shape
    if (cmax == cmin) or (rmax == rmin):
      continue
    class_mask_prob = np.array(Image.fromarray(class_mask_prob).resize(
        (cmax - cmin, rmax - rmin), Image.BILINEAR))
    if this_class in BACKGROUND_CLASSES:
      class_mask_prob = class_mask_prob * 0.51
    mask[rmin:rmax, cmin:cmax] = np.where(class_mask_prob > confidence[rmin:rmax, cmin:cmax],
                                          this_class, mask[rmin:rmax, cmin:cmax])
    confidence[rmin:rmax, cmin:cmax] = np.maximum(confidence[rmin:rmax, cmin:cmax],
                                                  class_mask_prob)
  return mask


# ------------------------------------------------------------------------------------------
# Scenes.


def split_scene():
  """A 100 x 140 class map: class 1 two rectangles 6 pixels apart (one component after the
  closing), a third one on the bottom edge and an 8 x 8 square (dropped); class 2 a grid of
  3 x 3 dots (one closed component, its mask the dots); class 3 720 pixels (skipped); class 5
  an L of 5-pixel bars along the top and right edges; class 0 the rest."""
  seg = np.zeros((100, 140), np.uint8)
  for row in range(45, 100, 6):
    for column in range(5, 90, 6):
      seg[row:row + 3, column:column + 3] = 2
  seg[10:41, 10:41] = 1
  seg[10:41, 47:81] = 1
  seg[62:100, 100:135] = 1
  seg[20:28, 100:108] = 1
  seg[42:60, 95:135] = 3
  seg[:5, :] = 5
  seg[:, 135:] = 5
  return seg


def picture(class_map, seed=0):
  """An RGB image whose colours follow the class map, blurred and noisy."""
  rng = np.random.default_rng(seed)
  colours = rng.integers(0, 256, (256, 3))
  image = cv2.GaussianBlur(colours[class_map].astype(np.float32), (7, 7), 2)
  return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# 1. The split and the crops.


def test_split_equals_ade_expand_inst():
  seg = split_scene()
  expected = official_split(seg)
  got = scene_refinement.split(seg)
  # The scene covers: a class skipped whole (3), a dilated component closed below the size
  # (class 1's square), two blobs merged, a component whose mask is sparse (the dots).
  assert [c for c, _ in expected] == [0, 1, 1, 2, 5]
  assert 3 not in [c for c, _ in expected]
  assert [component.class_index for component in got] == [c for c, _ in expected]
  height, width = seg.shape
  for component, (c, comp_seg) in zip(got, expected):
    whole = np.zeros(seg.shape, np.uint8)
    rows, columns = component.mask.shape
    whole[component.top:component.top + rows, component.left:component.left + columns] = (
        component.mask * 255)
    np.testing.assert_array_equal(whole, comp_seg, err_msg=f'class {c}')
    # The official crop box and the mask inside it (PIL's crop of the _seg.png).
    rmin, rmax, cmin, cmax = scale_bb_by(*get_bb_position(comp_seg), height, width, 0.25, 0.25)
    box = scene_refinement.crop_box(component, height, width)
    assert box == (rmin, rmax, cmin, cmax)
    np.testing.assert_array_equal(scene_refinement.crop_mask(component, box),
                                  np.array(Image.fromarray(comp_seg).crop((cmin, rmin, cmax,
                                                                           rmax))))
  # The bar on the right edge and the rectangle on the bottom edge lose their last column and
  # row to the crop (scale_bb_by clamps to the last index and the crop excludes it).
  assert scene_refinement.crop_box(got[-1], height, width)[3] == width - 1
  assert scene_refinement.crop_box(got[2], height, width)[1] == height - 1


def test_disk_kernel_is_the_official_one():
  for size in (3, 4, 10, 11):
    np.testing.assert_array_equal(scene_refinement.disk_kernel(size), get_disk_kernel(size))


# ------------------------------------------------------------------------------------------
# 2. The single pass with the official module.


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread():
  """On 2 busy cores torch's second thread makes the official module about 8x slower."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def official():
  """The official module with random weights, its last layer scaled so that its predictions
  are confident and about half foreground (recombinations then change classes)."""
  module = random_official(seed=3)
  image = torch.randn(1, 3, 64, 96)
  mask = torch.where(torch.arange(96)[None, None, None] < 40, 1.0, -1.0).expand(1, 1, 64, 96)
  with torch.no_grad():
    logits = module(image, mask)['out_224']
    gain = 6 / logits.std()
    module.final_21.weight *= gain
    module.final_21.bias.copy_((module.final_21.bias - logits.median()) * gain)
  return module


class Memoized:
  """The official module called as `safe_forward` calls it, each distinct input once: when
  our pipeline feeds it the very tensors the official one does, the second call is a lookup
  (different inputs, even by a bit, run the module again)."""

  def __init__(self, module):
    self.module, self.seen, self.calls = module, {}, 0

  def __call__(self, im, seg, inter_s8=None, inter_s4=None):
    assert inter_s8 is None and inter_s4 is None   # the global step only
    key = (tuple(im.shape), im.numpy().tobytes(), seg.numpy().tobytes())
    if key not in self.seen:
      self.calls += 1
      with torch.no_grad():
        self.seen[key] = self.module(im, seg)
    return self.seen[key]

  def forward(self, images, masks, inter_s8):
    """`refinement.refine_with`'s forward: NHWC numpy in and out."""
    outputs = self(nchw(images), nchw(masks), inter_s8)
    return {key: nhwc(outputs[key]) for key in ('pred_224', 'pred_56_2')}


@pytest.fixture(scope='module')
def memoized(official):
  return Memoized(official)


# (crop height, crop width, L): up to 224 (bicubic / area back), between 224 and L (as is,
# padded), over L (area down / bilinear back); sides not multiples of 8.
_BRANCHES = [(21, 61, 240), (231, 58, 240), (301, 45, 240)]


@pytest.mark.parametrize('height,width,L', _BRANCHES)
def test_single_pass_equals_process_im_single_pass(memoized, height, width, L):
  image = picture(np.zeros((height, width), np.uint8), seed=height)
  rows, columns = np.mgrid[:height, :width]
  mask = (((rows - height / 2) / (0.4 * height)) ** 2 + ((columns - width / 3) / (0.3 * width))
          ** 2 < 1).astype(np.uint8) * 255
  image[mask > 0] //= 2
  calls = memoized.calls
  expected = official_refined_mask(memoized, *official_tensors(image, mask), L)
  ours = refinement.to_uint8(scene_refinement.single_pass(memoized.forward, image, mask, L))
  assert memoized.calls == calls + 1   # our pass fed the module the official tensors
  assert ours.shape == (height, width)
  np.testing.assert_array_equal(ours, expected)
  assert 0 < np.mean(ours > 127) < 1


def test_scene_equals_the_official_scripts_in_a_row(memoized):
  """Split, crops, single passes and recombination, with ADE20K's stuff classes, against
  ade_expand_inst.py -> eval.py --ade -> eval_post_ade.py (our classes + 1 as theirs)."""
  class_map = np.zeros((120, 150), np.uint8)
  class_map[20:70, 30:60] = 6        # a "road" (stuff: ADE class 7)
  class_map[60:100, 70:140] = 12     # "person" (ADE class 13)
  class_map[90:115, 10:50] = 12
  class_map[5:15, 100:110] = 4       # too small
  image = picture(class_map, seed=5)
  stuff = scene_refinement.ADE20K_STUFF_CLASSES
  assert 6 in stuff and 12 not in stuff

  components = official_split(class_map + 1)
  official_masks = [(c, comp_seg,
                     official_refined_mask(memoized, *official_crops(image, comp_seg), 900))
                    for c, comp_seg in components]
  expected = official_recombination(class_map + 1, official_masks) - 1
  calls = memoized.calls
  got = scene_refinement.refine_scene_with(memoized.forward, image, class_map, L=900,
                                           stuff_classes=stuff)
  assert memoized.calls == calls   # every pass fed the module the official tensors
  assert len(components) == 4
  np.testing.assert_array_equal(got, expected)
  changed = np.mean(got != class_map)
  print(f'{len(components)} components, {changed:.2%} of pixels change class')
  assert changed > 0.01


def test_our_module_with_the_official_weights(official):
  """The single pass through a Refiner over our JAX module holding the official module's
  weights, against the official module: the same crops, float32 rounding apart."""
  model = nnx.eval_shape(lambda: RefinementModule(rngs=nnx.Rngs(0)))
  tensors = {key: value.numpy() for key, value in official.state_dict().items()}
  nnx.update(model, weights.from_cascadepsp_state_dict(tensors,
                                                       checkpoint.model_variables(model)))
  refiner = refinement.Refiner.from_model(model)
  height, width, L = _BRANCHES[0]
  image = picture(np.zeros((height, width), np.uint8), seed=1)
  mask = np.zeros((height, width), np.uint8)
  mask[4:17, 10:40] = 255
  expected = official_refined_mask(official, *official_tensors(image, mask), L)
  ours = refinement.to_uint8(scene_refinement.single_pass(
      refiner.forward, image, mask, L))
  difference = np.abs(ours.astype(int) - expected)
  print(f'max |difference| {difference.max()} of 255, {np.mean(difference > 0):.2%} differ')
  assert difference.max() <= 2
  assert np.mean((ours > 127) == (expected > 127)) >= 0.999


# ------------------------------------------------------------------------------------------
# 3. The recombination.


def test_recombination_equals_eval_post_ade():
  """Overlapping boxes, stuff and thing classes, and probabilities where the order or the
  0.51 decides: ties between components (the first keeps its class), stuff just over 0.5
  (251..255 of 255 times 0.51) against things just over it (128..131)."""
  class_map = np.zeros((90, 120), np.uint8)
  class_map[10:60, 10:70] = 2        # ADE class 3, sky: stuff
  class_map[30:85, 40:110] = 7       # ADE class 8, bed: a thing
  class_map[0:40, 80:120] = 21       # ADE class 22, water: stuff
  class_map[70:90, 0:30] = 7
  components = scene_refinement.split(class_map)
  assert sorted({component.class_index for component in components}) == [0, 2, 7, 21]
  rng = np.random.default_rng(0)
  height, width = class_map.shape
  refined, official_masks = [], []
  for index, component in enumerate(components):
    box = scene_refinement.crop_box(component, height, width)
    shape = (box[1] - box[0], box[3] - box[2])
    probability = rng.choice(np.array([0, 127, 128, 129, 130, 131, 200, 251, 253, 255],
                                      np.uint8), shape)
    if index % 2:   # smooth ones too
      probability = cv2.resize(rng.integers(0, 256, (4, 4), dtype=np.uint8), shape[::-1])
    refined.append((component.class_index, box, probability))
    whole = np.zeros(class_map.shape, np.uint8)
    rows, columns = component.mask.shape
    whole[component.top:component.top + rows, component.left:component.left + columns] = (
        component.mask * 255)
    official_masks.append((component.class_index + 1, whole, probability))
  got = scene_refinement.recombine(class_map, refined, scene_refinement.ADE20K_STUFF_CLASSES)
  expected = official_recombination(class_map + 1, official_masks) - 1
  np.testing.assert_array_equal(got, expected)
  assert np.mean(got != class_map) > 0.05
  # The stuff table is the official list in our 0-based labels; other datasets have none.
  assert scene_refinement.ADE20K_STUFF_CLASSES == tuple(k - 1 for k in BACKGROUND_CLASSES)
  assert scene_refinement.stuff_classes_of('ade20k') == scene_refinement.ADE20K_STUFF_CLASSES
  assert scene_refinement.stuff_classes_of('cityscapes') == ()


# ------------------------------------------------------------------------------------------
# 4. The commands.

# Two 48 x 48 images of the synthetic dataset, one window each: the PSPNet below splits them
# into components whose crops make two shapes for the refinement module.
E2E_OVERRIDES = {'data.synthetic.num_train': 2, 'data.synthetic.num_validation': 2,
                 'data.synthetic.min_size': 48, 'data.synthetic.max_size': 48,
                 'eval.protocol': 'whole', 'eval.crop_size': 49, 'eval.batch_size': 8}


def refinement_config():
  """configs/cascadepsp.py:demo's ResNet-18 module with narrower decoders, at the official L."""
  config = configuration.load_config('configs/cascadepsp.py:demo')
  config.model.refine_widths = (16, 16, 16, 16)
  config.refine.L = 900
  return config


def random_variables(config) -> nnx.State:
  """Variables for config's model drawn in numpy (eager JAX initialization would cost seconds
  of small compiles): normal kernels of variance 1 / fan-in, zero biases, identity
  BatchNorms, and the last layer's bias at 2 so that the refined components grow into their
  boxes."""
  variables = checkpoint.model_variables(
      nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(0, np.sqrt(1 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name in ('scale', 'var') else 0.0, np.float32)

  values = jax.tree_util.tree_map_with_path(draw, variables.to_pure_dict())
  values['final_21']['bias'] += 2
  nnx.replace_by_pure_dict(variables, jax.tree.map(jax.numpy.asarray, values))
  return variables


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(segmentation config, PSPNet workdir, CascadePSP workdir with config.json, the split)."""
  from test_inference import trained_looking_model  # pylint: disable=import-outside-toplevel
  config = demo_config(str(tmp_path_factory.mktemp('tfds')), E2E_OVERRIDES)
  source = pipeline.load_split(config, config.data.eval_split)
  pspnet = str(tmp_path_factory.mktemp('pspnet'))
  checkpoint.save_model(pspnet, 0, checkpoint.model_variables(trained_looking_model(config)),
                        {'source': 'test'})
  cascadepsp = str(tmp_path_factory.mktemp('cascadepsp'))
  refine_config = refinement_config()
  checkpoint.save_model(cascadepsp, 0, random_variables(refine_config), {'source': 'test'})
  with open(os.path.join(cascadepsp, 'config.json'), 'w', encoding='utf-8') as file:
    file.write(refine_config.to_json(indent=2))
  return config, pspnet, cascadepsp, source


def command(name, config, workdir, *extra):
  return [sys.executable, '-m', f'pspnet_jax.{name}', '--config=configs/demo.py',
          f'--workdir={workdir}', f'--config.data.data_dir={config.data.data_dir}'] + [
              f'--config.{key}={value}' for key, value in E2E_OVERRIDES.items()] + list(extra)


def numpy_confusion(class_maps, labels, num_classes, ignore_label):
  """Rows truth, columns prediction, over all images, counted with numpy alone."""
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for class_map, label in zip(class_maps, labels):
    valid = label != ignore_label
    np.add.at(confusion, (label[valid].astype(int), class_map[valid].astype(int)), 1)
  return confusion


def numpy_miou(confusion):
  intersection = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - intersection
  present = confusion.sum(1) > 0
  return np.mean(intersection[present] / union[present])


@pytest.mark.slow
def test_evaluate_and_predict_refine(runs, tmp_path):
  config, pspnet, cascadepsp, source = runs
  saved = str(tmp_path / 'evaluated')
  result = subprocess.run(command('evaluate', config, pspnet, f'--refine_workdir={cascadepsp}',
                                  f'--save_predictions={saved}'),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]

  # The predictions it saved are the refined ones; their mIoU, counted here, is the one reported.
  names = [os.path.splitext(np.asarray(source[index]['file_name']).item().decode())[0]
           for index in range(len(source))]
  labels = [np.asarray(source[index]['label'])[..., 0] for index in range(len(source))]
  refined_maps = [cv2.imread(os.path.join(saved, 'gray', f'{name}.png'), cv2.IMREAD_UNCHANGED)
                  for name in names]
  confusion = numpy_confusion(refined_maps, labels, config.data.num_classes,
                              config.data.ignore_label)
  plain_path = os.path.join(pspnet, 'eval', 'validation-0-whole.json')
  refined_path = plain_path.removesuffix('.json') + '-cascadepsp.json'
  with open(plain_path, encoding='utf-8') as file:
    plain = json.load(file)
  with open(refined_path, encoding='utf-8') as file:
    refined = json.load(file)
  np.testing.assert_array_equal(np.load(refined_path.removesuffix('.json') + '.confusion.npy'),
                                confusion)
  assert refined['mIoU'] == pytest.approx(numpy_miou(confusion), abs=1e-12)
  # The model's own predictions are the plain evaluation's, and the refinement changed them.
  assert refined['unrefined'] == {key: plain[key] for key in ('mIoU', 'mAcc', 'allAcc', 'IoU',
                                                              'acc')}
  assert not np.array_equal(np.load(plain_path.removesuffix('.json') + '.confusion.npy'),
                            confusion)
  settings = refined['refinement']
  assert settings['workdir'] == os.path.realpath(cascadepsp) and settings['step'] == 0
  assert settings['L'] == 900 and settings['stuff_classes'] == []
  assert settings['mIoU_change'] == pytest.approx(refined['mIoU'] - plain['mIoU'])
  change = 100 * (refined['mIoU'] - plain['mIoU'])
  line = (f'mIoU {100 * plain["mIoU"]:.2f} -> {100 * refined["mIoU"]:.2f} ({change:+.2f}) with '
          'CascadePSP refinement')
  assert line in result.stderr
  print(line)

  # predict on the same images (lossless files), its config given: the same refined maps.
  folder = tmp_path / 'images'
  folder.mkdir()
  for index, name in enumerate(names):
    cv2.imwrite(str(folder / f'{os.path.basename(name)}.png'),
                np.asarray(source[index]['image'])[..., ::-1])
  out = str(tmp_path / 'predicted')
  result = subprocess.run(command('predict', config, pspnet, f'--input={folder}', f'--output={out}',
                                  f'--refine_workdir={cascadepsp}',
                                  f'--refine_config={cascadepsp}/config.json'),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  for name, expected in zip(names, refined_maps):
    gray = cv2.imread(os.path.join(out, 'gray', f'{os.path.basename(name)}.png'),
                      cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(gray, expected, err_msg=name)
  with open(os.path.join(out, 'prediction.json'), encoding='utf-8') as file:
    assert json.load(file)['protocol']['refinement']['workdir'] == os.path.realpath(cascadepsp)


def test_refinement_workdir_needs_a_refinement_config(runs):
  _, pspnet, cascadepsp, _ = runs
  with pytest.raises(UserError, match=r"not a CascadePSP one \(config.task='segmentation'"):
    scene_refinement.SceneRefiner.from_workdir(cascadepsp, 'configs/demo.py', dataset='ade20k')
  with pytest.raises(UserError, match='has no config.json'):
    scene_refinement.SceneRefiner.from_workdir(pspnet, dataset='ade20k')

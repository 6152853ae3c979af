"""The mmseg_whole and mmseg_slide protocols equal mmsegmentation 1.2.2's inference (PyTorch twin).

The reference below is a transcription of mmseg's test path in PyTorch, one
image at a time: mmcv's `Resize(keep_ratio=True)` (`rescale_size`,
`_scale_size`, cv2 linear on the image as it is), `SegDataPreProcessor`'s
normalization, `EncoderDecoder.whole_inference` / `slide_inference` (F.pad of
each window's logits into the canvas, `count_mat`), `predict_by_feat`'s
resize, `postprocess_result` (mirror back, F.interpolate to the original size,
align_corners=False) and `SegTTAModel.merge_preds` (softmax averaged), driving
the PyTorch twin of mmseg's PSPNet (ResNet-18, `parity.MMSEG_ARCHITECTURE`)
with the Flax model's weights. The Predictor batches windows of several images
of several shapes over 8 devices. Softmaxes agree to float32 tolerance; class
maps are equal wherever the reference's two best classes are not a near-tie.
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

from configs import demo
from demo_runs import REPO
from parity import MMSEG_ARCHITECTURE, make_twins
from pspnet_jax import checkpoint, configuration, inference, sharding

NUM_CLASSES = 5
HEADS = dict(head_channels=64, aux_channels=32)   # a small model: the protocol is under test
CROP, STRIDE = (65, 97), (43, 64)                  # non-square, as Cityscapes' 512 x 1024
# Bound of |probabilities - reference|: measured worst 7.1e-6 over this file's cases.
PROBABILITY_ATOL = 2e-5
MARGIN = 1e-4


def mmseg_config(protocol, *, box, scales=(1.0,), flip=False, batch_size=8):
  """demo's config with the twin's architecture (`create_model` of it loads the twin's
  weights) and an mmseg protocol."""
  config = demo.get_config()
  config.data.num_classes = NUM_CLASSES
  config.model.backbone = 'resnet18'
  config.model.output_stride = 8
  for key, value in {**MMSEG_ARCHITECTURE, **HEADS}.items():
    config.model[key] = value
  config.eval.protocol = protocol
  config.eval.mmseg_scale = box
  config.eval.mmseg_crop = CROP
  config.eval.mmseg_stride = STRIDE
  config.eval.scales = scales
  config.eval.flip = flip
  config.eval.batch_size = batch_size
  configuration.validate(config)
  return config


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread():
  """The reference's tensors are tiny: with two threads per op (on 2 cores busy with XLA's
  threads) torch waits on its thread pool, 10x slower."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def twins():
  twin, model = make_twins(18, NUM_CLASSES, **MMSEG_ARCHITECTURE, **HEADS)
  model.eval()
  return twin, model


def blob_images(sizes, seed=7):
  """[(index, uint8 RGB image)]: smooth blobs, so that the model's answer varies over the image."""
  rng = np.random.default_rng(seed)
  result = []
  for index, (height, width) in enumerate(sizes):
    small = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3)).astype(np.float32)
    result.append((index, cv2.resize(small, (width, height)).astype(np.uint8)))
  return result


# ---- mmseg 1.2.2 / mmcv 2.x, transcribed ----

def mmcv_rescale_size(width, height, scale):
  """mmcv.rescale_size((w, h), scale) for a (long, short) box."""
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(width * factor + 0.5), int(height * factor + 0.5)


def mmcv_resize(image, *, scale=None, scale_factor=None):
  """mmcv's Resize(scale=..., keep_ratio=True) or Resize(scale_factor=..., keep_ratio=True):
  `transform` makes the box (_scale_size of the image's (w, h) by the factor), `imrescale`
  fits the image into it and `imresize` calls cv2 (bilinear) on the image as it is."""
  height, width = image.shape[:2]
  if scale is None:
    scale = (int(width * float(scale_factor) + 0.5), int(height * float(scale_factor) + 0.5))
  return cv2.resize(image, mmcv_rescale_size(width, height, scale),
                    interpolation=cv2.INTER_LINEAR)


def preprocess(image, config):
  """SegDataPreProcessor (the image is RGB already): float, (x - mean) / std, a batch of one."""
  inputs = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
  mean = torch.tensor(config.data.mean, dtype=torch.float32).view(-1, 1, 1)
  std = torch.tensor(config.data.std, dtype=torch.float32).view(-1, 1, 1)
  return ((inputs - mean) / std)[None]


def encode_decode(twin, inputs):
  seg_logits = twin(inputs)
  # decode_head.predict_by_feat: to the window's size (the twin returns that size already).
  if seg_logits.shape[2:] != inputs.shape[2:]:
    seg_logits = F.interpolate(seg_logits, inputs.shape[2:], mode='bilinear',
                               align_corners=False)
  return seg_logits


def slide_inference(twin, inputs, crop, stride, windows_seen=None):
  h_stride, w_stride = stride
  h_crop, w_crop = crop
  batch_size, _, h_img, w_img = inputs.size()
  out_channels = NUM_CLASSES
  h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
  preds = inputs.new_zeros((batch_size, out_channels, h_img, w_img))
  count_mat = inputs.new_zeros((batch_size, 1, h_img, w_img))
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y1 = h_idx * h_stride
      x1 = w_idx * w_stride
      y2 = min(y1 + h_crop, h_img)
      x2 = min(x1 + w_crop, w_img)
      y1 = max(y2 - h_crop, 0)
      x1 = max(x2 - w_crop, 0)
      crop_img = inputs[:, :, y1:y2, x1:x2]
      if windows_seen is not None:
        windows_seen.append((y1, x1, y2 - y1, x2 - x1))
      crop_seg_logit = encode_decode(twin, crop_img)
      preds += F.pad(crop_seg_logit,
                     (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
      count_mat[:, :, y1:y2, x1:x2] += 1
  assert (count_mat == 0).sum() == 0
  return preds / count_mat


def postprocess_result(seg_logits, ori_shape, flip):
  """One image's logits: mirrored back, resized to the original shape (C, H, W)."""
  i_seg_logits = seg_logits[0:1]
  if flip:
    i_seg_logits = i_seg_logits.flip(dims=(3,))
  return F.interpolate(i_seg_logits, size=ori_shape, mode='bilinear',
                       align_corners=False).squeeze(0)


def mmseg_reference(twin, image, config):
  """(probabilities H x W x C, logits H x W x C or None under TTA) as mmseg computes them."""
  evaluation = config.eval
  ori_shape = image.shape[:2]

  def inference_(resized):
    inputs = preprocess(resized, config)
    if evaluation.protocol == 'mmseg_slide':
      return slide_inference(twin, inputs, evaluation.mmseg_crop, evaluation.mmseg_stride)
    return encode_decode(twin, inputs)   # whole_inference

  with torch.no_grad():
    if tuple(evaluation.scales) == (1.0,) and not evaluation.flip:   # test_pipeline
      logits = postprocess_result(inference_(mmcv_resize(image, scale=evaluation.mmseg_scale)),
                                  ori_shape, False)
      return (logits.softmax(dim=0).permute(1, 2, 0).numpy(),
              logits.permute(1, 2, 0).numpy())
    merged, count = 0, 0                                                # tta_pipeline
    for ratio in evaluation.scales:
      for flip in ((False, True) if evaluation.flip else (False,)):
        resized = mmcv_resize(image, scale_factor=ratio)
        if flip:
          resized = np.flip(resized, axis=1)    # RandomFlip(prob=1.): mmcv.imflip
        logits = postprocess_result(inference_(resized), ori_shape, flip)
        merged = merged + logits.softmax(dim=0)
        count += 1
    return (merged / count).permute(1, 2, 0).numpy(), None


# ---- the checks ----

def assert_matches(got, expected, name, atol=PROBABILITY_ATOL):
  """Probabilities within atol; equal class maps off near-ties."""
  assert got.shape == expected.shape, name
  assert got.dtype == np.float32, name
  np.testing.assert_allclose(got, expected, atol=atol, err_msg=name)
  top2 = np.sort(expected, axis=-1)[..., -2:]
  decided = top2[..., 1] - top2[..., 0] > MARGIN
  assert decided.mean() > 0.95, name
  np.testing.assert_array_equal(np.argmax(got, -1)[decided], np.argmax(expected, -1)[decided],
                                err_msg=name)
  # The model's answer varies over the image: the comparison means something.
  assert len(np.unique(np.argmax(expected, -1))) > 1, name


def check_protocol(twins, config, images):
  """The Predictor's probabilities of `images` (one call, 8 devices) against the reference."""
  twin, model = twins
  predictor = inference.Predictor.from_model(model, config)
  got = list(predictor.probabilities(images))
  assert [key for key, _ in got] == [key for key, _ in images]    # input order
  for (key, image), (_, probabilities) in zip(images, got):
    expected, logits = mmseg_reference(twin, image, config)
    assert_matches(probabilities, expected, f'image {key} {image.shape} {image.dtype}')
    if logits is not None:
      # Plain pipeline: the class map is mmseg's `pred_sem_seg`, the argmax of the logits.
      top2 = np.sort(logits, axis=-1)[..., -2:]
      decided = top2[..., 1] - top2[..., 0] > MARGIN
      np.testing.assert_array_equal(inference.class_map(probabilities)[decided],
                                    np.argmax(logits, -1)[decided], err_msg=str(key))


WHOLE_SIZES = [(40, 50), (120, 140), (150, 60), (40, 50)]


def test_whole_equals_mmseg(twins):
  """Box (96, 64): images scaled up and down, portrait and landscape; two images of one size
  share a step, one of them float (resized as float32, not on OpenCV's uint8 path)."""
  images = blob_images(WHOLE_SIZES)
  key, image = images[3]
  images[3] = key, image.astype(np.float32) + np.float32(0.25)
  check_protocol(twins, mmseg_config('mmseg_whole', box=(96, 64)), images)


# After Resize into (240, 80): (80, 107), (48, 240), (240, 80), (80, 103), (80, 107): windows of
# the crop (65, 97) (12 of them: two steps of 8), of (48, 97) (an image lower than the crop)
# and of (65, 80) (narrower).
SLIDE_SIZES = [(60, 80), (40, 200), (150, 50), (70, 90), (30, 40)]


def test_slide_equals_mmseg(twins):
  check_protocol(twins, mmseg_config('mmseg_slide', box=(240, 80)), blob_images(SLIDE_SIZES))


@pytest.mark.parametrize('protocol, sizes', [
    # Scale 0.5: (30, 40) and (55, 85), under the crop both ways; 1.25: 4 and 9 crop windows.
    ('mmseg_slide', [(60, 80), (110, 170)]),
    ('mmseg_whole', [(60, 80)])])
def test_tta_equals_mmseg(twins, protocol, sizes):
  """Two scale factors of the original image, each with its mirror, softmax averaged."""
  config = mmseg_config(protocol, box=(2048, 512), scales=(0.5, 1.25), flip=True)
  check_protocol(twins, config, blob_images(sizes))


def test_one_device_equals_eight_devices(twins):
  """Batch 3 on one device (three images in flight, windows of three shapes interleaved) and
  batch 8 on eight: the same probabilities."""
  _, model = twins
  config = mmseg_config('mmseg_slide', box=(240, 80))
  images = blob_images(SLIDE_SIZES)
  one = inference.Predictor.from_model(model, config, batch_size=3,
                                       mesh=sharding.make_mesh(jax.devices()[:1]))
  eight = inference.Predictor.from_model(model, config, batch_size=8)
  for (key_one, p_one), (key_eight, p_eight) in zip(one.probabilities(images),
                                                    eight.probabilities(images), strict=True):
    assert key_one == key_eight
    # Logits of ~10 in float32 through a per-device batch of 3 or 1: convolutions sum in
    # another order (measured: 2.4e-6).
    np.testing.assert_allclose(p_one, p_eight, atol=1e-5)


def test_windows_follow_mmseg_grid():
  """The grid, window shapes and resized sizes of mmseg/mmcv, over many sizes."""
  for height in range(20, 200, 13):
    for width in range(30, 260, 19):
      seen = []
      slide_inference(lambda x: torch.zeros(1, NUM_CLASSES, *x.shape[2:]),
                      torch.zeros(1, 3, height, width), CROP, STRIDE, seen)
      origins, shape = inference.mmseg_window_origins(height, width, CROP, STRIDE)
      assert [(top, left, *shape) for top, left in origins] == seen
      image = np.zeros((height, width, 3), np.uint8)
      for factor in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75):
        assert (inference.mmseg_scale_factor_size(height, width, factor) ==
                mmcv_resize(image, scale_factor=factor).shape[:2])


def test_host_resize_is_torch_bilinear():
  """Up, down, one axis only, 1-pixel sides, and Cityscapes' size, where float32 sample
  coordinates (torch's) and exact ones differ by 7e-4 on these values."""
  rng = np.random.default_rng(0)
  for (in_h, in_w), (out_h, out_w) in [((7, 9), (20, 31)), ((64, 90), (37, 41)), ((1, 5), (3, 5)),
                                       ((12, 12), (12, 29)), ((33, 17), (1, 1)),
                                       ((1024, 2048), (1000, 1999))]:
    values = rng.normal(size=(in_h, in_w, 3)).astype(np.float32)
    tensor = torch.from_numpy(values).permute(2, 0, 1)[None].contiguous()
    for mirrored in (False, True):   # a mirrored (negative-stride) view, as mmseg's flip back
      expected = F.interpolate(tensor.flip(dims=(3,)) if mirrored else tensor, (out_h, out_w),
                               mode='bilinear', align_corners=False)[0].permute(1, 2, 0).numpy()
      got = inference.resize_bilinear_host(values[:, ::-1] if mirrored else values, out_h, out_w)
      # The weights are torch's; sums of two products round in another order (measured 5e-7).
      np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_choose_shape_is_the_same_on_every_process():
  """Rows are (height, width, count) per process: the most windows summed over the processes
  proposing a shape, ties to the lowest process; zeros propose nothing."""
  assert inference.choose_shape(np.zeros((3, 3), np.int32)) is None
  assert inference.choose_shape(np.array([[0, 0, 0], [65, 97, 2]])) == (65, 97)
  assert inference.choose_shape(np.array([[48, 97, 3], [65, 97, 2], [65, 97, 2]])) == (65, 97)
  assert inference.choose_shape(np.array([[48, 97, 2], [65, 97, 2]])) == (48, 97)
  assert inference.choose_shape(np.array([[0, 0, 0], [65, 97, 1], [48, 97, 1]])) == (65, 97)


def test_protocol_settings():
  plain = inference.Protocol.from_config(mmseg_config('mmseg_slide', box=(2048, 1024)))
  assert plain.settings() == {'name': 'mmseg_slide', 'scales': [1.0], 'flip': False,
                              'tta': False, 'mmseg_scale': [2048, 1024], 'mmseg_crop': [65, 97],
                              'mmseg_stride': [43, 64]}
  tta = inference.Protocol.from_config(
      mmseg_config('mmseg_whole', box=(2048, 512), scales=(0.5, 1.0), flip=True))
  assert tta.settings() == {'name': 'mmseg_whole', 'scales': [0.5, 1.0], 'flip': True,
                            'tta': True}
  json.dumps(tta.settings())
  # semseg's protocols keep their settings.
  config = mmseg_config('mmseg_whole', box=(96, 64))
  config.eval.protocol = 'slide'
  assert set(inference.Protocol.from_config(config).settings()) == {
      'name', 'crop_size', 'base_size', 'scales', 'flip'}


_WORKER = """
import json, sys
import numpy as np
args = json.loads(sys.argv[1])
import jax
jax.distributed.initialize(args['address'], 2, args['process'])
sys.path.insert(0, args['tests'])
import test_inference_mmseg as t
from pspnet_jax import checkpoint, inference
config = t.mmseg_config('mmseg_slide', box=(240, 80), batch_size=2)
model = checkpoint.load_model(config, args['workdir']).model
images = [(key, image) for key, image in t.blob_images(t.SLIDE_SIZES) if key in args['keys']]
results = dict(inference.Predictor.from_model(model, config).probabilities(images))
assert list(results) == args['keys']
np.savez(args['output'], **{str(key): value for key, value in results.items()})
"""


@pytest.mark.slow
def test_two_processes_agree_on_shapes(twins, tmp_path):
  """Two processes (one device each, global batch 2) feed different images, of different
  window shapes and counts; each one's probabilities equal the reference."""
  twin, model = twins
  workdir = str(tmp_path / 'run')
  checkpoint.save_model(workdir, 0, checkpoint.model_variables(model), {'source': 'test'})
  from test_multihost import free_port  # pylint: disable=import-outside-toplevel
  address = f'127.0.0.1:{free_port()}'
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
         'JAX_PLATFORMS': 'cpu'}
  shares = [[0, 2, 4], [1, 3]]
  processes = [subprocess.Popen(
      [sys.executable, '-c', _WORKER, json.dumps({
          'address': address, 'process': index, 'tests': os.path.dirname(__file__),
          'workdir': workdir, 'keys': keys, 'output': str(tmp_path / f'{index}.npz')})],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for index, keys in enumerate(shares)]
  for process in processes:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
  config = mmseg_config('mmseg_slide', box=(240, 80))
  images = dict(blob_images(SLIDE_SIZES))
  for index, keys in enumerate(shares):
    got = np.load(tmp_path / f'{index}.npz')
    for key in keys:
      expected, _ = mmseg_reference(twin, images[key], config)
      assert_matches(got[str(key)], expected, f'process {index} image {key}')


def test_step_rows_shrink_to_a_power_of_two_multiple_of_the_devices():
  proposals = np.array([[65, 97, 3], [48, 97, 9], [65, 97, 1]])
  # The most windows of (65, 97) any process has is 3: 2 devices x 2 rows.
  assert inference.step_rows(proposals, (65, 97), 16, 2) == 4
  assert inference.step_rows(proposals, (48, 97), 16, 2) == 16
  assert inference.step_rows(proposals, (48, 97), 8, 2) == 8     # never above the batch
  assert inference.step_rows(proposals, (65, 97), 16, 8) == 8    # never below the devices

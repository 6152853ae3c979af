"""The slide and whole protocols equal semseg's `tool/test.py` running the PyTorch twin.

`semseg_probabilities` below is a transcription of semseg's `net_process`,
`scale_process` and the scale loop of `test` (numpy, cv2 and torch, one
window at a time, batch 2 for the flip); the Predictor batches windows of
several images over 8 devices. Probabilities agree to float32 tolerance and
the argmax is the same wherever the reference's two best classes are not a
near-tie.
"""

import math

import cv2
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from configs import demo
from pspnet_jax import checkpoint, inference, sharding, torch_reference, weights
from pspnet_jax.models import create_model

NUM_CLASSES = 5
SIZES = [(20, 25), (70, 50), (40, 90), (37, 61), (33, 33)]   # small, portrait, landscape, odd


def small_config(protocol='slide', scales=(1.0,), flip=True):
  config = demo.get_config()
  config.data.num_classes = NUM_CLASSES
  config.eval.protocol = protocol
  config.eval.crop_size = 33
  config.eval.base_size = 48
  config.eval.scales = scales
  config.eval.flip = flip
  config.eval.batch_size = 8
  return config


def trained_looking_model(config):
  """A model with BatchNorm statistics and a classifier far from the initial ones, so that
  the eval-mode outputs are not nearly uniform."""
  model = create_model(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  for path, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.BatchStat):
      shape = variable.get_value().shape
      value = (rng.uniform(0.5, 2.0, shape) if path[-1] == 'var' else
               rng.normal(0, 0.1, shape))
      variable.set_value(jax.numpy.asarray(value, jax.numpy.float32))
  model.cls.classifier.kernel.set_value(model.cls.classifier.kernel.get_value() * 20)
  model.eval()
  return model


# --- semseg's tool/test.py, transcribed -------------------------------------------------------

def net_process(model, image, mean, std, flip=True):
  tensor = torch.from_numpy(image.transpose((2, 0, 1))).float()
  for channel, m, s in zip(tensor, mean, std):
    channel.sub_(m).div_(s)
  tensor = tensor.unsqueeze(0)
  if flip:
    tensor = torch.cat([tensor, tensor.flip(3)], 0)
  with torch.no_grad():
    output = model(tensor)
  _, _, h_i, w_i = tensor.shape
  _, _, h_o, w_o = output.shape
  if (h_o != h_i) or (w_o != w_i):
    output = F.interpolate(output, (h_i, w_i), mode='bilinear', align_corners=True)
  output = F.softmax(output, dim=1)
  output = (output[0] + output[1].flip(2)) / 2 if flip else output[0]
  return output.numpy().transpose(1, 2, 0)


def scale_process(model, image, classes, crop_h, crop_w, h, w, mean, std, flip,
                  stride_rate=2 / 3):
  ori_h, ori_w, _ = image.shape
  pad_h = max(crop_h - ori_h, 0)
  pad_w = max(crop_w - ori_w, 0)
  pad_h_half = int(pad_h / 2)
  pad_w_half = int(pad_w / 2)
  if pad_h > 0 or pad_w > 0:
    image = cv2.copyMakeBorder(image, pad_h_half, pad_h - pad_h_half, pad_w_half,
                               pad_w - pad_w_half, cv2.BORDER_CONSTANT, value=mean)
  new_h, new_w, _ = image.shape
  stride_h = int(np.ceil(crop_h * stride_rate))
  stride_w = int(np.ceil(crop_w * stride_rate))
  grid_h = int(np.ceil(float(new_h - crop_h) / stride_h) + 1)
  grid_w = int(np.ceil(float(new_w - crop_w) / stride_w) + 1)
  prediction_crop = np.zeros((new_h, new_w, classes), dtype=float)
  count_crop = np.zeros((new_h, new_w), dtype=float)
  for index_h in range(0, grid_h):
    for index_w in range(0, grid_w):
      s_h = index_h * stride_h
      e_h = min(s_h + crop_h, new_h)
      s_h = e_h - crop_h
      s_w = index_w * stride_w
      e_w = min(s_w + crop_w, new_w)
      s_w = e_w - crop_w
      image_crop = image[s_h:e_h, s_w:e_w].copy()
      count_crop[s_h:e_h, s_w:e_w] += 1
      prediction_crop[s_h:e_h, s_w:e_w, :] += net_process(model, image_crop, mean, std, flip)
  prediction_crop /= np.expand_dims(count_crop, 2)
  prediction_crop = prediction_crop[pad_h_half:pad_h_half + ori_h, pad_w_half:pad_w_half + ori_w]
  return cv2.resize(prediction_crop, (w, h), interpolation=cv2.INTER_LINEAR)


def semseg_probabilities(model, image, classes, base_size, crop, scales, mean, std, flip):
  image = np.float32(image)
  h, w, _ = image.shape
  prediction = np.zeros((h, w, classes), dtype=float)
  for scale in scales:
    long_size = round(scale * base_size)
    new_h = long_size
    new_w = long_size
    if h > w:
      new_w = round(long_size / float(h) * w)
    else:
      new_h = round(long_size / float(w) * h)
    image_scale = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    prediction += scale_process(model, image_scale, classes, crop, crop, h, w, mean, std, flip)
  return prediction / len(scales)

# -----------------------------------------------------------------------------------------------


def torch_twin(config, model):
  twin = torch_reference.from_config(config)
  state = weights.to_torch_state_dict(checkpoint.model_variables(model))
  twin.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value in state.items()},
                       strict=False)
  return twin.eval()


def images():
  rng = np.random.default_rng(7)
  result = []
  for index, (height, width) in enumerate(SIZES):
    # Smooth blobs rather than noise: the model's answer then varies over the image.
    small = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3)).astype(np.float32)
    result.append((index, cv2.resize(small, (width, height)).astype(np.uint8)))
  return result


@pytest.mark.parametrize('protocol, scales, flip', [
    ('slide', (1.0,), True), ('slide', (1.0,), False), ('slide', (0.5, 1.0, 1.75), True),
    ('whole', (1.0,), True)])
def test_protocol_equals_semseg_test_py(protocol, scales, flip):
  config = small_config(protocol, scales, flip)
  model = trained_looking_model(config)
  twin = torch_twin(config, model)
  predictor = inference.Predictor.from_model(model, config)
  assert predictor.mesh.devices.size == 8
  settings = inference.Protocol.from_config(config)
  got = dict(predictor.probabilities(images()))
  for key, image in images():
    expected = semseg_probabilities(twin, image, NUM_CLASSES, settings.base_size,
                                    settings.crop_size, settings.scales, config.data.mean,
                                    config.data.std, flip)
    assert got[key].shape == expected.shape
    np.testing.assert_allclose(got[key], expected, atol=2e-5, err_msg=str(SIZES[key]))
    top2 = np.sort(expected, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 1e-4
    assert decided.mean() > 0.95
    np.testing.assert_array_equal(np.argmax(got[key], -1)[decided],
                                  np.argmax(expected, -1)[decided])
    # The model's answer varies over the image: the comparison means something.
    assert np.ptp(expected, axis=(0, 1)).max() > 0.01


def test_windows_follow_semseg_grid():
  crop, stride = 33, math.ceil(33 * 2 / 3)
  assert inference.window_origins(33, 33, crop) == [(0, 0)]
  origins = inference.window_origins(70, 40, crop)
  tops = sorted({top for top, _ in origins})
  lefts = sorted({left for _, left in origins})
  assert tops == [0, stride, 70 - crop] and lefts == [0, 40 - crop]


def test_one_device_equals_eight_devices():
  config = small_config('slide', (0.75, 1.25), True)
  model = trained_looking_model(config)
  one = inference.Predictor.from_model(model, config, batch_size=3,
                                       mesh=sharding.make_mesh(jax.devices()[:1]))
  eight = inference.Predictor.from_model(model, config, batch_size=8)
  for (key_one, p_one), (key_eight, p_eight) in zip(one.probabilities(images()),
                                                    eight.probabilities(images())):
    assert key_one == key_eight
    np.testing.assert_allclose(p_one, p_eight, atol=1e-6)
    np.testing.assert_array_equal(inference.class_map(p_one), inference.class_map(p_eight))

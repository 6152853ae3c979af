"""The slide and whole protocols equal semseg's `tool/test.py` running the PyTorch twin.

`eval_speed.semseg_probabilities` is a transcription of semseg's
`net_process`, `scale_process` and the scale loop of `test` (numpy, cv2 and
torch, one window at a time, batch 2 for the flip; the benchmark times the
same code); the Predictor batches windows of several images over 8 devices. Probabilities agree to float32 tolerance and
the argmax is the same wherever the reference's two best classes are not a
near-tie.
"""

import math

import cv2
import jax
import numpy as np
import pytest
from flax import nnx

from configs import demo
from pspnet_jax import inference, sharding
from pspnet_jax.benchmarks import eval_speed
from pspnet_jax.models import create_model

NUM_CLASSES = 5
SIZES = [(20, 25), (70, 50), (40, 90), (37, 61), (33, 33)]   # small, portrait, landscape, odd


def small_config(protocol='slide', scales=(1.0,), flip=True, num_classes=NUM_CLASSES):
  config = demo.get_config()
  config.data.num_classes = num_classes
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
  twin = eval_speed.semseg_twin(config, model)
  predictor = inference.Predictor.from_model(model, config)
  assert predictor.mesh.devices.size == 8
  settings = inference.Protocol.from_config(config)
  got = dict(predictor.probabilities(images()))
  for key, image in images():
    expected = eval_speed.semseg_probabilities(twin, image, NUM_CLASSES, settings,
                                               config.data.mean, config.data.std)
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


def test_more_classes_than_opencv_resizes_at_once():
  """ADE20K's 150 probabilities are resized back to the image in slices of 128 channels."""
  config = small_config('whole', num_classes=150)
  model = trained_looking_model(config)
  image = images()[2][1]
  _, got = inference.Predictor.from_model(model, config).predict(image)
  expected = eval_speed.semseg_probabilities(eval_speed.semseg_twin(config, model), image, 150,
                                             inference.Protocol.from_config(config),
                                             config.data.mean, config.data.std)
  np.testing.assert_allclose(got, expected, atol=2e-5)

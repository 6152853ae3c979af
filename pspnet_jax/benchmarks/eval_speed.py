"""How fast the slide protocol runs, beside semseg's `tool/test.py` way on the same images and
weights.

`measure_eval`: `inference.Predictor` with the slide protocol and the
config's eval.crop_size, base_size, scales and flip, `batch_size` windows per
step over all local devices, on `num_images` ADE20K-sized images (fake_ade20k's
JPEGs, read back as RGB), from the images to their probabilities at their own
size. One image goes through first to compile the step; that warm-up is timed
on its own. Reported: images/s, windows/s and windows/s per device. The model
keeps its initial weights: the cost does not depend on their values.

With `semseg_reference` the same images then go through `semseg_probabilities`,
a transcription of semseg's `net_process`, `scale_process` and the scale loop
of `test`: the PyTorch twin with the same weights, one window at a time (batch
2 with its mirror), float64 canvases, cv2 resizes, on as many threads as XLA's
CPU client uses; also after one warm-up image. tests/test_benchmark.py holds
it equal to the Predictor, so both sides time the same computation.
"""

import os
import tempfile
import time

import cv2
import jax
import numpy as np
from flax import nnx

from pspnet_jax import checkpoint, configuration, inference, weights
from pspnet_jax.benchmarks import fake_ade20k
from pspnet_jax.models import create_model


def ade20k_sized_images(count: int) -> list[tuple[int, np.ndarray]]:
  """`count` (index, RGB uint8 image) pairs of fake_ade20k's sizes (512 x 600..800, both
  orientations), written as JPEG and read back, as evaluation reads images."""
  with tempfile.TemporaryDirectory(prefix='fake_ade20k_') as root:
    pairs = fake_ade20k.write(root, count)
    return [(index, cv2.cvtColor(cv2.imread(image_path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
            for index, (image_path, _) in enumerate(pairs)]


def window_count(height: int, width: int, protocol: inference.Protocol) -> int:
  """Windows of one image over the protocol's scales."""
  crop = protocol.crop_size
  count = 0
  for scale in protocol.scales:
    new_h, new_w = inference.scaled_size(height, width, round(scale * protocol.base_size))
    count += len(inference.window_origins(max(new_h, crop), max(new_w, crop), crop))
  return count


def measure_eval(config, batch_size: int, num_images: int, *,
                 semseg_reference: bool = False) -> dict:
  """Images/s and windows/s of the slide protocol (and of semseg's way with semseg_reference)."""
  configuration.validate(config)
  protocol = inference.Protocol.from_config(config, 'slide')
  images = ade20k_sized_images(num_images)
  windows = sum(window_count(*image.shape[:2], protocol) for _, image in images)
  model = create_model(config, rngs=nnx.Rngs(0))
  model.eval()
  predictor = inference.Predictor.from_model(model, config, protocol=protocol,
                                             batch_size=batch_size)
  num_devices = predictor.mesh.devices.size
  warmup, seconds = _warm_and_timed(lambda batch: _drain(predictor.probabilities(batch)), images)
  result = {'what': 'eval', 'backbone': config.model.backbone, 'dtype': config.model.dtype,
            'num_classes': config.data.num_classes, 'protocol': protocol.name,
            'crop_size': protocol.crop_size, 'base_size': protocol.base_size,
            'scales': list(protocol.scales), 'flip': protocol.flip,
            'batch_size': batch_size, 'device': jax.devices()[0].device_kind,
            'num_devices': num_devices, 'num_images': num_images,
            'image_sizes': sorted({image.shape[:2] for _, image in images}),
            'windows': windows, 'warmup_seconds': round(warmup, 2), 'seconds': round(seconds, 2),
            'images_per_s': round(num_images / seconds, 4),
            'windows_per_s': round(windows / seconds, 4),
            'windows_per_s_per_device': round(windows / seconds / num_devices, 4)}
  if semseg_reference:
    import torch  # pylint: disable=import-outside-toplevel
    # XLA's CPU client runs on every CPU this process may use; PyTorch's default
    # counts physical cores, which differs on hyperthreaded machines.
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    twin = semseg_twin(config, model)

    def semseg_way(batch):
      for _, image in batch:
        semseg_probabilities(twin, image, config.data.num_classes, protocol, config.data.mean,
                             config.data.std)

    semseg_warmup, semseg_seconds = _warm_and_timed(semseg_way, images)
    result.update({'semseg_way_warmup_seconds': round(semseg_warmup, 2),
                   'semseg_way_seconds': round(semseg_seconds, 2),
                   'semseg_way_images_per_s': round(num_images / semseg_seconds, 4),
                   'semseg_way_windows_per_s': round(windows / semseg_seconds, 4),
                   'torch_threads': torch.get_num_threads(),
                   'speedup_over_semseg_way': round(semseg_seconds / seconds, 3)})
  return result


def _drain(iterator) -> None:
  # Each image's probabilities are dropped before the next, as an evaluation loop does.
  for _ in iterator:
    pass


def _warm_and_timed(run, images) -> tuple[float, float]:
  """Seconds of run(images[:1]) (warm-up: compilation, allocation) and then of run(images)."""
  start = time.perf_counter()
  run(images[:1])
  warm = time.perf_counter()
  run(images)
  return warm - start, time.perf_counter() - warm


def semseg_twin(config, model: nnx.Module):
  """The PyTorch twin of the official model with `model`'s weights, in eval mode."""
  import torch  # pylint: disable=import-outside-toplevel
  from pspnet_jax import torch_reference  # pylint: disable=import-outside-toplevel
  twin = torch_reference.from_config(config)
  state = weights.to_torch_state_dict(checkpoint.model_variables(model))
  twin.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value in state.items()})
  return twin.eval()


# --- semseg's tool/test.py, transcribed (CPU: no .cuda()) ------------------------------------

# OpenCV 5 resizes at most 128 channels at once (CV_CN_MAX; OpenCV 4, semseg's, 512).
_CV_MAX_CHANNELS = 128


def cv2_resize(array, size):
  """cv2.resize(array, size, INTER_LINEAR) as OpenCV 4 does it in one call: in slices of the
  channels (a linear resize treats each channel alone; ADE20K has 150)."""
  return np.concatenate([
      cv2.resize(array[..., first:first + _CV_MAX_CHANNELS], size,
                 interpolation=cv2.INTER_LINEAR).reshape(size[1], size[0], -1)
      for first in range(0, array.shape[-1], _CV_MAX_CHANNELS)], axis=-1)


def net_process(model, image, mean, std, flip=True):
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
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
  return cv2_resize(prediction_crop, (w, h))


def semseg_probabilities(model, image, classes: int, protocol: inference.Protocol, mean, std):
  """One image's probabilities (H x W x classes, float64) the way semseg's `test` computes them."""
  image = np.float32(image)
  h, w, _ = image.shape
  prediction = np.zeros((h, w, classes), dtype=float)
  for scale in protocol.scales:
    long_size = round(scale * protocol.base_size)
    new_h = long_size
    new_w = long_size
    if h > w:
      new_w = round(long_size / float(h) * w)
    else:
      new_h = round(long_size / float(w) * h)
    image_scale = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    prediction += scale_process(model, image_scale, classes, protocol.crop_size,
                                protocol.crop_size, h, w, mean, std, protocol.flip)
  return prediction / len(protocol.scales)

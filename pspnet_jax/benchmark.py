"""Measured throughput, printed as one JSON line.

  python -m pspnet_jax.benchmark --config=configs/ade20k.py --what=forward --batch_size=1 \\
      [--torch_reference]

`--what=forward`: the eval-mode forward of the config's model on a
crop_size x crop_size batch, compile time excluded, median over `--steps`
timed calls. `--torch_reference` times the PyTorch twin of the official model
(tests/torch_pspnet.py, needs torch) in the same run, same size, same threads.
"""

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from pspnet_jax import configuration
from pspnet_jax.models import create_model

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WHAT = flags.DEFINE_enum('what', 'forward', ['forward'], 'What to measure.')
_BATCH = flags.DEFINE_integer('batch_size', 1, 'Images per call.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed calls after one warm-up call.')
_TORCH = flags.DEFINE_bool('torch_reference', False, 'Also time the PyTorch twin.')


def _median_seconds(fn, steps: int) -> float:
  fn()  # warm-up: compilation, allocation
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _torch_forward_seconds(config, images: np.ndarray, steps: int) -> float:
  import torch  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'tests'))
  import torch_pspnet  # pylint: disable=import-outside-toplevel
  model = torch_pspnet.PSPNet(int(config.model.backbone.removeprefix('resnet')),
                              classes=config.data.num_classes,
                              deep_base=config.model.deep_stem,
                              output_stride=config.model.output_stride,
                              use_ppm=config.model.use_ppm).eval()
  batch = torch.from_numpy(np.transpose(images, (0, 3, 1, 2)).copy())

  def run():
    with torch.no_grad():
      model(batch)

  return _median_seconds(run, steps)


def main(argv):
  del argv
  config = _CONFIG.value
  configuration.validate(config)
  size = config.data.crop_size
  images = np.random.RandomState(0).randn(_BATCH.value, size, size, 3).astype(np.float32)
  model = create_model(config, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  device_images = jnp.asarray(images)
  seconds = _median_seconds(lambda: forward(state, device_images).block_until_ready(),
                            _STEPS.value)
  result = {'what': _WHAT.value, 'backbone': config.model.backbone, 'dtype': config.model.dtype,
            'size': size, 'batch_size': _BATCH.value, 'device': jax.devices()[0].device_kind,
            'jax_seconds': round(seconds, 4), 'jax_images_per_s': round(_BATCH.value / seconds, 3)}
  if _TORCH.value:
    torch_seconds = _torch_forward_seconds(config, images, _STEPS.value)
    result.update(torch_seconds=round(torch_seconds, 4),
                  torch_images_per_s=round(_BATCH.value / torch_seconds, 3))
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)

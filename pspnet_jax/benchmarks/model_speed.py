"""How fast the model runs: the eval-mode forward and the training step, beside the PyTorch reference.

`measure_forward`: the eval-mode forward of the config's model on a
crop_size x crop_size batch of random images, compile time excluded, median
over `steps` timed calls after one warm-up call.

`measure_train`: the jitted training step of train.py (forward, loss,
backward, SGD update) on a mesh of all local devices, a global batch of
random normalized images and random labels, some ignored. Compilation is
timed on its own; then the median over `steps` timed steps after one warm-up
step. FLOPs per step come from XLA's cost analysis of the compiled step (per
device, summed over the mesh); MFU divides the achieved FLOP/s by the
devices' dense peak for the config's compute dtype where that peak is known
(`_PEAK_FLOPS`), else it is null (CPUs among them).

With `torch_reference`, both also time the PyTorch twin of the official model
(`pspnet_jax.torch_reference`, needs torch) in the same run on the same batch
with as many threads as XLA's CPU client uses; for train it takes semseg's
step (`torch_reference.semseg_train_step`).
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pspnet_jax import configuration, sharding, train
from pspnet_jax.benchmarks import compile_plan
from pspnet_jax.data import transforms
from pspnet_jax.benchmarks.timing import median_seconds
from pspnet_jax.models import create_model

# Names some releases report for the planner's 'TPU v5' (v5p) and 'TPU v6 lite' (v6e).
_TPU_ALIASES = {'TPU v5p': 'TPU v5', 'TPU v6e': 'TPU v6 lite'}
# Dense peak FLOP/s of one device by compute dtype, from the vendors' spec
# sheets, keyed by the exact jax device_kind: a near miss (H100 PCIe or NVL for
# SXM, TPU v4 lite for v4) would be off by up to 2x, so unknown kinds get no
# MFU rather than a guess. float32 is the rate of XLA's default precision for
# float32 convolutions: TF32 tensor cores on NVIDIA, one bfloat16 pass on TPU.
_PEAK_FLOPS = {
    'NVIDIA H100 80GB HBM3': {'bfloat16': 989e12, 'float32': 495e12},  # SXM
    'NVIDIA H100 PCIe': {'bfloat16': 756e12, 'float32': 378e12},
    'NVIDIA H100 NVL': {'bfloat16': 835e12, 'float32': 418e12},
    'NVIDIA H200': {'bfloat16': 989e12, 'float32': 495e12},
    'NVIDIA A100-SXM4-40GB': {'bfloat16': 312e12, 'float32': 156e12},
    'NVIDIA A100-SXM4-80GB': {'bfloat16': 312e12, 'float32': 156e12},
    'NVIDIA A100-PCIE-40GB': {'bfloat16': 312e12, 'float32': 156e12},
    'NVIDIA A100 80GB PCIe': {'bfloat16': 312e12, 'float32': 156e12},
    # TPUs: the planner's chip table (float32 is one bfloat16 pass), also under the names
    # some releases report.
    **{kind: dict.fromkeys(('bfloat16', 'float32'),
                           compile_plan.TPU_CHIPS[_TPU_ALIASES.get(kind, kind)].peak_flops)
       for kind in [*compile_plan.TPU_CHIPS, *_TPU_ALIASES]},
}
# Share of the random labels set to the ignore label, so the loss takes its masked path.
_IGNORED_FRACTION = 0.1


def random_batch(config, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Images like normalized ones (zero mean, unit variance) and labels in range, some ignored."""
  rs = np.random.RandomState(0)
  shape = (batch_size, *transforms.crop_shape(config.data))
  images = rs.randn(*shape, 3).astype(np.float32)
  labels = rs.randint(0, config.data.num_classes, shape).astype(np.int32)
  labels[rs.rand(*shape) < _IGNORED_FRACTION] = config.data.ignore_label
  return images, labels


def _model_fields(what: str, config, batch_size: int, num_devices: int) -> dict:
  return {'what': what, 'backbone': config.model.backbone, 'dtype': config.model.dtype,
          'size': config.data.crop_size if not config.data.crop_width
                  else list(transforms.crop_shape(config.data)), 'batch_size': batch_size,
          'device': jax.devices()[0].device_kind, 'num_devices': num_devices}


def measure_forward(config, batch_size: int, steps: int, *, torch_reference: bool = False) -> dict:
  """The eval-mode forward: seconds and images per second (and the twin's with torch_reference)."""
  configuration.validate(config)
  images, _ = random_batch(config, batch_size)
  model = create_model(config, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  device_images = jnp.asarray(images)
  seconds = median_seconds(lambda: forward(state, device_images).block_until_ready(), steps)
  result = {**_model_fields('forward', config, batch_size, 1), 'jax_seconds': round(seconds, 4),
            'jax_images_per_s': round(batch_size / seconds, 3)}
  if torch_reference:
    result.update(_torch_fields(_torch_forward_seconds(config, images, steps), seconds,
                                batch_size))
  return result


def measure_train(config, batch_size: int, steps: int, *, torch_reference: bool = False) -> dict:
  """The jitted training step on all local devices: compile time, step time, FLOPs and MFU."""
  train.validate(config)
  mesh = sharding.make_mesh(jax.local_devices())
  sharding.local_batch_size(batch_size, mesh)
  num_devices = mesh.devices.size
  images, labels = random_batch(config, batch_size)
  # The schedule spans exactly the steps taken (warm-up included): every step
  # runs at a positive rate, as in a real run; the rate does not change the cost.
  num_steps = steps + 1
  state, graphdef, _, tx = train.create_train_state(config, mesh, num_steps)
  batch = sharding.to_global({'image': images, 'label': labels}, mesh)
  step_fn = train.jit_train_step(mesh, graphdef=graphdef, tx=tx, config=config,
                                 num_steps=num_steps)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start

  def step():
    nonlocal state  # the step donates the old state
    state, step_metrics = compiled(state, batch)
    jax.block_until_ready(step_metrics)

  seconds = median_seconds(step, steps)
  # The compiled step is the SPMD-partitioned program of one device.
  flops = compiled.cost_analysis()['flops'] * num_devices
  achieved = flops / seconds
  device_peak = _PEAK_FLOPS.get(jax.devices()[0].device_kind, {}).get(config.model.dtype)
  mfu = None if device_peak is None else round(achieved / (device_peak * num_devices), 4)
  result = {**_model_fields('train', config, batch_size, num_devices),
            'compile_seconds': round(compile_seconds, 2), 'jax_seconds': round(seconds, 4),
            'jax_images_per_s': round(batch_size / seconds, 3), 'flops_per_step': flops,
            'flops_counted': f'XLA cost_analysis per device x {num_devices} device(s)',
            'achieved_flops_per_s': float(f'{achieved:.4g}'),
            'peak_flops_per_s_per_device': device_peak, 'mfu': mfu}
  if torch_reference:
    torch_seconds = _torch_train_seconds(config, images, labels, steps, num_steps)
    result.update(_torch_fields(torch_seconds, seconds, batch_size))
  return result


# The PyTorch side. torch and the reference are imported inside the functions:
# torch is a development dependency, needed only with torch_reference.


def _torch_twin(config):
  """The PyTorch twin of the official model for `config`, with torch on XLA's thread count."""
  import torch  # pylint: disable=import-outside-toplevel
  from pspnet_jax import torch_reference  # pylint: disable=import-outside-toplevel
  # XLA's CPU client runs on every CPU this process may use; PyTorch's default
  # counts physical cores, which differs on hyperthreaded machines.
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  return torch_reference.from_config(config)


def _torch_fields(torch_seconds: float, jax_seconds: float, batch_size: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  return {'torch_seconds': round(torch_seconds, 4),
          'torch_images_per_s': round(batch_size / torch_seconds, 3),
          'torch_threads': torch.get_num_threads(),
          'jax_speedup_over_torch': round(torch_seconds / jax_seconds, 3)}


def _nchw(images: np.ndarray):
  import torch  # pylint: disable=import-outside-toplevel
  return torch.from_numpy(np.ascontiguousarray(np.transpose(images, (0, 3, 1, 2))))


def _torch_forward_seconds(config, images: np.ndarray, steps: int) -> float:
  import torch  # pylint: disable=import-outside-toplevel
  model = _torch_twin(config).eval()
  batch = _nchw(images)

  def run():
    with torch.no_grad():
      model(batch)

  return median_seconds(run, steps)


def _torch_train_seconds(config, images: np.ndarray, labels: np.ndarray, steps: int,
                         num_steps: int) -> float:
  """semseg's training iteration on the twin, the poly schedule over `num_steps`."""
  import torch  # pylint: disable=import-outside-toplevel
  from pspnet_jax import torch_reference  # pylint: disable=import-outside-toplevel
  step = torch_reference.semseg_train_step(_torch_twin(config), config, num_steps)
  batch, target = _nchw(images), torch.from_numpy(labels.astype(np.int64))
  return median_seconds(lambda: step(batch, target), steps)

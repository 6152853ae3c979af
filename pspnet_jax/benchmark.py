"""Measured throughput, printed as one JSON line.

  python -m pspnet_jax.benchmark --config=configs/ade20k.py --what=forward --batch_size=1 \\
      [--torch_reference]
  python -m pspnet_jax.benchmark --config=configs/ade20k.py --what=train --batch_size=2 \\
      --config.data.crop_size=233 [--torch_reference]
  python -m pspnet_jax.benchmark --config=configs/demo.py --what=input --steps=50 \\
      [--config.data.worker_count=2]
  python -m pspnet_jax.benchmark --config=configs/ade20k.py --what=input --fake_ade20k=64 \\
      --steps=40 --batch_size=8 --semseg_reference

`--what=forward`: the eval-mode forward of the config's model on a
crop_size x crop_size batch of `--batch_size` (default 1) images, compile time
excluded, median over `--steps` timed calls after one warm-up call.

`--what=train`: the jitted training step of train.py (forward, loss, backward,
SGD update) on a mesh of all local devices, global batch `--batch_size`
(default train.batch_size) of random normalized images and random labels, some
ignored. Compilation is timed on its own; then the median over `--steps` timed
steps after one warm-up step. FLOPs per step come from XLA's cost analysis of
the compiled step (per device, summed over the mesh); MFU divides the achieved
FLOP/s by the devices' dense peak for the config's compute dtype where that
peak is known (`_PEAK_FLOPS`), else it is null (CPUs among them).

`--torch_reference` (forward, train) also times the PyTorch twin of the
official model (tests/torch_pspnet.py, needs torch) in the same run on the
same batch with as many threads as XLA's CPU client uses; for train it takes
semseg's step: CrossEntropyLoss(ignore_index) of main + aux_weight * aux,
backward, SGD with momentum and weight decay, the heads at head_lr_mult x the
base rate, the poly rate set after each step.

`--what=input`: augmented images per second out of `pipeline.train_loader`
(the config's augmentation, data.worker_count, batches of `--batch_size`,
default train.batch_size) over `--steps` batches, after a warm-up that drains
what the loader prepared while it started; also per CPU second, counting this
process's threads and its Grain worker processes, the measure of cost per
core whatever the threads and workers. The synthetic dataset is built into
data.data_dir on first use, outside the timing. `--fake_ade20k=N` writes N
ADE20K-sized JPEG/PNG pairs in the official layout to a temporary folder and
builds them with the ADE20K builder first (no real data needed);
`--semseg_reference` then also times semseg's way on the same files:
cv2.imread and the semseg chain on the whole image (`transforms.semseg_chain`)
per sample in a Python loop.
"""

import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import cv2

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from pspnet_jax import configuration, optim, sharding, train
from pspnet_jax.data import ade20k, pipeline, transforms
from pspnet_jax.models import create_model

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WHAT = flags.DEFINE_enum('what', 'forward', ['forward', 'train', 'input'], 'What to measure.')
_BATCH = flags.DEFINE_integer(
    'batch_size', None, 'Images per call (forward, default 1) or global batch per step (train, '
    'input, default config.train.batch_size).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed calls, steps or batches after the warm-up.')
_TORCH = flags.DEFINE_bool('torch_reference', False,
                           'Also time the PyTorch twin (forward and train).')
_FAKE_ADE = flags.DEFINE_integer(
    'fake_ade20k', 0, 'input: write this many ADE20K-sized JPEG/PNG pairs in the official '
    'layout to a temporary folder, build them with the ADE20K builder and measure on them.')
_SEMSEG_REFERENCE = flags.DEFINE_bool(
    'semseg_reference', False, 'input with --fake_ade20k: also time the semseg way on the same '
    'files (cv2.imread and the same augmentation per sample in a Python for loop).')

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
    'TPU v4': {'bfloat16': 275e12, 'float32': 275e12},
    'TPU v5 lite': {'bfloat16': 197e12, 'float32': 197e12},  # v5e
    'TPU v5': {'bfloat16': 459e12, 'float32': 459e12},       # v5p
    'TPU v5p': {'bfloat16': 459e12, 'float32': 459e12},
    'TPU v6 lite': {'bfloat16': 918e12, 'float32': 918e12},  # v6e (Trillium)
    'TPU v6e': {'bfloat16': 918e12, 'float32': 918e12},
}
# Batches the input benchmark takes before its clock starts (workers add their
# buffers): the first ~10 batches run ~10% slower (reader threads starting,
# the allocator growing to a batch's working set).
_INPUT_WARMUP_BATCHES = 10
# Share of the random labels set to the ignore label, so the loss takes its masked path.
_IGNORED_FRACTION = 0.1


def _median_seconds(fn, steps: int) -> float:
  fn()  # warm-up: compilation, allocation
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _random_batch(config, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Images like normalized ones (zero mean, unit variance) and labels in range, some ignored."""
  rs = np.random.RandomState(0)
  size = config.data.crop_size
  images = rs.randn(batch_size, size, size, 3).astype(np.float32)
  labels = rs.randint(0, config.data.num_classes, (batch_size, size, size)).astype(np.int32)
  labels[rs.rand(batch_size, size, size) < _IGNORED_FRACTION] = config.data.ignore_label
  return images, labels


def _model_fields(config, batch_size: int, num_devices: int) -> dict:
  return {'what': _WHAT.value, 'backbone': config.model.backbone, 'dtype': config.model.dtype,
          'size': config.data.crop_size, 'batch_size': batch_size,
          'device': jax.devices()[0].device_kind, 'num_devices': num_devices}


def _torch_twin(config):
  """The PyTorch twin of the official model for `config`, with torch on XLA's thread count."""
  import torch  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'tests'))
  import torch_pspnet  # pylint: disable=import-outside-toplevel
  # XLA's CPU client runs on every CPU this process may use; PyTorch's default
  # counts physical cores, which differs on hyperthreaded machines.
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  return torch_pspnet.PSPNet(int(config.model.backbone.removeprefix('resnet')),
                             bins=tuple(config.model.ppm_bins), dropout=config.model.dropout,
                             classes=config.data.num_classes, zoom_factor=config.model.zoom_factor,
                             use_ppm=config.model.use_ppm, deep_base=config.model.deep_stem,
                             output_stride=config.model.output_stride)


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

  return _median_seconds(run, steps)


def _torch_train_seconds(config, images: np.ndarray, labels: np.ndarray, steps: int,
                         num_steps: int) -> float:
  """semseg's training iteration on the twin, the poly schedule over `num_steps`."""
  import torch  # pylint: disable=import-outside-toplevel
  model = _torch_twin(config).train()
  head = [p for name, p in model.named_parameters() if name.split('.')[0] in optim.HEAD_MODULES]
  backbone = [p for name, p in model.named_parameters()
              if name.split('.')[0] not in optim.HEAD_MODULES]
  opt = config.optim
  sgd = torch.optim.SGD(
      [{'params': backbone}, {'params': head, 'lr': opt.base_lr * opt.head_lr_mult}],
      lr=opt.base_lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
  criterion = torch.nn.CrossEntropyLoss(ignore_index=config.data.ignore_label)
  batch, target = _nchw(images), torch.from_numpy(labels.astype(np.int64))
  iteration = 0

  def step():
    nonlocal iteration
    logits, aux_logits = model(batch, return_aux=True)
    loss = criterion(logits, target) + config.model.aux_weight * criterion(aux_logits, target)
    sgd.zero_grad()
    loss.backward()
    sgd.step()
    iteration += 1
    lr = opt.base_lr * (1 - iteration / num_steps) ** opt.power
    sgd.param_groups[0]['lr'], sgd.param_groups[1]['lr'] = lr, lr * opt.head_lr_mult

  return _median_seconds(step, steps)


def _forward(config, batch_size: int, steps: int) -> dict:
  configuration.validate(config)
  images, _ = _random_batch(config, batch_size)
  model = create_model(config, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  device_images = jnp.asarray(images)
  seconds = _median_seconds(lambda: forward(state, device_images).block_until_ready(), steps)
  result = {**_model_fields(config, batch_size, 1), 'jax_seconds': round(seconds, 4),
            'jax_images_per_s': round(batch_size / seconds, 3)}
  if _TORCH.value:
    result.update(_torch_fields(_torch_forward_seconds(config, images, steps), seconds,
                                batch_size))
  return result


def _train(config, batch_size: int, steps: int) -> dict:
  train.validate(config)
  mesh = sharding.make_mesh(jax.local_devices())
  sharding.local_batch_size(batch_size, mesh)
  num_devices = mesh.devices.size
  images, labels = _random_batch(config, batch_size)
  # The schedule spans exactly the steps taken (warm-up included): every step
  # runs at a positive rate, as in a real run; the rate does not change the cost.
  num_steps = steps + 1
  state, graphdef, _, tx = train.create_train_state(config, num_steps)
  state = sharding.replicate(state, mesh)
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

  seconds = _median_seconds(step, steps)
  # The compiled step is the SPMD-partitioned program of one device.
  flops = compiled.cost_analysis()['flops'] * num_devices
  achieved = flops / seconds
  device_peak = _PEAK_FLOPS.get(jax.devices()[0].device_kind, {}).get(config.model.dtype)
  mfu = None if device_peak is None else round(achieved / (device_peak * num_devices), 4)
  result = {**_model_fields(config, batch_size, num_devices),
            'compile_seconds': round(compile_seconds, 2), 'jax_seconds': round(seconds, 4),
            'jax_images_per_s': round(batch_size / seconds, 3), 'flops_per_step': flops,
            'flops_counted': f'XLA cost_analysis per device x {num_devices} device(s)',
            'achieved_flops_per_s': float(f'{achieved:.4g}'),
            'peak_flops_per_s_per_device': device_peak, 'mfu': mfu}
  if _TORCH.value:
    torch_seconds = _torch_train_seconds(config, images, labels, steps, num_steps)
    result.update(_torch_fields(torch_seconds, seconds, batch_size))
  return result


def _write_fake_ade20k(root: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
  """`count` training pairs shaped like ADE20K's (about 512 x 683, smooth photo-like content
  that compresses like a photo, piecewise-constant labels 0..150) under root/ in the
  official layout, plus one validation pair; returns the training (image, label) paths."""
  rng = np.random.default_rng(seed)
  pairs = []
  for split, number in (('training', count), ('validation', 1)):
    os.makedirs(os.path.join(root, 'images', split))
    os.makedirs(os.path.join(root, 'annotations', split))
    for index in range(number):
      height, width = (512, int(rng.integers(600, 800))) if index % 2 else (
          int(rng.integers(600, 800)), 512)
      coarse = rng.uniform(0, 255, (height // 32, width // 32, 3)).astype(np.float32)
      image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
      image += rng.normal(0, 8, image.shape)
      regions = rng.integers(0, 151, (height // 64, width // 64), dtype=np.uint8)
      label = cv2.resize(regions, (width, height), interpolation=cv2.INTER_NEAREST)
      stem = f'ADE_{split}_{index:08d}'
      image_path = os.path.join(root, 'images', split, f'{stem}.jpg')
      label_path = os.path.join(root, 'annotations', split, f'{stem}.png')
      cv2.imwrite(image_path, np.clip(image, 0, 255).astype(np.uint8))
      cv2.imwrite(label_path, label)
      if split == 'training':
        pairs.append((image_path, label_path))
  return pairs


def _cpu_seconds() -> float:
  """CPU seconds of this process (all its threads) and of its live children: Grain's workers.

  Children are found by their parent pid in Linux's /proc; elsewhere only this
  process counts.
  """
  total = time.process_time()
  if not os.path.isdir('/proc'):
    return total
  ticks_per_second, parent = os.sysconf('SC_CLK_TCK'), os.getpid()
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/stat') as stat:
        # After the parenthesized command: state, ppid, ..., utime and stime at 11 and 12.
        fields = stat.read().rsplit(')', 1)[1].split()
    except OSError:  # the process ended while we looked
      continue
    if int(fields[1]) == parent:
      total += (int(fields[11]) + int(fields[12])) / ticks_per_second
  return total


def _wall_and_cpu_seconds(next_batch, steps: int) -> tuple[float, float]:
  """Wall time and CPU time (`_cpu_seconds`) for `steps` calls of next_batch().

  Each batch is dropped before the next, as a training loop does: keeping them
  all made every batch land on fresh pages, and the kernel's page zeroing cost
  the loader ~25% of its rate.
  """
  wall, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(steps):
    next_batch()
  return time.perf_counter() - wall, _cpu_seconds() - cpu


def _semseg_way_seconds(config, pairs, batch_size: int, steps: int) -> tuple[float, float]:
  """semseg's SemData + transforms: per sample cv2.imread, BGR->RGB, float32, its whole-image
  augmentation chain, then np.stack per batch, in one Python loop (its DataLoader worker's work)."""
  rng = np.random.default_rng(0)

  def batch(first):
    images, labels = [], []
    for image_path, label_path in (pairs[(first + i) % len(pairs)] for i in range(batch_size)):
      image = cv2.cvtColor(cv2.imread(image_path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
      label = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE)
      image, label = transforms.semseg_chain(image, label, rng, config)
      images.append(image)
      labels.append(label)
    return np.stack(images), np.stack(labels)

  starts = itertools.count(0, batch_size)
  for _ in range(_INPUT_WARMUP_BATCHES):
    batch(next(starts))
  return _wall_and_cpu_seconds(lambda: batch(next(starts)), steps)


def _input(config, batch_size: int, steps: int) -> dict:
  if _SEMSEG_REFERENCE.value and not _FAKE_ADE.value:
    raise app.UsageError('--semseg_reference needs --fake_ade20k (the files to read)')
  if not _FAKE_ADE.value:
    return _measure_input(config, batch_size, steps, fake_pairs=[])
  with tempfile.TemporaryDirectory(prefix='fake_ade20k_') as scratch:
    manual_dir = os.path.join(scratch, 'ADEChallengeData2016')
    fake_pairs = _write_fake_ade20k(manual_dir, _FAKE_ADE.value)
    config.data.name, config.data.num_classes = 'ade20k', ade20k.NUM_CLASSES
    config.data.data_dir = os.path.join(scratch, 'tfds')
    with contextlib.redirect_stdout(sys.stderr):
      ade20k.Ade20kSemseg(data_dir=config.data.data_dir).build(manual_dir)
    return _measure_input(config, batch_size, steps, fake_pairs)


def _measure_input(config, batch_size: int, steps: int, fake_pairs) -> dict:
  configuration.validate(config)
  config.train.batch_size = batch_size
  workers = config.data.worker_count
  # TFDS announces a dataset build on stdout, where the JSON line must stand alone.
  with contextlib.redirect_stdout(sys.stderr):
    iterator = iter(pipeline.train_loader(config))
  # A few batches to start up, plus the data.prefetch batches each worker may
  # have buffered while the first was awaited: those would inflate the rate.
  for _ in range(_INPUT_WARMUP_BATCHES + workers * config.data.prefetch):
    next(iterator)
  seconds, cpu_seconds = _wall_and_cpu_seconds(lambda: next(iterator), steps)
  images = steps * batch_size
  # Per CPU second, not per worker: in this process Grain's reader threads
  # decode beside the main thread, and OpenCV runs threads of its own.
  result = {'what': 'input', 'dataset': config.data.name, 'size': config.data.crop_size,
            'batch_size': batch_size, 'worker_count': workers, 'steps': steps,
            'seconds_per_batch': round(seconds / steps, 4),
            'images_per_s': round(images / seconds, 2),
            'cpu_seconds': round(cpu_seconds, 2),
            'images_per_cpu_second': round(images / cpu_seconds, 2)}
  if _SEMSEG_REFERENCE.value:
    semseg_seconds, semseg_cpu = _semseg_way_seconds(config, fake_pairs, batch_size, steps)
    result.update({'semseg_way_images_per_s': round(images / semseg_seconds, 2),
                   'semseg_way_images_per_cpu_second': round(images / semseg_cpu, 2),
                   'speedup_over_semseg_way_per_cpu_second': round(semseg_cpu / cpu_seconds, 3)})
  return result


_MODES = {'forward': _forward, 'train': _train, 'input': _input}


def main(argv):
  del argv
  config = _CONFIG.value
  if _TORCH.value and _WHAT.value == 'input':
    raise app.UsageError('--torch_reference applies to --what=forward and --what=train')
  batch_size = _BATCH.value
  if batch_size is None:
    batch_size = 1 if _WHAT.value == 'forward' else config.train.batch_size
  # Other work on the machine can stall PyTorch's OpenMP threads (on a loaded
  # 2-core VM its forward ran 30x slower on 2 threads than on 1), so every row
  # says how busy the machine was.
  load = os.getloadavg()[0]
  result = _MODES[_WHAT.value](config, batch_size, _STEPS.value)
  print(json.dumps({**result, 'load_average_before': round(load, 2)}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)

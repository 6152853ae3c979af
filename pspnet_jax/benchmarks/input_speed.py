"""How fast the input pipeline delivers augmented images, beside semseg's way on the same files.

`measure_input`: augmented images per second out of `pipeline.train_batches`
(the config's augmentation, data.batch_dtype and data.worker_count, batches
of `batch_size`) and on the local devices, as training takes them (sent
`train.PREFETCH_TO_DEVICES` ahead by `sharding.prefetch_to_mesh`, each
waited for), over `steps` batches, after a warm-up that drains what the loader
prepared while it started; also per CPU second, counting this process's
threads and its Grain worker processes, the measure of cost per core whatever
the threads and workers. The synthetic dataset is built into data.data_dir on first use,
outside the timing. With `fake_ade20k=N` it measures on N ADE20K-sized pairs
(`fake_ade20k.build`) in a temporary folder instead, and `semseg_reference`
then also times semseg's way on the same files: cv2.imread and the semseg
chain on the whole image (`transforms.semseg_chain`) per sample in a Python
loop.
"""

import contextlib
import itertools
import sys
import tempfile

import cv2
import jax
import numpy as np

from pspnet_jax import configuration, sharding, train
from pspnet_jax.benchmarks.fake_ade20k import build as build_fake_ade20k
from pspnet_jax.benchmarks.timing import wall_and_cpu_seconds
from pspnet_jax.data import pipeline, transforms

# Batches taken before the clock starts (workers add their buffers): the first
# ~10 batches run ~10% slower (reader threads starting, the allocator growing
# to a batch's working set).
_INPUT_WARMUP_BATCHES = 10


def measure_input(config, batch_size: int, steps: int, *, fake_ade20k: int = 0,
                  semseg_reference: bool = False) -> dict:
  """Images per second and per CPU second of the loader (and of the semseg way, on fake ADE20K)."""
  if semseg_reference and not fake_ade20k:
    raise ValueError('semseg_reference needs fake_ade20k (the files to read)')
  if not fake_ade20k:
    return _measure_loader(config, batch_size, steps, semseg_pairs=[])
  with tempfile.TemporaryDirectory(prefix='fake_ade20k_') as scratch:
    pairs = build_fake_ade20k(config, fake_ade20k, scratch)
    return _measure_loader(config, batch_size, steps,
                           semseg_pairs=pairs if semseg_reference else [])


def _measure_loader(config, batch_size: int, steps: int, semseg_pairs) -> dict:
  configuration.validate(config)
  config.train.batch_size = batch_size
  mesh = sharding.make_mesh(jax.local_devices())
  sharding.local_batch_size(batch_size, mesh)
  workers = pipeline.worker_count(config)
  # A few batches to start up, plus the data.prefetch batches each worker may
  # have buffered while the first was awaited: those would inflate the rate.
  warmup = _INPUT_WARMUP_BATCHES + workers * config.data.prefetch
  # TFDS announces a dataset build on stdout, where the JSON line must stand alone.
  with contextlib.redirect_stdout(sys.stderr):
    # Each timed batch sends the one PREFETCH_TO_DEVICES later: those are loaded too.
    iterator = pipeline.train_batches(config, 0, warmup + steps + train.PREFETCH_TO_DEVICES)
  on_devices = sharding.prefetch_to_mesh(iterator, mesh, train.PREFETCH_TO_DEVICES)
  take = lambda: jax.block_until_ready(next(on_devices))
  for _ in range(warmup):
    take()
  seconds, cpu_seconds = wall_and_cpu_seconds(take, steps)
  # Grain's worker processes end here, not while the semseg way is timed: `cpu_seconds`
  # counts live children, and one ending inside a window would take its CPU time out.
  iterator.close()
  images = steps * batch_size
  # Per CPU second, not per worker: in this process Grain's threads prepare
  # batches beside the main thread, and OpenCV runs threads of its own.
  result = {'what': 'input', 'dataset': config.data.name, 'size': config.data.crop_size,
            'batch_size': batch_size, 'batch_dtype': config.data.batch_dtype,
            'worker_count': workers, 'devices': mesh.devices.size, 'steps': steps,
            'seconds_per_batch': round(seconds / steps, 4),
            'images_per_s': round(images / seconds, 2),
            'cpu_seconds': round(cpu_seconds, 2),
            'images_per_cpu_second': round(images / cpu_seconds, 2)}
  if semseg_pairs:
    semseg_seconds, semseg_cpu = semseg_way_seconds(config, semseg_pairs, batch_size, steps)
    result.update({'semseg_way_images_per_s': round(images / semseg_seconds, 2),
                   'semseg_way_images_per_cpu_second': round(images / semseg_cpu, 2),
                   'speedup_over_semseg_way_per_cpu_second': round(semseg_cpu / cpu_seconds, 3)})
  return result


def semseg_way_seconds(config, pairs, batch_size: int, steps: int) -> tuple[float, float]:
  """Wall and CPU seconds of `steps` batches the semseg way (after a warm-up).

  semseg's SemData + transforms: per sample cv2.imread, BGR->RGB, float32, its
  whole-image augmentation chain, then np.stack per batch, in one Python loop
  (its DataLoader worker's work).
  """
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
  return wall_and_cpu_seconds(lambda: batch(next(starts)), steps)

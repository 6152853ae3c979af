"""Host batches from TFDS ArrayRecord splits: Grain for training, a plain iterator for evaluation.

Training (`train_batches`): global batch k is a pure function of (config.seed,
k). Each epoch visits the split in a permutation drawn from the seed and the
epoch; each row is decoded, checked and augmented with a generator seeded from
(seed, k, row). Each process computes its own rows of the global batch by
index, in Grain threads or worker processes that return batches in order.
So the data position of a run is its step: a run resumes on another number
of processes, devices or Grain workers with exactly the batches an
uninterrupted run would have seen, and checkpoints hold no data state.

Evaluation (`eval_batches`): every example exactly once over all processes,
each process a contiguous slice, padded with ignored examples (`valid`
False) so that every process yields the same number of equally shaped
batches and the evaluation step compiles once. `eval_examples` gives the
same slices at the original size, for the official protocol (`evaluation`).

Examples are dicts {'image': HxWx3 uint8 RGB, 'label': HxWx1 uint8,
'file_name': text}, the layout all our segmentation builders write. The mask
datasets of CascadePSP's refinement (config.task='refinement', `masks`) have
{'image', 'mask': HxWx1 uint8 ground truth 0..255, 'input_mask': HxWx1 uint8
coarse mask, 'file_name'}; their training rows are {'image', 'mask' (the input
mask the official boundary perturbation makes afresh from the ground truth for
every row), 'gt'} and their evaluation examples {'image', 'gt', 'input_mask',
'file_name'}.
"""

import os

from absl import flags
import grain
import jax
import numpy as np

from pspnet_jax.data import labels, masks, registry, transforms
from pspnet_jax.errors import MissingFile, UserError

# Batches prepared ahead of the step, each by its own thread (Grain's default of
# hundreds of elements in flight would be gigabytes of decoded images).
_READ_AHEAD_BATCHES = 2


# data.worker_count = -1 below this many cores: threads in the training process (measured on
# 2 cores, worker processes delivered fewer images per CPU second than threads, BENCHMARKS.md).
_MIN_CORES_FOR_WORKERS = 8
# and at most this many worker processes (each holds data.prefetch batches).
_MAX_AUTO_WORKERS = 32


def worker_count(config) -> int:
  """data.worker_count, with -1 resolved by the cores this process may run on.

  -1 gives half of them as Grain worker processes (the other half for the
  training process: its dispatch, transfers and OpenCV's own threads), up to
  _MAX_AUTO_WORKERS, and none below _MIN_CORES_FOR_WORKERS cores. The cores
  are the process's affinity (a SLURM task's --cpus-per-task), not the host's.
  `python -m pspnet_jax.benchmark --what=input` measures a host's rate for
  each count.
  """
  if config.data.worker_count >= 0:
    return config.data.worker_count
  cores = len(os.sched_getaffinity(0))
  return 0 if cores < _MIN_CORES_FOR_WORKERS else min(cores // 2, _MAX_AUTO_WORKERS)


def train_batch_dtypes(config) -> dict:
  """The numpy dtypes of a training batch's arrays as they leave the host (`train_batches`)."""
  if config.task == 'refinement':
    return {'image': np.dtype(config.data.batch_dtype), 'mask': np.dtype(np.uint8),
            'gt': np.dtype(np.uint8)}
  return {'image': np.dtype(config.data.batch_dtype), 'label': np.dtype(np.uint8)}


# An evaluation batch (`eval_batches`): normalized images, labels the eval step compares as is.
EVAL_BATCH_DTYPES = {'image': np.dtype(np.float32), 'label': np.dtype(np.int32)}


def load_split(config, split: str):
  """The random-access source of `split` of config.data.name (the synthetic one built if needed)."""
  dataset = registry.get(config.data.name)
  builder = registry.builder(config)
  if dataset.generated:
    # A no-op when this exact configuration is already on disk.
    builder.download_and_prepare(file_format='array_record')
  elif not builder.is_prepared():
    # tfds.data_source(download=False) on an unbuilt dataset fails with a
    # misleading "TFRECORD is not supported" error; ask the builder first.
    data_dir = config.data.data_dir
    data_dir_flag = f' --data_dir={data_dir}' if data_dir else ''
    # A folder dataset is named after its folder; the official ones after their release.
    source = config.data.folder_dir if dataset.per_folder else 'SOURCE_FOLDER'
    raise MissingFile(
        f'dataset {dataset.name!r} (TFDS name {dataset.tfds_name!r}) is not built in data dir '
        f'{data_dir or "the TFDS default (~/tensorflow_datasets)"}; set config.data.data_dir '
        f'to the folder that holds it, or build it with: python -m pspnet_jax.data.prepare '
        f'--dataset={dataset.name} --manual_dir={source}{data_dir_flag}')
  return builder.as_data_source(split=split)


def num_examples(config, split: str) -> int:
  """Number of examples in `split` of config.data.name."""
  return len(load_split(config, split))


class DecodeAndCheck(grain.transforms.Map):
  """A TFDS example -> {'image' uint8 HxWx3, 'label' uint8 HxW, 'file_name' str}, checked.

  An out-of-range label would not fail anywhere later: cross-entropy turns it
  into NaN. The builders of real datasets checked their labels when writing,
  but against the dataset's class count, not this config's data.num_classes,
  and the synthetic dataset has no such check: `labels.check` every record.
  """

  def __init__(self, num_classes: int, ignore_label: int):
    self.num_classes = num_classes
    self.ignore_label = ignore_label

  def map(self, example):
    file_name = example['file_name']
    if isinstance(file_name, bytes):
      file_name = file_name.decode()
    image, label = np.asarray(example['image']), np.asarray(example['label'])
    if label.ndim == 3 and label.shape[-1] == 1:
      label = label[..., 0]
    if image.ndim != 3 or image.shape[-1] != 3 or label.ndim != 2:
      raise ValueError(f'{file_name}: image shape {image.shape} / label shape {label.shape}, '
                       f'expected HxWx3 and HxW')
    labels.check(file_name, image.shape, label, self.num_classes, self.ignore_label)
    return {'image': image, 'label': label.astype(np.uint8), 'file_name': file_name}


class DecodeMasks(grain.transforms.Map):
  """A mask dataset's example -> {'image' uint8 HxWx3, 'gt' uint8 HxW, 'input_mask' uint8 HxW,
  'file_name' str}, the three of one size (the builders checked that; a dataset written by
  another version or by hand is checked again here)."""

  def map(self, example):
    file_name = example['file_name']
    if isinstance(file_name, bytes):
      file_name = file_name.decode()
    image = np.asarray(example['image'])
    gt, given = (np.asarray(example[key]).reshape(np.shape(example[key])[:2])
                 for key in ('mask', 'input_mask'))
    if image.ndim != 3 or image.shape[-1] != 3 or gt.shape != image.shape[:2] or (
        given.shape != gt.shape):
      raise UserError(f'{file_name}: image {image.shape}, mask {gt.shape} and input mask '
                      f'{given.shape} do not fit together (HxWx3, HxW, HxW)')
    return {'image': image, 'gt': gt, 'input_mask': given, 'file_name': file_name}


def decoder(config):
  """The check-and-decode map of config.task's examples."""
  if config.task == 'refinement':
    return DecodeMasks()
  return DecodeAndCheck(config.data.num_classes, config.data.ignore_label)


def _processes(process_index, process_count):
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count})')
  return process_index, process_count


def _per_process_batch(batch_size: int, process_count: int, key: str) -> int:
  if batch_size < process_count or batch_size % process_count:
    raise UserError(f'config.{key}={batch_size} must be a positive multiple of the number of '
                    f'processes ({process_count}): each process loads an equal share')
  return batch_size // process_count


class GlobalOrder:
  """Which example fills each row of each global batch: a pure function of (seed, step, row).

  Epoch e covers steps [e*S, (e+1)*S), S = N // B (the last N mod B examples
  of its permutation left out, as semseg's drop_last), and visits the N
  examples in a permutation drawn from (seed, e): global batch k holds
  positions [(k mod S)*B, (k mod S + 1)*B) of its epoch's permutation.
  """

  def __init__(self, num_examples: int, global_batch: int, seed: int):
    if num_examples < global_batch:
      raise UserError(f'config.train.batch_size={global_batch} is larger than the '
                      f'{num_examples} training examples')
    self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
    self.steps_per_epoch = num_examples // global_batch
    self._epoch, self._permutation = None, None   # the last epoch's, reused by its S batches

  def records(self, step: int, rows: range) -> np.ndarray:
    """The record indices of `rows` of global batch `step`."""
    epoch, batch_in_epoch = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, _ORDER_STREAM, epoch])
      self._epoch, self._permutation = epoch, rng.permutation(self.num_examples)
    first = batch_in_epoch * self.global_batch
    return self._permutation[first + rows.start:first + rows.stop]


# Separate seed streams for the example order and the augmentation, so that no
# (seed, epoch) of one coincides with a (seed, step, row) of the other.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


class ProcessRows:
  """Global batch number -> this process's rows of it, decoded, checked and augmented.

  Row r of global batch k is augmented with a generator seeded from
  (seed, k, r), so it is the same whichever process computes it.
  """

  def __init__(self, config, source, order: GlobalOrder, rows: range):
    self.config, self.source, self.order, self.rows = config, source, order, rows
    self.check = decoder(config)

  def _row(self, example: dict, rng: np.random.Generator) -> dict:
    if self.config.task == 'refinement':
      image, given, gt = masks.refinement_augment(example['image'], example['gt'], rng,
                                                  self.config.data.augment,
                                                  self.config.data.crop_size)
      data = self.config.data
      # The crop's padding is black RGB (torchvision's RandomCrop fill 0), normalized like the
      # rest of the image.
      if data.batch_dtype != 'uint8':
        image = transforms.normalize(image.astype(np.float32), data.mean, data.std)
      return {'image': image, 'mask': given, 'gt': gt}
    image, label = transforms.train_augment(example['image'], example['label'], rng,
                                            self.config)
    return {'image': image, 'label': label}

  def __call__(self, step: int) -> dict:
    rows = []
    for row, record in zip(self.rows, self.order.records(step, self.rows)):
      example = self.check.map(self.source[int(record)])
      rng = np.random.default_rng([self.config.seed, _AUGMENT_STREAM, step, row])
      rows.append(self._row(example, rng))
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def train_batches(config, first_step: int, num_steps: int, *, process_index: int | None = None,
                  process_count: int | None = None):
  """This process's rows of the global training batches first_step, ..., num_steps - 1.

  Each item: {'image': (b, crop, crop, 3) normalized float32 or uint8 RGB
  (data.batch_dtype, `transforms.place_in_crop`), 'label': uint8 (b, crop,
  crop)}, rows [p*b, (p+1)*b) of the global batch of
  train.batch_size, b = train.batch_size / process_count. Global batch k is a
  function of (config.seed, k) alone (`GlobalOrder`, `ProcessRows`): a run
  resumes at its step on any number of processes, devices or Grain workers
  with the same batches, and nothing about the data goes into a checkpoint.
  """
  process_index, process_count = _processes(process_index, process_count)
  rows_per_process = _per_process_batch(config.train.batch_size, process_count,
                                        'train.batch_size')
  workers = worker_count(config)
  if workers > 0 and not flags.FLAGS.is_parsed():
    # Grain's worker processes read absl flags: outside an absl app (pytest, a
    # notebook) they would fail with UnparsedFlagAccessError; take the defaults.
    flags.FLAGS.mark_as_parsed()
  source = load_split(config, config.data.train_split)
  order = GlobalOrder(len(source), config.train.batch_size, config.seed)
  rows = range(process_index * rows_per_process, (process_index + 1) * rows_per_process)
  batches = grain.MapDataset.range(first_step, num_steps).map(
      ProcessRows(config, source, order, rows))
  # Threads prepare the next batches while the step runs; Grain's worker
  # processes, when configured, each take every W-th batch and hand them back
  # in order, so the sequence is the same for any worker count.
  batches = batches.to_iter_dataset(grain.ReadOptions(
      num_threads=_READ_AHEAD_BATCHES, prefetch_buffer_size=_READ_AHEAD_BATCHES))
  if workers > 0:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=config.data.prefetch))
  return iter(batches)


def eval_examples(config, split: str, *, process_index: int | None = None,
                  process_count: int | None = None):
  """(this process's (index, decoded example) iterator, its count, the split's count).

  Process p of P takes the contiguous examples [p*n, (p+1)*n), n = ceil(N/P),
  at their original size (checked by `DecodeAndCheck`), read one at a time.
  """
  process_index, process_count = _processes(process_index, process_count)
  source = load_split(config, split)
  per_process = -(-len(source) // process_count)
  start = min(len(source), process_index * per_process)
  stop = min(len(source), start + per_process)
  check = decoder(config)
  examples = ((index, check.map(source[index])) for index in range(start, stop))
  return examples, stop - start, len(source)


def eval_batches(config, split: str | None = None, *, process_index: int | None = None,
                 process_count: int | None = None):
  """This process's evaluation batches of `split` (default data.eval_split), each example once.

  Process p of P takes examples [p*n, (p+1)*n), n = ceil(N/P), in batches of
  b = eval.batch_size / P, resized to fit the training crop and padded to it
  (`transforms.eval_resize`). All processes yield
  ceil(n/b) batches {'image': float32 (b, crop, crop, 3), 'label': int32
  (b, crop, crop), 'valid': bool (b,)}; padding examples are the mean image
  (0 after normalization) with an all-ignore label and valid False.
  """
  process_index, process_count = _processes(process_index, process_count)
  batch_size = _per_process_batch(config.eval.batch_size, process_count, 'eval.batch_size')
  split = split or config.data.eval_split
  source = load_split(config, split)
  data = config.data
  per_process = -(-len(source) // process_count)
  start = process_index * per_process
  stop = min(len(source), start + per_process)
  num_batches = -(-per_process // batch_size)
  check = DecodeAndCheck(data.num_classes, data.ignore_label)
  crop = transforms.crop_shape(data)

  def example(index):
    if index >= stop:
      return (np.zeros((*crop, 3), np.float32), np.full(crop, data.ignore_label, np.int32),
              False)
    decoded = check.map(source[index])
    image, label = transforms.eval_resize(decoded['image'].astype(np.float32), decoded['label'],
                                          crop, data.mean, data.ignore_label)
    return transforms.normalize(image, data.mean, data.std), label.astype(np.int32), True

  def batches():
    for first in range(start, start + num_batches * batch_size, batch_size):
      images, labels, valid = zip(*(example(i) for i in range(first, first + batch_size)))
      yield {'image': np.stack(images), 'label': np.stack(labels), 'valid': np.array(valid)}

  return batches()

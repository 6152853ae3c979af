"""Host batches from TFDS ArrayRecord splits: Grain for training, a plain iterator for evaluation.

Training (`train_loader`): a Grain `DataLoader` over the random-access TFDS
source. Each process reads its own 1/P of the split (drop_remainder, so all
processes take the same number of steps), reshuffled every epoch, repeated
forever; each record is decoded, checked, augmented with a generator seeded
from (config.seed, the record's global position), so every augmented
example is a function of the seed alone, whatever data.worker_count is. Which
examples share a batch does depend on the worker count (Grain deals records to
workers round-robin and each worker batches its own), and so does the
iterator's state (a few bytes of JSON, saved in the checkpoint): a run resumes
its exact batches with the same worker count and number of processes, and
Grain refuses a state saved with another worker count.

Evaluation (`eval_batches`): every example exactly once over all processes,
each process a contiguous slice, padded with ignored examples (`valid`
False) so that every process yields the same number of equally shaped
batches and the evaluation step compiles once. `eval_examples` gives the
same slices at the original size, for the official protocol (`evaluation`).

Examples are dicts {'image': HxWx3 uint8 RGB, 'label': HxWx1 uint8,
'file_name': text}, the layout all our builders write.
"""

from absl import flags
import grain
import jax
import numpy as np

from pspnet_jax.data import labels, registry, transforms

# Grain reads (and TFDS decodes) records in threads ahead of the transforms; its
# default of 500 records in flight is gigabytes of decoded Cityscapes images per
# worker, a few batches are enough to hide the decode.
_READ_THREADS = 4
_READ_AHEAD_BATCHES = 2


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
    source = config.data.folder_dir if dataset.name == 'folder' else 'SOURCE_FOLDER'
    raise FileNotFoundError(
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


class TrainAugment(grain.transforms.RandomMap):
  """The configured training augmentation with the record's generator -> normalized crop, int32
  label."""

  def __init__(self, config):
    self.config = config

  def random_map(self, example, rng: np.random.Generator):
    image, label = transforms.train_augment(example['image'], example['label'], rng, self.config)
    return {'image': image, 'label': label.astype(np.int32)}


def _processes(process_index, process_count):
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count})')
  return process_index, process_count


def _per_process_batch(batch_size: int, process_count: int, key: str) -> int:
  if batch_size < process_count or batch_size % process_count:
    raise ValueError(f'config.{key}={batch_size} must be a positive multiple of the number of '
                     f'processes ({process_count}): each process loads an equal share')
  return batch_size // process_count


def train_loader(config, *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.DataLoader:
  """Endless shuffled, augmented batches of this process's shard of data.train_split.

  Each batch: {'image': float32 (b, crop, crop, 3) normalized, 'label': int32
  (b, crop, crop)}, b = train.batch_size / process_count. `iter()` of the
  loader gives an iterator with get_state() / set_state().
  """
  process_index, process_count = _processes(process_index, process_count)
  batch_size = _per_process_batch(config.train.batch_size, process_count, 'train.batch_size')
  if config.data.worker_count > 0 and not flags.FLAGS.is_parsed():
    # Grain's worker processes read absl flags: outside an absl app (pytest, a
    # notebook) they would fail with UnparsedFlagAccessError; take the defaults.
    flags.FLAGS.mark_as_parsed()
  source = load_split(config, config.data.train_split)
  if len(source) < process_count:
    raise ValueError(f'{config.data.train_split} of {config.data.name!r} has {len(source)} '
                     f'examples, fewer than the {process_count} processes')
  # The same options go to the sampler (which shard's records, shuffled per
  # epoch) and to the loader (which of the sampler's positions this process reads).
  shard_options = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(len(source), shard_options=shard_options, shuffle=True,
                                        num_epochs=None, seed=config.seed)
  operations = [DecodeAndCheck(config.data.num_classes, config.data.ignore_label),
                TrainAugment(config),
                grain.transforms.Batch(batch_size, drop_remainder=True)]
  return grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations,
      worker_count=config.data.worker_count, worker_buffer_size=config.data.prefetch,
      shard_options=shard_options,
      read_options=grain.ReadOptions(num_threads=_READ_THREADS,
                                     prefetch_buffer_size=_READ_AHEAD_BATCHES * batch_size))


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
  check = DecodeAndCheck(config.data.num_classes, config.data.ignore_label)
  examples = ((index, check.map(source[index])) for index in range(start, stop))
  return examples, stop - start, len(source)


def eval_batches(config, split: str | None = None, *, process_index: int | None = None,
                 process_count: int | None = None):
  """This process's evaluation batches of `split` (default data.eval_split), each example once.

  Process p of P takes examples [p*n, (p+1)*n), n = ceil(N/P), in batches of
  b = eval.batch_size / P, resized so the long side is data.crop_size and
  padded to the crop (`transforms.eval_resize`). All processes yield
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
  crop = data.crop_size

  def example(index):
    if index >= stop:
      return (np.zeros((crop, crop, 3), np.float32),
              np.full((crop, crop), data.ignore_label, np.int32), False)
    decoded = check.map(source[index])
    image, label = transforms.eval_resize(decoded['image'].astype(np.float32), decoded['label'],
                                          crop, data.mean, data.ignore_label)
    return transforms.normalize(image, data.mean, data.std), label.astype(np.int32), True

  def batches():
    for first in range(start, start + num_batches * batch_size, batch_size):
      images, labels, valid = zip(*(example(i) for i in range(first, first + batch_size)))
      yield {'image': np.stack(images), 'label': np.stack(labels), 'valid': np.array(valid)}

  return batches()

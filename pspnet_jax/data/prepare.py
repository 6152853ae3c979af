"""Builds a real dataset into TFDS ArrayRecord files, validating every example.

  python -m pspnet_jax.data.prepare --dataset=ade20k --manual_dir=.../ADEChallengeData2016 \\
      [--data_dir=TFDS_DIR] [--strict]
  python -m pspnet_jax.data.prepare --dataset=cityscapes --manual_dir=.../cityscapes
  python -m pspnet_jax.data.prepare --dataset=voc2012 --manual_dir=VOC_ROOT   # train_aug + val
      (--dataset=voc_aug, the set's usual name, is the same)
  python -m pspnet_jax.data.prepare --dataset=folder --manual_dir=MY_FOLDER [--data_dir=...]
  python -m pspnet_jax.data.prepare --dataset=cascadepsp_mix --manual_dir=CascadePSP/data
  python -m pspnet_jax.data.prepare --dataset=mask_folder --manual_dir=MY_MASKS  # e.g. BIG

Prints where the dataset went, the build report (also saved as
build_report.json next to it) and the config flags that train on it (for a
train split of fewer than 16 images, with batch sizes that fit it on this
machine's devices). Bad examples (unreadable files, folders named like
images, two images with one stem, ...) are skipped and listed; --strict stops
at the first one instead.

Run again on an unchanged source, it reuses the build and prints its report.
When the source changed since (files added, removed or rewritten, other class
names), it refuses with one line and exits 2 instead of passing the stale
build off as current; --overwrite rebuilds, keeping the old build until the new
one is complete.
"""

import os

from absl import flags
import ml_collections

from pspnet_jax import cli, paths
from pspnet_jax.data import registry
from pspnet_jax.errors import MissingFile

# Every dataset that is built from files (all but the generated synthetic one), by
# config.data.name or another name users know it by.
_FROM_FILES = [name for name, dataset in registry.DATASETS.items() if not dataset.generated]
_DATASET = flags.DEFINE_enum(
    'dataset', None,
    _FROM_FILES + [alias for alias, name in registry.ALIASES.items() if name in _FROM_FILES],
    'Dataset to build.')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'ade20k: the unpacked ADEChallengeData2016 folder; cityscapes: the '
    'folder holding leftImg8bit/ and gtFine/; voc2012: the folder holding VOCdevkit/ (and '
    'benchmark_RELEASE/ unless VOCdevkit/VOC2012/SegmentationClassAug/ is used); folder: your '
    'folder (classes.txt, images/, labels/); cascadepsp_mix: the folder of DUTS-TR/, DUTS-TE/, '
    'ecssd/, MSRA_10K/, DUT-OMRON/, fss/ (CascadePSP\'s data/); mask_folder: your folder of '
    'train/, validation/, test/ with <stem>_im.jpg, <stem>_gt.png, optional <stem>_seg.png.')
_DATA_DIR = flags.DEFINE_string('data_dir', None,
                                'TFDS data dir to build into (default: ~/tensorflow_datasets).')
_STRICT = flags.DEFINE_bool('strict', False, 'Fail at the first bad example instead of skipping.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Rebuild even when a build is there (needed when the source changed).')
# How many skipped files (and classes without pixels) the summary lists; all are in
# build_report.json.
_LISTED_SKIPS = 20


def main(argv):
  del argv
  dataset = registry.get(_DATASET.value)
  # Absolute, so that the printed flags find the same folder slot from any
  # working directory.
  manual_dir = paths.absolute(_MANUAL_DIR.value)
  if not paths.is_remote(manual_dir) and not (os.path.isdir(manual_dir)
                                              and os.listdir(manual_dir)):
    # (TFDS would stop with an AssertionError, after making folders in the data dir.)
    where = f' ({manual_dir})' if manual_dir != _MANUAL_DIR.value else ''
    problem = 'is empty' if os.path.isdir(manual_dir) else 'no such folder'
    raise MissingFile(f'--manual_dir={_MANUAL_DIR.value}{where}: {problem}; it holds the '
                      f'unpacked dataset (--helpshort says what for each --dataset)')
  # The keys training will read; the folder builder's slot is keyed on
  # folder_dir, the official ones ignore it.
  config = ml_collections.ConfigDict({'data': {
      'name': dataset.name, 'data_dir': _DATA_DIR.value, 'folder_dir': manual_dir}})
  builder = registry.builder(config, strict=_STRICT.value)
  reused = builder.is_prepared() and not _OVERWRITE.value
  # A builders.BuildError (a UserError) names the file, the rule or the flag: cli.run prints
  # it as one line and exits 2.
  report = builder.build(manual_dir, overwrite=_OVERWRITE.value)
  verb = 'reused (source unchanged)' if reused else 'built'
  print(f'{verb} {builder.info.full_name} in {builder.data_dir} '
        f'({report["num_classes"]} classes)')
  for split, numbers in report['splits'].items():
    official = f', official {numbers["official"]}' if numbers['official'] else ''
    print(f'  {split}: {numbers["found"]} found{official}, {numbers["written"]} written, '
          f'{numbers["skipped"]} skipped, ignore ratio {numbers["ignore_ratio"]:.3f}')
    for skipped in numbers['skipped_files'][:_LISTED_SKIPS]:
      print(f'    skipped {skipped["file"]}: {skipped["reason"]}')
    absent = [name for name, pixels in numbers['class_pixels'].items() if pixels == 0]
    if absent:
      listed = ', '.join(absent[:_LISTED_SKIPS]) + (', ...' if len(absent) > _LISTED_SKIPS else '')
      print(f'    {len(absent)} classes have no pixels: {listed}')
  print(f'report: {builder.report_path}')
  num_train = report['splits'].get('train', {}).get('written')
  # Small sets need smaller batches, which depend on the devices: counted only then (JAX
  # starts its backends for it).
  devices = (_device_count() if num_train is not None and
             num_train < registry.RECIPE_BATCH_SIZE else 1)
  print('train on it with: python -m pspnet_jax.main '
        + registry.training_flags(config, report['num_classes'], num_train=num_train,
                                  num_devices=devices) + ' --workdir=WORKDIR')
  if num_train is not None and num_train < registry.RECIPE_BATCH_SIZE:
    sizes = registry.small_set_batch_sizes(num_train, devices)
    if 'train.batch_size' in sizes:
      print(f'  (train.batch_size={sizes["train.batch_size"]}: {num_train} training images, '
            f'a multiple of the {devices} device(s) here; the recipe takes '
            f'{registry.RECIPE_BATCH_SIZE})')
    else:
      print(f'  note: {num_train} training images cannot fill one batch over the {devices} '
            f'devices here (at least one image per device): add images, or train on fewer '
            f'devices')


def _device_count() -> int:
  """The devices a training run on this machine would use (without reserving GPU memory)."""
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  import jax  # pylint: disable=import-outside-toplevel  (only for small sets)
  return jax.device_count()


if __name__ == '__main__':
  flags.mark_flags_as_required(['dataset', 'manual_dir'])
  cli.run(main)

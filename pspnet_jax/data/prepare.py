"""Builds a real dataset into TFDS ArrayRecord files, validating every example.

  python -m pspnet_jax.data.prepare --dataset=ade20k --manual_dir=.../ADEChallengeData2016 \\
      [--data_dir=TFDS_DIR] [--strict]
  python -m pspnet_jax.data.prepare --dataset=cityscapes --manual_dir=.../cityscapes
  python -m pspnet_jax.data.prepare --dataset=voc2012 --manual_dir=VOC_ROOT   # train_aug + val
      (--dataset=voc_aug, the set's usual name, is the same)
  python -m pspnet_jax.data.prepare --dataset=folder --manual_dir=MY_FOLDER [--data_dir=...]

Prints where the dataset went, the build report (also saved as
build_report.json next to it) and the config flags that train on it. Bad
examples (unreadable files, folders named like images, two images with one
stem, ...) are skipped and listed; --strict stops at the first one instead.

Run again on an unchanged source, it reuses the build and prints its report.
When the source changed since (files added, removed or rewritten, other class
names), it refuses with one line and exits 1 instead of passing the stale
build off as current; --overwrite rebuilds, keeping the old build until the new
one is complete.
"""

import sys

from absl import app
from absl import flags
import ml_collections

from pspnet_jax import paths
from pspnet_jax.data import builders, registry

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
    'folder (classes.txt, images/, labels/).')
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
  # The keys training will read; the folder builder's slot is keyed on
  # folder_dir, the official ones ignore it.
  config = ml_collections.ConfigDict({'data': {
      'name': dataset.name, 'data_dir': _DATA_DIR.value, 'folder_dir': manual_dir}})
  builder = registry.builder(config, strict=_STRICT.value)
  reused = builder.is_prepared() and not _OVERWRITE.value
  try:
    report = builder.build(manual_dir, overwrite=_OVERWRITE.value)
  except builders.BuildError as error:
    # The message names the file, the rule or the flag; a traceback would bury it.
    sys.exit(f'prepare: {error}')
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
  print('train on it with: python -m pspnet_jax.main '
        + registry.training_flags(config, report['num_classes']) + ' --workdir=WORKDIR')


if __name__ == '__main__':
  flags.mark_flags_as_required(['dataset', 'manual_dir'])
  app.run(main)

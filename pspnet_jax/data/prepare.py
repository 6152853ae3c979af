"""Builds a real dataset into TFDS ArrayRecord files, validating every example.

  python -m pspnet_jax.data.prepare --dataset=ade20k --manual_dir=.../ADEChallengeData2016 \\
      [--data_dir=TFDS_DIR] [--strict]
  python -m pspnet_jax.data.prepare --dataset=cityscapes --manual_dir=.../cityscapes
  python -m pspnet_jax.data.prepare --dataset=voc2012 --manual_dir=VOC_ROOT   # train_aug + val
      (--dataset=voc_aug, the set's usual name, is the same)
  python -m pspnet_jax.data.prepare --dataset=folder --manual_dir=MY_FOLDER [--data_dir=...]

Prints where the dataset went, the build report (also saved as
build_report.json next to it) and the config flags that train on it. Bad
examples are skipped and listed; --strict stops at the first one instead.
"""

from absl import app
from absl import flags

from pspnet_jax.data import ade20k, cityscapes, folder, voc_aug

# --dataset (= config.data.name) -> the builder class of an official dataset.
OFFICIAL_BUILDERS = {
    'ade20k': ade20k.Ade20kSemseg,
    'cityscapes': cityscapes.CityscapesSemseg,
    'voc2012': voc_aug.Voc2012Semseg,
}
# Other names users know a dataset by -> config.data.name.
ALIASES = {'voc_aug': 'voc2012'}

_DATASET = flags.DEFINE_enum('dataset', None, [*OFFICIAL_BUILDERS, *ALIASES, 'folder'],
                             'Dataset to build.')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'ade20k: the unpacked ADEChallengeData2016 folder; cityscapes: the '
    'folder holding leftImg8bit/ and gtFine/; voc2012: the folder holding VOCdevkit/ (and '
    'benchmark_RELEASE/ unless VOCdevkit/VOC2012/SegmentationClassAug/ is used); folder: your '
    'folder (classes.txt, images/, labels/).')
_DATA_DIR = flags.DEFINE_string('data_dir', None,
                                'TFDS data dir to build into (default: ~/tensorflow_datasets).')
_STRICT = flags.DEFINE_bool('strict', False, 'Fail at the first bad example instead of skipping.')
# How many skipped files (and classes without pixels) the summary lists; all are in
# build_report.json.
_LISTED_SKIPS = 20


def config_flags(dataset: str, manual_dir: str, data_dir: str | None, num_classes: int) -> str:
  """The pspnet_jax.main flags that train on the built dataset."""
  if dataset in OFFICIAL_BUILDERS:
    flags_ = [f'--config=configs/{dataset}.py']
  else:
    # The schema's defaults (semseg's recipe, crop 473) with the folder as the dataset.
    flags_ = ['--config=configs/default.py', '--config.data.name=folder',
              f'--config.data.folder_dir={manual_dir}',
              f'--config.data.num_classes={num_classes}']
  if data_dir:
    flags_.append(f'--config.data.data_dir={data_dir}')
  return ' '.join(flags_)


def main(argv):
  del argv
  dataset = ALIASES.get(_DATASET.value, _DATASET.value)
  if dataset in OFFICIAL_BUILDERS:
    builder = OFFICIAL_BUILDERS[dataset](data_dir=_DATA_DIR.value, strict=_STRICT.value)
  else:
    builder = folder.builder(_MANUAL_DIR.value, _DATA_DIR.value, strict=_STRICT.value)
  report = builder.build(_MANUAL_DIR.value)
  print(f'built {builder.info.full_name} into {builder.data_dir} '
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
        + config_flags(dataset, _MANUAL_DIR.value, _DATA_DIR.value, report['num_classes'])
        + ' --workdir=WORKDIR')


if __name__ == '__main__':
  flags.mark_flags_as_required(['dataset', 'manual_dir'])
  app.run(main)

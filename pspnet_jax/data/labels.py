"""The ignore label and the one label check the builders and the loader share.

Dependency-free (numpy only) so that `configs/default.py` can take its
`data.ignore_label` default from here without importing TFDS.

Every supported dataset marks pixels that train nothing (ADE20K's "other",
VOC's object boundaries, Cityscapes' unevaluated labelIds) with 255, the
official code's ignore index.
"""

import numpy as np

IGNORE_LABEL = 255


class LabelError(ValueError):
  """A label cannot be trained on; the message names the file and what is wrong."""


def check(file_name: str, image_shape: tuple[int, ...], label: np.ndarray, num_classes: int,
          ignore_label: int = IGNORE_LABEL, *, before_remap: np.ndarray | None = None) -> None:
  """Raises LabelError unless `label` is image-sized and every value is < num_classes or ignored.

  An out-of-range value would not fail anywhere later: cross-entropy turns it
  into NaN. `before_remap`, the label file's own values when a builder remapped
  them (ADE20K shifts by one), is quoted too: those are the values the user can
  find in the file.
  """
  if tuple(image_shape[:2]) != label.shape:
    raise LabelError(f'{file_name}: image is {image_shape[0]}x{image_shape[1]} but label is '
                     f'{label.shape[0]}x{label.shape[1]}')
  bad = (label >= num_classes) & (label != ignore_label)
  if bad.any():
    values = np.unique(label[bad]).tolist()
    if before_remap is not None:
      values = f'{np.unique(before_remap[bad]).tolist()} (after the remap {values})'
    raise LabelError(f'{file_name}: label values {values} are neither < num_classes '
                     f'({num_classes}) nor the ignore label ({ignore_label})')

"""Predictions on image files: find the inputs, read them, write class maps, colours and a legend.

The flag-free library behind `python -m pspnet_jax.predict` (and the evaluate
command's `--save_predictions`). An output folder OUT holds

  gray/<name>.png      the class index per pixel (uint8 PNG; 16-bit with more than 256 classes)
  color/<name>.png     the dataset palette's colour per pixel
  overlay/<name>.jpg   the image blended 50/50 with the colours
  legend.json          the classes present (index, name, RGB colour) and each image's classes
  legend.png           a swatch and the name of each class present
  prediction.json      which model and protocol wrote the folder, what was done and skipped

`<name>` is the input's path relative to the folder (or the fixed part of the
glob) it was found under, without its extension, so a folder's subfolders are
kept and a flat folder gives `<stem>`; two files that differ only in their
extension keep it (`a.jpg` and `a.png` become `a.jpg` and `a.png`).

An output folder belongs to one model and protocol (`OWNER_KEYS` of
prediction.json): another one is refused unless `overwrite`, which clears the
outputs first; the same one reuses the folder, and the legend then covers the
images of every run.

Images are read one at a time as the predictor asks for them, so a folder of
any size needs the memory of the images in flight only. Any readable image
becomes RGB uint8: grayscale and palette images are expanded, an alpha channel
is dropped (as cv2.imread and the training data do), 16-bit samples keep
their high byte, and the EXIF orientation is applied (as image viewers and
cv2.imread do). A file that cannot be read is skipped, logged and listed with
its reason in prediction.json.

With several processes, process i predicts inputs i, i + P, ... (every
process steps the predictor), and process 0 writes the legend and
prediction.json for all of them; the output folder must be one that every
process sees, as the workdir is. It may be a `gs://` URI (written through
etils.epath); the inputs are local files.
"""

import collections
import glob
import json
import os
from typing import Iterable, NamedTuple

import cv2
import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image, ImageOps

from pspnet_jax import inference, paths

IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.ppm', '.pgm', '.tif', '.tiff',
                    '.webp')
OUTPUT_FOLDERS = ('gray', 'color', 'overlay')
RUN_FILE = 'prediction.json'
LEGEND_FILE = 'legend.json'
LEGEND_IMAGE = 'legend.png'
# What makes two runs' outputs interchangeable: the same weights and the same protocol.
OWNER_KEYS = ('workdir', 'step', 'protocol')


class ImageFile(NamedTuple):
  path: str   # as found
  name: str   # the output name: relative path without extension, '/'-separated


class UnreadableImage(ValueError):
  """A file that is no image we can read; the message names it and says why."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path, self.reason = path, reason


class OutputInUse(FileExistsError):
  """The output folder holds predictions of another model or protocol."""


def _is_image_name(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return os.path.commonpath([path, folder]) == folder


def _glob_root(pattern: str) -> str:
  """The folder part of a glob before its first wildcard."""
  root = os.path.dirname(pattern)
  while glob.has_magic(root):
    root = os.path.dirname(root)
  return root or os.curdir


def _named(files: list[str], root: str) -> list[ImageFile]:
  """Output names: the path relative to `root` without extension, with it where two collide."""
  relative = [os.path.relpath(path, root).replace(os.sep, '/') for path in files]
  stems = [os.path.splitext(name)[0] for name in relative]
  stem_counts = collections.Counter(stems)
  names = [stem if stem_counts[stem] == 1 else name for stem, name in zip(stems, relative)]
  name_counts = collections.Counter(names)
  clashes = [path for path, name in zip(files, names) if name_counts[name] > 1]
  if clashes:
    raise ValueError(f'inputs {clashes} would write outputs of the same name; rename some')
  return [ImageFile(path, name) for path, name in zip(files, names)]


def find_inputs(spec: str, exclude: str | None = None) -> list[ImageFile]:
  """The image files of `spec` (a file, a folder searched recursively, or a glob), sorted.

  Files under `exclude` (the output folder) are left out, so outputs written
  inside the input folder are never read back as inputs. Files named like
  images are taken whether or not they can be read (`read_image` says why
  not). Raises FileNotFoundError, naming `spec`, when it does not exist or
  holds no image file, and ValueError when two files would get the same name.
  """
  if os.path.isfile(spec):
    files, root = [spec], os.path.dirname(spec)
  elif os.path.isdir(spec):
    files = [os.path.join(folder, name) for folder, _, names in os.walk(spec)
             for name in names if _is_image_name(name) and not name.startswith('.')]
    root = spec
  elif glob.has_magic(spec):
    files = [path for path in glob.glob(spec, recursive=True) if _is_image_name(path)]
    root = _glob_root(spec)
  else:
    raise FileNotFoundError(f'input {spec}: no such file or folder')
  if exclude is not None:
    files = [path for path in files if not _inside(path, exclude)]
  if not files:
    raise FileNotFoundError(f'input {spec}: no image files ({", ".join(IMAGE_EXTENSIONS)})')
  return _named(sorted(files), root)


def read_image(path: str) -> np.ndarray:
  """The image at `path` as (H, W, 3) RGB uint8; raises UnreadableImage naming it and the reason."""
  try:
    with Image.open(path) as image:
      ImageOps.exif_transpose(image, in_place=True)
      if image.mode.startswith('I;16'):
        # 16-bit grayscale; Pillow reads 16-bit colour images as 8-bit with their high byte.
        return np.repeat((np.asarray(image, np.uint16) >> 8).astype(np.uint8)[..., None], 3, -1)
      if image.mode in ('I', 'F'):
        raise ValueError(f'32-bit samples (mode {image.mode}) are not supported; '
                         'convert the image to 8 or 16 bits')
      return np.asarray(image.convert('RGB'))
  # Pillow's decoders fail on damaged data with many exception types (OSError, SyntaxError,
  # EOFError, struct.error, ...); each of them means the same here: skip the file, say why.
  except Exception as error:  # pylint: disable=broad-exception-caught
    raise UnreadableImage(path, str(error) or type(error).__name__) from error


def _write_image(path: str, array: np.ndarray, *params) -> None:
  """Encodes by the extension of `path` (cv2: BGR channel order) and writes the file."""
  ok, encoded = cv2.imencode(os.path.splitext(path)[1], array, params)
  if not ok:
    raise ValueError(f'{path}: OpenCV could not encode a {array.dtype} {array.shape} image')
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  epath.Path(path).write_bytes(encoded.tobytes())


def save_prediction(out_dir: str, name: str, image: np.ndarray, class_map: np.ndarray,
                    palette: np.ndarray) -> list[int]:
  """Writes gray/<name>.png, color/<name>.png and overlay/<name>.jpg under `out_dir`.

  `image` is the (H, W, 3) RGB uint8 input, `class_map` its (H, W) classes,
  `palette` the (classes, 3) uint8 RGB colours (`registry.palette`). The class
  map is 8-bit up to 256 classes and 16-bit beyond. Returns the classes
  present, ascending.
  """
  gray = class_map.astype(np.uint8 if len(palette) <= 256 else np.uint16)
  color = palette[class_map]
  overlay = cv2.addWeighted(np.asarray(image, np.uint8), 0.5, color, 0.5, 0)
  _write_image(os.path.join(out_dir, 'gray', f'{name}.png'), gray)
  _write_image(os.path.join(out_dir, 'color', f'{name}.png'), color[..., ::-1])
  _write_image(os.path.join(out_dir, 'overlay', f'{name}.jpg'), overlay[..., ::-1],
               cv2.IMWRITE_JPEG_QUALITY, 90)
  return np.unique(class_map).tolist()


def describe_run(config, workdir: str, step: int, protocol: inference.Protocol,
                 config_file: str | None = None) -> dict:
  """What prediction.json says about the model and protocol that write the folder."""
  where = workdir if paths.is_remote(workdir) else os.path.realpath(workdir)
  return {'workdir': where, 'step': step, 'protocol': protocol.settings(),
          'config': config_file, 'data': config.data.name,
          'num_classes': config.data.num_classes}


def _read_json(path: str) -> dict | None:
  if not epath.Path(path).exists():
    return None
  return json.loads(epath.Path(path).read_text())


def _write_json(path: str, value) -> None:
  epath.Path(path).write_text(json.dumps(value, indent=1) + '\n')


def _clear_outputs(out_dir: str) -> None:
  for folder in OUTPUT_FOLDERS:
    (epath.Path(out_dir) / folder).rmtree(missing_ok=True)
  for name in (LEGEND_FILE, LEGEND_IMAGE):
    (epath.Path(out_dir) / name).unlink(missing_ok=True)


def _owner_keys(run: dict) -> str:
  return ', '.join(f'{key}={run.get(key)}' for key in OWNER_KEYS)


def _ownership_problem(out_dir: str, run: dict, overwrite: bool) -> str | None:
  """Why `run` may not write into `out_dir`; None when it may (after clearing it, `overwrite`)."""
  if overwrite:
    _clear_outputs(out_dir)
    return None
  remedy = (f'choose another output folder or overwrite (clears '
            f'{", ".join(name + "/" for name in OUTPUT_FOLDERS)} and the legend)')
  run_file = os.path.join(out_dir, RUN_FILE)
  try:
    previous = _read_json(run_file)
  except (OSError, ValueError) as error:
    return f'{run_file} is unreadable ({error}): {remedy}'
  if previous is None:
    if any(folder.is_dir() and any(folder.iterdir())
           for folder in (epath.Path(out_dir) / name for name in OUTPUT_FOLDERS)):
      return f'output folder {out_dir} holds outputs but no {RUN_FILE}: {remedy}'
    return None
  if all(previous.get(key) == run[key] for key in OWNER_KEYS):
    return None
  return (f'output folder {out_dir} holds predictions of {_owner_keys(previous)}; this run is '
          f'{_owner_keys(run)}: {remedy}')


def _all_processes(value) -> list:
  """`value` (JSON-able) of every process, in process order."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array(len(data)))
  padded = np.zeros(lengths.max(), np.uint8)
  padded[:len(data)] = data
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(row[:length].tobytes()) for row, length in zip(rows, lengths)]


def claim_output(out_dir: str, run: dict, *, overwrite: bool = False) -> None:
  """Makes `out_dir` the folder of `run` (see `describe_run`) before any prediction is written.

  Refused with OutputInUse when it holds outputs of another model or protocol
  (or outputs without prediction.json), unless `overwrite`, which removes the
  outputs and the legend first. prediction.json is written at once (status
  'running'), so a run that stops early still marks the folder as its own.
  Process 0 decides and writes; every process raises when it refuses.
  """
  problem = None
  if jax.process_index() == 0:
    problem = _ownership_problem(out_dir, run, overwrite)
    if problem is None:
      epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
      _write_json(os.path.join(out_dir, RUN_FILE), {**run, 'status': 'running'})
  problem = _all_processes(problem)[0]
  if problem:
    raise OutputInUse(problem)


class Results(NamedTuple):
  classes: dict[str, list[int]]   # output name -> classes present
  skipped: list[dict]             # {'path', 'reason'} of each unreadable input


def predict_files(predictor: inference.Predictor, inputs: list[ImageFile], out_dir: str,
                  palette: np.ndarray, refine=None) -> Results:
  """Predicts and saves (`save_prediction`) this process's share of `inputs`; all processes' results.

  Every process must call this with the same `inputs` (the predictor's steps
  are collective). Images are read as the predictor takes them, so memory
  stays bounded for any number of inputs. `refine(image, class_map) -> class_map`
  (e.g. a `scene_refinement.SceneRefiner`) changes each prediction before it is saved.
  """
  share = inputs[jax.process_index()::jax.process_count()]
  skipped = []

  def readable() -> Iterable:
    for item in share:
      try:
        image = read_image(item.path)
      except UnreadableImage as error:
        logging.warning('skipped %s', error)
        skipped.append({'path': item.path, 'reason': error.reason})
        continue
      yield (item.name, image), image

  classes = {}
  for (name, image), probabilities in predictor.probabilities(readable()):
    class_map = inference.class_map(probabilities)
    if refine is not None:
      class_map = refine(image, class_map)
    classes[name] = save_prediction(out_dir, name, image, class_map, palette)
    logging.log_every_n_seconds(logging.INFO, 'predicted %d of %d images (%s)', 10,
                                len(classes), len(share), name)
  return gather_results(classes, skipped)


def gather_results(classes: dict[str, list[int]], skipped: list[dict]) -> Results:
  """Every process's classes and skips in one Results (collective: all processes call it)."""
  everyone = _all_processes([classes, skipped])
  return Results({name: present for done, _ in everyone for name, present in done.items()},
                 [entry for _, missed in everyone for entry in missed])


def _legend_image(entries: list[dict]) -> np.ndarray:
  """A white RGB image with one row per class: its colour swatch, index and name."""
  font, scale, row = cv2.FONT_HERSHEY_SIMPLEX, 0.5, 24
  labels = [f'{entry["index"]} {entry["name"]}' for entry in entries]
  width = 60 + max(cv2.getTextSize(label, font, scale, 1)[0][0] for label in labels)
  image = np.full((row * len(entries) + 4, width, 3), 255, np.uint8)
  for position, (entry, label) in enumerate(zip(entries, labels)):
    top = 4 + position * row
    cv2.rectangle(image, (4, top), (44, top + row - 5), tuple(entry['color']), cv2.FILLED)
    cv2.putText(image, label, (52, top + row - 9), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
  return image


def write_summary(out_dir: str, run: dict, results: Results, class_names: tuple[str, ...],
                  palette: np.ndarray) -> None:
  """legend.json/.png (the images of this and earlier runs in the folder) and prediction.json.

  Call on one process (process 0) after `predict_files`.
  """
  legend_file = os.path.join(out_dir, LEGEND_FILE)
  images = {**(_read_json(legend_file) or {}).get('images', {}), **results.classes}
  present = sorted({index for classes in images.values() for index in classes})
  entries = [{'index': index, 'name': class_names[index], 'color': palette[index].tolist()}
             for index in present]
  _write_json(legend_file, {'classes': entries, 'images': dict(sorted(images.items()))})
  if entries:
    _write_image(os.path.join(out_dir, LEGEND_IMAGE), _legend_image(entries)[..., ::-1])
  _write_json(os.path.join(out_dir, RUN_FILE),
              {**run, 'status': 'complete', 'images': len(results.classes),
               'skipped': results.skipped})

"""Where metrics go: TensorBoard and `WORKDIR/metrics.jsonl`, through clu writers.

`metrics.jsonl` holds one JSON object per logged step (`{"step": 100,
"train/loss": 1.23, ...}`), the machine-readable record that scripts and
tests read. Evaluation rows carry eval/mIoU, eval/mAcc, eval/allAcc and
eval/IoU/<class name> per class.

The workdir may be a `gs://` URI: metrics.jsonl goes through etils.epath and
TensorBoard's event files through TensorFlow's GCS file system. On an object
store each flush rewrites the whole object (no appends there), so every row is
on GCS as soon as it is logged, at a cost that grows with the file.

The console gets no rows: training logs its own progress line (`train`), and
an evaluation logs one line of mIoU / mAcc / allAcc (`write_eval`) or, at the
end of a run, the per-class table.
"""

import contextlib
import json
import os

import jax
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath

from pspnet_jax import paths

METRICS_FILE = 'metrics.jsonl'


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per write_scalars call to a file; other summaries are not kept."""

  def __init__(self, path: str):
    # epath's open is a context manager (for every backend); this one stays open until close.
    self._stack = contextlib.ExitStack()
    self._file = self._stack.enter_context(epath.Path(path).open('a', encoding='utf-8'))

  def write_scalars(self, step, scalars):
    row = {'step': int(step), **{key: float(value) for key, value in scalars.items()}}
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    self._file.flush()

  def close(self):
    self._stack.close()


def drop_rows_after(workdir: str, step: int) -> None:
  """Removes metrics.jsonl rows past `step` (and a torn last line) before a resumed run.

  A run that resumes from checkpoint `step` replays the steps after it and logs
  them again; without this, readers would see two rows for one step.
  """
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return
  with path.open(encoding='utf-8') as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # the process died in the middle of writing this row
      continue
    if row['step'] <= step:
      kept.append(line if line.endswith('\n') else line + '\n')
  if kept != lines:
    # Replaced whole, so a crash here leaves the old file or the new one, never half.
    paths.write_whole(path, ''.join(kept))
    logging.info('%s: dropped %d rows past step %d, which this run replays', path,
                 len(lines) - len(kept), step)


def eval_row(workdir: str, step: int, prefix: str = 'eval') -> dict | None:
  """The last metrics.jsonl row of step `step` with `prefix`/mIoU (`write_eval`'s), or None."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return None
  found = None
  with path.open(encoding='utf-8') as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a torn last line
        continue
      if row.get('step') == step and f'{prefix}/mIoU' in row:
        found = row
  return found


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + metrics.jsonl on process 0; nothing elsewhere (see the module docstring
  for the console)."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(workdir),
      JsonlWriter(os.path.join(workdir, METRICS_FILE))])


def log_class_table(title: str, results: dict, class_names) -> None:
  """The per-class IoU and accuracy table on the console."""
  lines = [f'  {index:3d} {name:20s} IoU {iou:.4f}  acc {acc:.4f}' for index, (name, iou, acc)
           in enumerate(zip(class_names, results['IoU'], results['acc']))]
  logging.info('%s:\n%s\n  mIoU %.4f  mAcc %.4f  allAcc %.4f', title, '\n'.join(lines),
               results['mIoU'], results['mAcc'], results['allAcc'])


# The keys of `metrics.segmentation_metrics` and of `evaluation.evaluate_split`'s bookkeeping.
_SEGMENTATION_KEYS = ('mIoU', 'mAcc', 'allAcc', 'IoU', 'acc', 'confusion', 'num_images', 'seconds')


def write_eval(writer: metric_writers.MetricWriter, step: int, results: dict,
               class_names, *, table: bool, prefix: str = 'eval') -> None:
  """One metrics row with the per-class IoUs under `prefix`/; `table` also logs the table."""
  row = {f'{prefix}/{key}': results[key] for key in ('mIoU', 'mAcc', 'allAcc')}
  # A task's own scalars beside them (refinement: fg_IoU, input_fg_IoU, mBA, input_mBA).
  extra = {key: float(value) for key, value in results.items()
           if key not in _SEGMENTATION_KEYS and np.ndim(value) == 0}
  row.update({f'{prefix}/{key}': value for key, value in extra.items()})
  # Tags without spaces ('chest of drawers'): TensorBoard rewrites illegal summary names.
  for name, iou in zip(class_names, results['IoU']):
    if not np.isnan(iou):
      row[f'{prefix}/IoU/{name.replace(" ", "_")}'] = iou
  extra_text = ''.join(f'  {key} {value:.4f}' for key, value in extra.items())
  if table:
    log_class_table(f'per-class results ({prefix}) at step {step}', results, class_names)
    if extra:
      logging.info('%s at step %d:%s', prefix, step, extra_text)
  else:
    logging.info('%s at step %d: mIoU %.4f  mAcc %.4f  allAcc %.4f%s', prefix, step,
                 results['mIoU'], results['mAcc'], results['allAcc'], extra_text)
  writer.write_scalars(step, row)

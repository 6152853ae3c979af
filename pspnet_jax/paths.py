"""Run files local or in an object store (`gs://...`), through one abstraction: etils.epath.

Every file the project reads or writes in a workdir, an output folder or an
export path goes through `etils.epath.Path`, which hands local paths to the
os module and `gs://` (with TensorFlow installed, as here) to tf.io.gfile.
Orbax writes its checkpoints through the same epath (arrays through
tensorstore), TensorBoard through TensorFlow's file systems, and TFDS reads
datasets through tf.io.gfile and array_record's own GCS reader.

What differs on an object store, and how the callers cope:
- there are no folders, only name prefixes: `mkdir` is harmless, a listing of
  a missing prefix is empty;
- a write becomes visible only when the object is complete, so a reader sees
  the old object or the new one; `write_whole` writes a temporary and renames
  it so that local files get the same guarantee;
- a rename is a copy and a delete, not atomic, and there is no advisory
  file lock (run_lock uses a lease instead);
- an append rewrites the whole object on every flush (metrics.jsonl's rows).
"""

import os

from etils import epath


def is_remote(path) -> bool:
  """True for a URI (gs://, s3://, ...), False for a local path."""
  return '://' in os.fspath(path)


def absolute(path) -> str:
  """`path` absolute and normalized, ~ expanded; a URI as it is, less a final /."""
  path = os.fspath(path)
  return path.rstrip('/') if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def write_whole(path, data: str | bytes) -> None:
  """Writes `data` to `path` so that a reader sees the old content or the new, never part of it."""
  path = epath.Path(path)
  temporary = path.with_name(path.name + '.tmp')
  if isinstance(data, str):
    temporary.write_text(data, encoding='utf-8')
  else:
    temporary.write_bytes(data)
  temporary.replace(path)

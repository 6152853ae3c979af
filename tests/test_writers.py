"""metrics.jsonl: one row per step, even after a run resumes and replays steps."""

import json

from pspnet_jax import writers


def test_rows_past_the_restored_step_and_a_torn_line_are_dropped(tmp_path):
  path = tmp_path / writers.METRICS_FILE
  rows = [{'step': step, 'train/loss': 1.0 / step} for step in range(1, 11)]
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows) + '{"step": 11, "train/lo')
  writers.drop_rows_after(str(tmp_path), 6)
  assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:6]
  writer = writers.JsonlWriter(str(path))
  writer.write_scalars(7, {'train/loss': 0.5})
  writer.close()
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == list(range(1, 8))


def test_nothing_to_drop_leaves_the_file_alone(tmp_path):
  writers.drop_rows_after(str(tmp_path), 3)  # no file yet: a fresh run
  path = tmp_path / writers.METRICS_FILE
  path.write_text('{"step": 1}\n{"step": 2}\n')
  before = path.stat().st_mtime_ns
  writers.drop_rows_after(str(tmp_path), 2)
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n' and path.stat().st_mtime_ns == before

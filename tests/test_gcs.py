"""gs:// workdirs and data dirs against a local GCS emulator (tests/gcs_emulator.py): every file
the project writes lands in the bucket with its content, through the clients that write it.

Fast: the workdir lease (run_lock) on an object store; metrics.jsonl and
TensorBoard events; evaluation results; prediction outputs; weights exports and
imports. Slow: a demo training run with --workdir and data.data_dir on gs://,
its newest checkpoint damaged, resumed from the one before (set aside on gs://),
then exported and imported.
"""

import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from etils import epath

from configs import demo
from demo_runs import (REPO, RESUME_OVERRIDES, RESUME_STEPS, TWO_DEVICES,
                       assert_same_last_checkpoint, demo_config, main_command, read_rows)
from pspnet_jax import (checkpoint, evaluation, inference, predictions, run_lock, train,
                        weights, writers)
from pspnet_jax.data import builders, synthetic

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec('gcp_storage_emulator') is None or shutil.which('openssl') is None,
    reason='needs gcp-storage-emulator (requirements-dev.txt) and the openssl command')

BUCKET = 'gs://bucket'


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The emulator, with this process's environment pointing every client at it."""
  import gcs_emulator  # pylint: disable=import-outside-toplevel
  process, environment = gcs_emulator.start(str(tmp_path_factory.mktemp('gcs')))
  with pytest.MonkeyPatch.context() as patch:
    for key, value in environment.items():
      patch.setenv(key, value)
    yield environment
  process.kill()
  process.wait()


@pytest.fixture
def workdir(gcs, request):
  """A fresh gs:// folder per test."""
  del gcs
  return f'{BUCKET}/{re.sub(r"[^a-z0-9_]+", "_", request.node.name)}'


@pytest.fixture
def short_lease(monkeypatch):
  monkeypatch.setattr(run_lock, 'SETTLE_SECONDS', 0.3)
  monkeypatch.setattr(run_lock, 'HEARTBEAT_SECONDS', 0.2)


def metrics_rows(workdir) -> list[dict]:
  text = (epath.Path(workdir) / writers.METRICS_FILE).read_text()
  return [json.loads(line) for line in text.splitlines()]


def lock_record(workdir) -> dict:
  """The lock file's JSON. The emulator (not GCS) can serve an object while a heartbeat is
  uploading it, cut short: read again then."""
  for _ in range(20):
    try:
      return json.loads((epath.Path(workdir) / run_lock.LOCK_FILE).read_text())
    except json.JSONDecodeError:
      time.sleep(0.05)
  raise AssertionError(f'{workdir}/{run_lock.LOCK_FILE} never read back as JSON')


def test_a_lease_refuses_a_second_run_by_name_until_released(workdir, short_lease):
  with run_lock.hold(workdir) as first:
    assert isinstance(first, run_lock.LeaseLock)
    with pytest.raises(run_lock.WorkdirInUse, match=rf'in use by another run .*"pid": {os.getpid()}'
                       r'.*expires in'):
      run_lock.LeaseLock(workdir).acquire()
    time.sleep(0.6)   # a few heartbeats
    assert 'renewed' in lock_record(workdir)
  assert lock_record(workdir)['released']   # still names the last holder
  with run_lock.hold(workdir):
    pass


def test_an_expired_lease_is_taken_over(workdir, short_lease, monkeypatch):
  (epath.Path(workdir) / run_lock.LOCK_FILE).write_text(
      json.dumps({'host': 'elsewhere', 'pid': 1, 'token': 'x'}))
  with pytest.raises(run_lock.WorkdirInUse, match='elsewhere'):
    run_lock.LeaseLock(workdir).acquire()
  monkeypatch.setattr(run_lock, 'EXPIRY_SECONDS', 0.0)
  with run_lock.hold(workdir):
    assert lock_record(workdir)['pid'] == os.getpid()


def test_the_lease_of_a_dead_process_of_this_host_is_taken_over_at_once(workdir, short_lease):
  dead = subprocess.Popen(['true'])
  dead.wait()
  (epath.Path(workdir) / run_lock.LOCK_FILE).write_text(
      json.dumps({'host': socket.gethostname(), 'pid': dead.pid, 'token': 'x'}))
  with run_lock.hold(workdir):
    assert lock_record(workdir)['pid'] == os.getpid()


def test_training_refuses_a_workdir_whose_lease_is_live(workdir, short_lease):
  (epath.Path(workdir) / run_lock.LOCK_FILE).write_text(
      json.dumps({'host': 'elsewhere', 'pid': 1, 'token': 'x'}))
  with pytest.raises(run_lock.WorkdirInUse, match=workdir):
    train.train_and_evaluate(demo.get_config(), workdir)
  assert [path.name for path in epath.Path(workdir).iterdir()] == [run_lock.LOCK_FILE]


def test_of_two_runs_starting_together_exactly_one_gets_the_lease(workdir, short_lease):
  outcomes = []

  def start():
    lock = run_lock.LeaseLock(workdir)
    try:
      lock.acquire()
      outcomes.append('held')
      time.sleep(0.5)
      lock.release()
    except run_lock.WorkdirInUse:
      outcomes.append('refused')

  threads = [threading.Thread(target=start) for _ in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert sorted(outcomes) == ['held', 'refused']


def test_a_run_whose_lease_was_taken_stops_renewing_and_leaves_it(workdir, short_lease):
  lock = run_lock.LeaseLock(workdir)
  lock.acquire()
  lock.path.write_text(json.dumps({'host': 'other', 'pid': 2, 'token': 'theirs'}))
  time.sleep(0.6)
  lock.release()
  assert lock_record(workdir) == {'host': 'other', 'pid': 2, 'token': 'theirs'}


def test_metrics_and_tensorboard_land_in_the_bucket(workdir):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  writer = writers.create_writer(workdir)
  for step in (1, 2, 3):
    writer.write_scalars(step, {'train/loss': 1.0 / step})
  writer.close()
  rows = metrics_rows(workdir)
  assert rows == [{'step': step, 'train/loss': 1.0 / step} for step in (1, 2, 3)]
  events = tf.io.gfile.glob(f'{workdir}/events.out.tfevents.*')
  assert len(events) == 1
  logged = [(event.step, tf.make_ndarray(value.tensor).item())
            for event in tf.compat.v1.train.summary_iterator(events[0])
            for value in event.summary.value if value.tag == 'train/loss']
  assert logged == [(step, pytest.approx(1.0 / step)) for step in (1, 2, 3)]

  writers.drop_rows_after(workdir, 1)
  assert (epath.Path(workdir) / writers.METRICS_FILE).read_text() == (
      json.dumps(rows[0]) + '\n')


def test_evaluation_results_land_in_the_bucket(workdir):
  confusion = np.arange(9, dtype=np.int64).reshape(3, 3)
  results = {'mIoU': 0.5, 'mAcc': 0.6, 'allAcc': 0.7, 'IoU': [0.1, np.nan, 0.9],
             'acc': [0.2, 0.3, 0.4], 'num_images': 5, 'seconds': 1.5, 'confusion': confusion}
  path = evaluation.results_path(workdir, 'validation', 7, 'whole')
  evaluation.write_results(path, results, ('a', 'b', 'c'), {'name': 'whole'})
  record = json.loads(epath.Path(path).read_text())
  assert record['mIoU'] == 0.5 and record['IoU'] == {'a': 0.1, 'b': None, 'c': 0.9}
  stored = np.load(io.BytesIO(epath.Path(path.removesuffix('.json') + '.confusion.npy')
                              .read_bytes()))
  np.testing.assert_array_equal(stored, confusion)
  assert not [p for p in (epath.Path(workdir) / 'eval').iterdir() if p.name.endswith('.tmp')]


def test_prediction_outputs_land_in_the_bucket(workdir):
  import cv2  # pylint: disable=import-outside-toplevel
  out_dir = f'{workdir}/predictions'
  protocol = inference.Protocol.from_config(demo.get_config())
  run = predictions.describe_run(demo.get_config(), f'{BUCKET}/run', 3, protocol)
  assert run['workdir'] == f'{BUCKET}/run'
  predictions.claim_output(out_dir, run)
  palette = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
  image = np.full((5, 6, 3), 100, np.uint8)
  class_map = np.zeros((5, 6), np.int64)
  class_map[:, 3:] = 2
  present = predictions.save_prediction(out_dir, 'sub/a', image, class_map, palette)
  predictions.write_summary(out_dir, run, predictions.Results({'sub/a': present}, []),
                            ('x', 'y', 'z'), palette)

  def decoded(name):
    return cv2.imdecode(np.frombuffer((epath.Path(out_dir) / name).read_bytes(), np.uint8),
                        cv2.IMREAD_UNCHANGED)

  np.testing.assert_array_equal(decoded('gray/sub/a.png'), class_map)
  np.testing.assert_array_equal(decoded('color/sub/a.png')[..., ::-1], palette[class_map])
  assert decoded('overlay/sub/a.jpg').shape == (5, 6, 3)
  assert decoded('legend.png').ndim == 3
  legend = json.loads((epath.Path(out_dir) / predictions.LEGEND_FILE).read_text())
  assert legend['images'] == {'sub/a': [0, 2]}
  run_file = epath.Path(out_dir) / predictions.RUN_FILE
  assert json.loads(run_file.read_text())['status'] == 'complete'
  # Another model's folder is refused; overwrite clears it.
  with pytest.raises(predictions.OutputInUse):
    predictions.claim_output(out_dir, {**run, 'step': 4})
  predictions.claim_output(out_dir, {**run, 'step': 4}, overwrite=True)
  assert not (epath.Path(out_dir) / 'gray').exists()


@pytest.mark.parametrize('fmt, name', [('semseg', 'w.pth'), ('safetensors', 'w.safetensors')])
def test_weights_files_go_to_and_come_from_the_bucket(workdir, fmt, name):
  state_dict = {'layer.weight': np.arange(6, dtype=np.float32).reshape(2, 3),
                'layer.bias': np.ones(2, np.float32)}
  path = f'{workdir}/{name}'
  weights.write_tensors(state_dict, path, fmt, epoch=3)
  with pytest.raises(FileExistsError):
    weights.write_tensors(state_dict, path, fmt, epoch=3)
  tensors, extras = weights.read_tensors(path)
  assert tensors.keys() == state_dict.keys()
  for key, value in state_dict.items():
    np.testing.assert_array_equal(tensors[key], value)
  assert extras == ({'epoch': 3} if fmt == 'semseg' else {})
  assert [p.name for p in epath.Path(workdir).iterdir()] == [name]   # no temporary left


def test_a_dataset_build_into_the_bucket_says_to_build_locally_and_copy(gcs):
  del gcs
  config = demo.get_config()
  config.data.data_dir = f'{BUCKET}/tfds_unbuilt'
  with pytest.raises(builders.BuildError, match=r'gcloud storage cp -r LOCAL_DATA_DIR/'
                     r'synthetic_context gs://bucket/tfds_unbuilt/'):
    synthetic.prepare(config)


# ---- a whole run ----

# The resume runs' settings (their compiled programs are in the cache), two checkpoints kept.
OVERRIDES = {**RESUME_OVERRIDES, 'train.checkpoint_every': 20, 'eval.at_end_of_training': True}
TRAIN_KEYS = ('train/loss', 'train/main_loss', 'train/aux_loss', 'train/pixel_acc',
              'train/lr_backbone', 'train/lr_head')


def upload(local: str, remote: str) -> None:
  for folder, _, names in epath.Path(local).walk():
    for name in names:
      (folder / name).copy(epath.Path(remote) / (folder / name).relative_to(local))


def train_rows(rows: list[dict]) -> list[dict]:
  return [{key: row[key] for key in TRAIN_KEYS} for row in rows if 'train/loss' in row]


@pytest.mark.slow
def test_a_run_on_gcs_resumes_exports_and_imports_there(gcs, straight_run):
  """The resume runs' straight run (local), here on gs://: the same rows and the same final
  checkpoint bit for bit, also after a restart from gs:// that replays the last steps."""
  local_data_dir, straight = straight_run
  config = demo_config(local_data_dir, OVERRIDES)
  # Built locally and copied up (array_record writes local files only); read from gs:// below.
  data_dir = f'{BUCKET}/tfds'
  upload(local_data_dir, data_dir)
  workdir = f'{BUCKET}/run'
  env = {**TWO_DEVICES, **gcs}

  def train():
    done = subprocess.run(main_command(workdir, data_dir, OVERRIDES), cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

  train()
  run = epath.Path(workdir)
  assert checkpoint.all_steps(workdir) == [20, 24]
  # The run ended with the protocol (the evaluate command's results file).
  rows = metrics_rows(workdir)
  results = evaluation.results_path(workdir, 'validation', RESUME_STEPS, 'whole')
  assert json.loads(epath.Path(results).read_text())['mIoU'] == next(
      row['eval_whole/mIoU'] for row in rows if 'eval_whole/mIoU' in row)
  confusion = np.load(io.BytesIO(epath.Path(results.removesuffix('.json') + '.confusion.npy')
                                 .read_bytes()))
  assert confusion.shape == (config.data.num_classes,) * 2 and confusion.sum() > 0
  assert train_rows(rows) == train_rows(read_rows(straight))
  # The newest checkpoint loses an item: the restart falls back to step 20 and sets 24 aside.
  (run / 'checkpoints' / '24' / 'opt').rmtree()
  train()

  rows = metrics_rows(workdir)
  assert [row['step'] for row in rows if 'train/loss' in row] == list(range(1, RESUME_STEPS + 1))
  # Steps 21-24 again, from the model, optimizer and step restored from gs://: bit for bit.
  assert train_rows(rows) == train_rows(read_rows(straight))
  assert_same_last_checkpoint(straight, workdir, RESUME_STEPS)
  assert checkpoint.all_steps(workdir) == [20, 24]
  assert [p.name.split('-')[0] for p in (run / checkpoint.DAMAGED_DIR).iterdir()] == ['24']
  assert json.loads((run / 'config.json').read_text())['train']['num_steps'] == RESUME_STEPS
  assert len(list((run / 'config_history').iterdir())) == 2
  assert lock_record(workdir)['released']
  assert len(list(run.glob('events.out.tfevents.*'))) == 2   # one per start

  # Export to the bucket, import from it into another gs:// workdir: the same weights.
  export = f'{BUCKET}/export/pspnet.safetensors'
  assert weights.export_weights(config, workdir, export, 'safetensors') == RESUME_STEPS
  imported = f'{BUCKET}/imported'
  assert weights.import_weights(config, imported, export, 'safetensors') == (
      f'{imported}/checkpoints/0')
  exported, _ = weights.read_tensors(export)
  again = weights.to_torch_state_dict(
      checkpoint.model_variables(checkpoint.load_model(config, imported).model))
  assert exported.keys() == again.keys()
  for key, value in exported.items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_an_unreadable_lock_delays_a_renewal_without_giving_the_lease_up(workdir, short_lease,
                                                                       caplog):
  lock = run_lock.LeaseLock(workdir)
  lock.acquire()
  real_read, unreadable = lock._read, [3]   # pylint: disable=protected-access

  def read():
    if unreadable[0]:
      unreadable[0] -= 1
      return {}
    return real_read()
  lock._read = read   # pylint: disable=protected-access
  time.sleep(1.5)   # three unreadable beats, then renewals
  renewed = lock_record(workdir)['renewed']
  lock.release()
  assert unreadable[0] == 0 and time.time() - renewed < 1.0
  assert 'lost its lease' not in caplog.text
  assert lock_record(workdir)['released']

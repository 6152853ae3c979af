"""Faults injected into a run directory: damaged checkpoints, failed writes, early signals.

Each test does what a real fault does (bytes flipped, files truncated or
deleted, a read-only folder, a file-size limit, a signal while the step
compiles) and asserts that no work is lost: the damage is named, the newest
intact checkpoint is used, a failed write stops at once in one line and
leaves the previous checkpoint the latest.
"""

import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from demo_runs import REPO, RESUME_OVERRIDES, main_command
from pspnet_jax import checkpoint, sharding
from test_checkpoint import training_meta

# Enough values that the model's array file is large and incompressible (random floats).
SIZE = 50_000


def variables_of(step: int) -> nnx.State:
  values = np.random.default_rng(step).standard_normal(SIZE).astype(np.float32)
  return nnx.State({'w': nnx.Param(jnp.asarray(values))})


def save(checkpointer, step):
  checkpointer.save(step, variables_of(step), {'count': jnp.array(step)}, training_meta(step))
  checkpointer.wait_until_finished()


def largest_file(directory):
  files = [path for path in glob.glob(os.path.join(directory, '**'), recursive=True)
           if os.path.isfile(path)]
  return max(files, key=os.path.getsize)


def flip_bytes(step_dir):
  path = largest_file(os.path.join(step_dir, 'model'))
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    data = bytearray(f.read(64))
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0x5A for b in data))


def truncate_array_file(step_dir):
  path = largest_file(os.path.join(step_dir, 'model'))
  os.truncate(path, os.path.getsize(path) // 2)


def delete_array_file(step_dir):
  os.remove(largest_file(os.path.join(step_dir, 'model')))


def delete_manifest(step_dir):
  os.remove(os.path.join(step_dir, 'model', 'manifest.ocdbt'))


def garbage_array_metadata(step_dir):
  with open(os.path.join(step_dir, 'model', '_METADATA'), 'w', encoding='utf-8') as f:
    f.write('{"tree_metadata": garbage')


def garbage_meta_item(step_dir):
  with open(os.path.join(step_dir, 'meta', 'metadata'), 'w', encoding='utf-8') as f:
    f.write('not json at all')


def delete_optimizer_item(step_dir):
  shutil.rmtree(os.path.join(step_dir, 'opt'))


DAMAGES = {  # fault -> the item the report must name
    flip_bytes: 'model', truncate_array_file: 'model', delete_array_file: 'model',
    delete_manifest: 'model', garbage_array_metadata: 'model', garbage_meta_item: 'meta',
    delete_optimizer_item: 'opt'}


def restore_newest(workdir):
  checkpointer = checkpoint.TrainCheckpointer(workdir)
  try:
    return checkpointer.restore_newest_intact(variables_of(0), {'count': jnp.array(0)})
  finally:
    checkpointer.close()


@pytest.mark.parametrize('damage', DAMAGES, ids=lambda damage: damage.__name__)
def test_a_damaged_checkpoint_is_named_and_the_one_before_it_used(tmp_path, damage, caplog):
  workdir = str(tmp_path)
  checkpointer = checkpoint.TrainCheckpointer(workdir)
  for step in (1, 2):
    save(checkpointer, step)
  checkpointer.close()
  damage(os.path.join(checkpoint.checkpoint_dir(workdir), '2'))

  with caplog.at_level(logging.ERROR):
    restored = restore_newest(workdir)
  assert restored.step == 1 and int(restored.opt_state['count']) == 1
  np.testing.assert_array_equal(restored.variables['w'].get_value(),
                                variables_of(1)['w'].get_value())
  reports = [record.getMessage() for record in caplog.records]
  step_dir = os.path.join(checkpoint.checkpoint_dir(workdir), '2')
  assert any(f'checkpoint {step_dir} is damaged' in report and
             f'{DAMAGES[damage]} item' in report for report in reports), reports
  # Set aside (not deleted), so that the run can write step 2 again.
  assert [os.path.basename(path).split('-')[0] for path in
          glob.glob(os.path.join(workdir, checkpoint.DAMAGED_DIR, '*'))] == ['2']
  checkpointer = checkpoint.TrainCheckpointer(workdir)
  save(checkpointer, 2)
  checkpointer.close()
  assert checkpoint.all_steps(workdir) == [1, 2]
  assert restore_newest(workdir).step == 2


def test_when_every_checkpoint_is_damaged_the_run_stops_and_moves_nothing(tmp_path):
  workdir = str(tmp_path)
  checkpointer = checkpoint.TrainCheckpointer(workdir)
  for step in (1, 2):
    save(checkpointer, step)
  checkpointer.close()
  for step in (1, 2):
    flip_bytes(os.path.join(checkpoint.checkpoint_dir(workdir), str(step)))
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r'every checkpoint .* \(steps \[1, 2\]'):
    restore_newest(workdir)
  assert checkpoint.all_steps(workdir) == [1, 2]


def test_load_model_names_a_damaged_checkpoint(tmp_path):
  workdir = str(tmp_path)
  checkpoint.save_model(workdir, 0, variables_of(0), {'source': 'test'})
  flip_bytes(os.path.join(checkpoint.checkpoint_dir(workdir), '0'))
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r'checkpoints/0 is damaged: .*model'):
    checkpoint.restore_model(workdir, variables_of(0))


def reference_digest(array: np.ndarray) -> str:
  """The digest's definition in numpy: plain and position-weighted sums of the uint32 words."""
  words = np.ascontiguousarray(array).view(np.uint32).ravel().astype(np.uint64)
  positions = (np.arange(words.size, dtype=np.uint64) * 2654435761 + 1) % 2**32
  plain = int(words.sum() % 2**32)
  weighted = int(sum(int(w) * int(p) for w, p in zip(words, positions)) % 2**32)
  return f'{plain:08x}{weighted:08x}'


def test_digests_match_numpy_on_any_sharding_and_see_single_bits_and_swaps():
  rng = np.random.default_rng(0)
  values = rng.standard_normal((64, 12)).astype(np.float32)
  counts = rng.integers(-2**31, 2**31, 40, dtype=np.int64).astype(np.int32)
  expected = {'w': reference_digest(values), 'count': reference_digest(counts)}
  mesh = sharding.make_mesh()
  on_one_device = {'w': jnp.asarray(values), 'count': jnp.asarray(counts)}
  split_rows = {'w': jax.device_put(values, sharding.batch_sharded(mesh)),
                'count': jax.device_put(counts, sharding.batch_sharded(mesh))}
  assert checkpoint.digests(on_one_device) == expected
  assert checkpoint.digests(split_rows) == expected

  for index in (0, 333, values.size - 1):
    for bit in (0, 17, 31):
      changed = values.copy().ravel()
      changed.view(np.uint32)[index] ^= np.uint32(1 << bit)
      assert checkpoint.digests({'w': changed})['w'] != expected['w'], (index, bit)
  swapped = values.copy().ravel()
  swapped[[3, 500]] = swapped[[500, 3]]
  assert checkpoint.digests({'w': swapped})['w'] != expected['w']


WRITE_FAULT_SCRIPT = textwrap.dedent('''
    import os, resource, sys, time
    sys.path.insert(0, {tests!r})
    import test_faults
    from pspnet_jax import checkpoint
    workdir, fault = sys.argv[1], sys.argv[2]
    checkpointer = checkpoint.TrainCheckpointer(workdir)
    test_faults.save(checkpointer, 1)
    if fault == 'read-only':
      os.chmod(checkpoint.checkpoint_dir(workdir), 0o555)
    else:
      resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    start = time.time()
    try:
      test_faults.save(checkpointer, 2)
      for _ in range(600):   # a training loop checks after every step
        checkpointer.check_for_errors()
        time.sleep(0.1)
      print('NO ERROR')
    except checkpoint.CheckpointWriteError as error:
      print(f'ERROR after {{time.time() - start:.1f}} s: {{error}}')
    checkpointer.close()
''').format(tests=os.path.dirname(os.path.abspath(__file__)))


def run_write_fault(workdir, fault):
  command = [sys.executable, '-c', WRITE_FAULT_SCRIPT, workdir, fault]
  if fault == 'read-only' and os.geteuid() == 0:
    # root writes into read-only folders; without CAP_DAC_OVERRIDE it is held to the mode bits.
    if not shutil.which('setpriv'):
      pytest.skip('running as root without setpriv: a read-only folder cannot be simulated')
    command = ['setpriv', '--bounding-set=-dac_override,-dac_read_search', '--'] + command
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize('fault, reason', [('read-only', 'Permission denied'),
                                           ('file size limit', 'File too large')])
def test_a_failed_save_stops_at_once_naming_the_path_and_keeps_the_previous(tmp_path, fault,
                                                                            reason):
  workdir = str(tmp_path)
  report = run_write_fault(workdir, fault)
  assert report.startswith('ERROR after'), report
  assert float(report.split()[2]) < 30, report
  assert f'checkpoint 2 could not be written to {checkpoint.checkpoint_dir(workdir)}: ' \
         f'{reason}' in report and 'the latest checkpoint is still step 1' in report, report
  os.chmod(checkpoint.checkpoint_dir(workdir), 0o755)
  restored = restore_newest(workdir)
  assert restored.step == 1
  # The half-written step is not listed, and its temporary folder is gone at the next start.
  assert os.listdir(checkpoint.checkpoint_dir(workdir)) == ['1']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_a_signal_while_the_run_starts_ends_it_cleanly(tmp_path, data_dir, signum):
  """Sent when JAX has started, before the step has compiled: exit 0, nothing half-written."""
  workdir = str(tmp_path / 'run')
  process = subprocess.Popen(main_command(workdir, data_dir, RESUME_OVERRIDES), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  lines = []
  for line in process.stderr:
    lines.append(line)
    if 'local /' in line:   # main's "process 0 of 1, N local / N global devices"
      process.send_signal(signum)
      break
  lines += process.stderr.readlines()
  assert process.wait(timeout=300) == 0, ''.join(lines[-30:])
  log = ''.join(lines)
  assert 'stopped on request before the first step' in log, log[-3000:]
  assert checkpoint.all_steps(workdir) == []

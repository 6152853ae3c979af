"""The commands' console contract (pspnet_jax/cli.py): a user's mistake is one line on stderr
and exit status 2, before any work and without leaving a workdir behind; a bug keeps its
traceback (exit 1); the start is quiet; --help explains the config syntax.

Each mistake runs as the user would type it, in a subprocess. Those found while the flags are
parsed must not start the training stack: PROBE reports which of the heavy modules were
imported when the process ended. A missing config file imports none of them; a config that
loads imports neither TensorFlow nor orbax.
"""

import json
import logging
import os
import subprocess
import sys

import pytest

from pspnet_jax import cli
from pspnet_jax.errors import MissingFile, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ('jax', 'tensorflow', 'orbax.checkpoint')
# Runs a command module as `python -m` does and prints, at exit, the heavy modules it imported.
PROBE = ('import atexit, runpy, sys\n'
         'atexit.register(lambda: print("heavy:", [m for m in {heavy!r} if m in sys.modules]))\n'
         'sys.argv = [{module!r}] + {args!r}\n'
         'runpy.run_module({module!r}, run_name="__main__", alter_sys=True)\n')


def command(module, *args, probe=False, timeout=120):
  line = ([sys.executable, '-c', PROBE.format(heavy=HEAVY, module=module, args=list(args))]
          if probe else [sys.executable, '-m', module, *args])
  return subprocess.run(line, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def user_error(result) -> str:
  """The one line of a user error, after checking exit status 2 and no traceback."""
  output = result.stdout + result.stderr
  assert result.returncode == cli.EXIT_USER_ERROR, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), output[-3000:]
  return last


def imported_nothing_heavy(result) -> bool:
  return 'heavy: []' in result.stdout


def imported_no_training_stack(result) -> bool:
  """Neither TensorFlow nor orbax: the process stopped while parsing its flags."""
  heavy = result.stdout.split('heavy:', 1)[1]
  return 'tensorflow' not in heavy and 'orbax' not in heavy


def test_unknown_config_key_is_one_line_with_the_key_it_meant_before_jax(tmp_path):
  workdir = tmp_path / 'mistake1'
  result = command('pspnet_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
                   '--config.train.batchsize=4', probe=True)
  assert user_error(result) == (
      'error: config.train.batchsize: no such key (did you mean config.train.batch_size?); '
      'every key is in configs/default.py')
  assert imported_no_training_stack(result), result.stdout
  assert not workdir.exists()


def test_unknown_config_group_suggests_the_group():
  result = command('pspnet_jax.evaluate', '--config=configs/demo.py', '--workdir=unused',
                   '--config.trian.batch_size=4')
  assert 'config.trian.batch_size: no such key (did you mean config.train?)' in user_error(result)


def test_missing_config_file_fails_before_jax_and_suggests_the_file(tmp_path):
  workdir = tmp_path / 'mistake2'
  result = command('pspnet_jax.main', '--config=configs/dem.py', f'--workdir={workdir}',
                   '--config.train.batch_size=4', probe=True)
  assert user_error(result) == ('error: --config=configs/dem.py: no such file (did you mean '
                                'configs/demo.py?)')
  assert imported_nothing_heavy(result), result.stdout
  assert not workdir.exists()
  result = command('pspnet_jax.predict', '--config=configs/nothing_like_it.py', '--workdir=w',
                   '--input=i', '--output=o', probe=True)
  line = user_error(result)
  assert 'configs/nothing_like_it.py: no such file' in line and 'demo.py' in line
  assert imported_nothing_heavy(result), result.stdout


def test_bad_config_variant_and_bad_override_value_are_one_line():
  result = command('pspnet_jax.benchmark', '--config=configs/ade20k.py:backbone=51', probe=True)
  assert user_error(result) == ('error: --config=configs/ade20k.py:backbone=51: backbone=51: '
                                'choose one of (18, 34, 50, 101, 152)')
  assert imported_no_training_stack(result), result.stdout
  result = command('pspnet_jax.main', '--config=configs/demo.py', '--workdir=unused',
                   '--config.train.batch_size=abc')
  assert "--config.train.batch_size=abc: invalid literal for int()" in user_error(result)


def test_flag_mistakes_exit_2_in_one_line():
  result = command('pspnet_jax.main', '--config=configs/demo.py', '--workdri=runs/x')
  assert "Unknown command line flag 'workdri'. Did you mean: workdir ?" in user_error(result)
  result = command('pspnet_jax.benchmark', '--config=configs/demo.py', '--what=compile')
  assert '--topology goes with --what=compile' in user_error(result)


def test_invalid_config_value_is_one_line_and_leaves_no_workdir(tmp_path):
  workdir = tmp_path / 'mistake5'
  result = command('pspnet_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
                   '--config.model.backbone=resnet51')
  assert user_error(result) == ("error: config.model.backbone='resnet51': must be one of "
                                "['resnet101', 'resnet152', 'resnet18', 'resnet34', 'resnet50']")
  assert not workdir.exists()


def test_batch_that_does_not_split_over_the_devices_names_a_size_that_does(tmp_path):
  # conftest gives the subprocesses 8 CPU devices.
  workdir = tmp_path / 'run'
  result = command('pspnet_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
                   '--config.train.batch_size=12')
  assert user_error(result) == ('error: config.train.batch_size=12 does not split over the 8 '
                                'devices: use a multiple of 8, e.g. --config.train.batch_size=8')
  assert not workdir.exists()


def test_unprepared_dataset_says_how_to_prepare_it_in_one_line(tmp_path):
  workdir = tmp_path / 'run'
  data_dir = tmp_path / 'tfds'
  result = command('pspnet_jax.main', '--config=configs/ade20k.py', f'--workdir={workdir}',
                   f'--config.data.data_dir={data_dir}')
  line = user_error(result)
  assert f"dataset 'ade20k' (TFDS name 'ade20k_semseg') is not built in data dir {data_dir}" in line
  assert (f'python -m pspnet_jax.data.prepare --dataset=ade20k --manual_dir=SOURCE_FOLDER '
          f'--data_dir={data_dir}') in line
  assert not workdir.exists()


@pytest.fixture
def checkpoint_of_another_config(tmp_path):
  """(workdir, data dir, overrides): a training checkpoint whose recorded config has
  model.output_stride=8 where the command line (demo's) has 16. The resume refuses it from
  the checkpoint's meta, before reading any array, so a stand-in array serves as the model."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from configs import demo  # pylint: disable=import-outside-toplevel
  from pspnet_jax import checkpoint  # pylint: disable=import-outside-toplevel

  data_dir = str(tmp_path / 'tfds')
  overrides = {'data.data_dir': data_dir, 'data.synthetic.num_train': 16,
               'data.synthetic.num_validation': 8, 'data.synthetic.max_size': 129}
  config = demo.get_config()
  for key, value in overrides.items():
    *sections, name = key.split('.')
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  config.model.output_stride = 8
  workdir = str(tmp_path / 'run')
  meta = {'step': 5, checkpoint.TRAINING_META_KEY: 250, 'nonfinite_steps': 0,
          'num_train_examples': 16, 'config': json.loads(config.to_json())}
  checkpoint.save_model(workdir, 5, nnx.State({'stand_in': jnp.zeros(2)}), meta)
  os.makedirs(os.path.join(checkpoint.checkpoint_dir(workdir), '5', 'opt'))
  return workdir, data_dir, [f'--config.{key}={value}' for key, value in overrides.items()]


def test_resume_with_a_changed_config_is_one_line_naming_the_key(checkpoint_of_another_config):
  workdir, _, overrides = checkpoint_of_another_config
  before = sorted(os.listdir(workdir))
  result = command('pspnet_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
                   *overrides)
  line = user_error(result)
  assert 'model.output_stride: 8 -> 16' in line and '--allow_config_change=model.output_stride' \
      in line
  assert set(before) <= set(os.listdir(workdir))   # an existing workdir stays as it was


def test_evaluate_and_predict_refuse_a_workdir_without_checkpoints_and_create_nothing(tmp_path):
  workdir = tmp_path / 'not_trained'
  result = command('pspnet_jax.evaluate', '--config=configs/demo.py', f'--workdir={workdir}')
  assert f'error: no checkpoint in {workdir}/checkpoints: train there first' in user_error(result)
  assert not workdir.exists()
  images = tmp_path / 'images'
  images.mkdir()
  result = command('pspnet_jax.predict', '--config=configs/demo.py', f'--workdir={workdir}',
                   f'--input={tmp_path / "nope"}', f'--output={tmp_path / "out"}')
  assert user_error(result) == f'error: input {tmp_path / "nope"}: no such file or folder'
  assert not (tmp_path / 'out').exists() and not workdir.exists()


def test_convert_mistakes_are_one_line_and_create_nothing(tmp_path):
  workdir = tmp_path / 'empty_run'
  base = ('pspnet_jax.convert', '--config=configs/demo.py', f'--workdir={workdir}')
  # A workdir without checkpoints: no empty checkpoints/ left behind.
  line = user_error(command(*base, f'--export_path={tmp_path / "out.pth"}'))
  assert 'no checkpoint in' in line and not workdir.exists()
  line = user_error(command(*base, f'--import_path={tmp_path / "missing.pth"}'))
  assert 'no weights file at' in line and not workdir.exists()
  # The extension says the format; a contradicting --format is refused before any work.
  line = user_error(command(*base, f'--export_path={tmp_path / "x.safetensors"}',
                            '--format=semseg'))
  assert '--format=semseg does not fit' in line and '.safetensors is safetensors' in line


def test_convert_takes_the_format_from_the_extension():
  from pspnet_jax import deploy, weights  # pylint: disable=import-outside-toplevel  (JAX)
  file_format = weights.file_format
  assert set(deploy.EXPORT_FORMATS) <= {file_format(f'x{extension}', None)
                                        for extension in ('.onnx', '.tflite', '.jax', '')}
  assert file_format('weights.safetensors', None) == 'safetensors'
  assert file_format('train_epoch_100.pth', None) == 'semseg'
  assert file_format('zoo.pth', 'mmseg') == 'mmseg'
  assert file_format('model.onnx', None) == 'onnx'
  assert file_format('exported/', None) == 'savedmodel'
  with pytest.raises(UserError, match='give --format'):
    file_format('model.bin', None)
  with pytest.raises(UserError, match='does not fit'):
    file_format('model.onnx', 'tflite')


def test_prepare_refuses_a_missing_or_empty_source_folder_before_writing(tmp_path):
  data_dir = tmp_path / 'tfds'
  result = command('pspnet_jax.data.prepare', '--dataset=folder',
                   f'--manual_dir={tmp_path / "nope"}', f'--data_dir={data_dir}', probe=True)
  assert f'--manual_dir={tmp_path / "nope"}: no such folder' in user_error(result)
  (tmp_path / 'empty').mkdir()
  result = command('pspnet_jax.data.prepare', '--dataset=folder',
                   f'--manual_dir={tmp_path / "empty"}', f'--data_dir={data_dir}')
  assert f'--manual_dir={tmp_path / "empty"}: is empty' in user_error(result)
  assert not data_dir.exists()


_RAISES = ('from pspnet_jax import cli\n'
           'from pspnet_jax.errors import UserError\n'
           'def main(argv):\n'
           '  raise {error}\n'
           'cli.run(main)\n')


def test_a_bug_keeps_its_traceback_and_exit_status_1():
  result = subprocess.run([sys.executable, '-c', _RAISES.format(error="KeyError('boom')")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert 'Traceback' in result.stderr and "KeyError: 'boom'" in result.stderr
  # Even a ValueError: only UserError is a user's mistake.
  result = subprocess.run([sys.executable, '-c', _RAISES.format(error="ValueError('bug')")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1 and 'Traceback' in result.stderr


def test_a_user_error_shows_its_traceback_on_request():
  script = _RAISES.format(error="UserError('your mistake')")
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 2 and result.stderr == 'error: your mistake\n'
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, cli.TRACEBACK_ENV: '1'})
  assert result.returncode == 2 and 'Traceback' in result.stderr
  assert result.stderr.endswith('error: your mistake\n')


@pytest.mark.parametrize('module', ['pspnet_jax.main', 'pspnet_jax.evaluate',
                                    'pspnet_jax.predict', 'pspnet_jax.benchmark'])
def test_help_explains_overrides_variants_and_the_schema(module):
  result = command(module, '--helpshort', probe=True)   # (absl's help exits with status 1)
  text = ' '.join(result.stdout.split())
  for part in ('--config.<key>=<value>', 'configs/ade20k.py:backbone=101', ':eval=ms',
               ':arch=mmseg', 'crop=512x1024', 'configs/default.py'):
    assert part in text, (part, text)
  assert imported_nothing_heavy(result), result.stdout


def test_no_empty_leftovers_removes_only_what_the_failed_command_made_and_left_empty(tmp_path):
  new = tmp_path / 'new'
  with pytest.raises(UserError):
    with cli.no_empty_leftovers(str(new)):
      (new / 'checkpoints').mkdir(parents=True)
      (new / 'run.lock').write_text('')
      raise UserError('late mistake')
  assert not new.exists()
  kept = tmp_path / 'kept'
  with pytest.raises(RuntimeError):
    with cli.no_empty_leftovers(str(kept)):
      kept.mkdir()
      (kept / 'config.json').write_text('{}')
      raise RuntimeError('after writing')
  assert (kept / 'config.json').exists()
  existing = tmp_path / 'existing'
  existing.mkdir()
  with pytest.raises(MissingFile):
    with cli.no_empty_leftovers(str(existing)):
      (existing / 'checkpoints').mkdir()
      raise MissingFile('no checkpoint')
  assert existing.exists() and not (existing / 'checkpoints').exists()
  with cli.no_empty_leftovers(str(tmp_path / 'fine')):
    (tmp_path / 'fine').mkdir()
  assert (tmp_path / 'fine').exists()


def _record(pathname, level, message, name='absl'):
  return logging.LogRecord(name, level, pathname, 1, message, None, None)


def test_the_log_filter_drops_routine_library_lines_and_keeps_the_rest():
  site = '/venv/lib/python3.11/site-packages'
  dropped = [
      _record(f'{site}/orbax/checkpoint/checkpoint_manager.py', logging.INFO, 'Saving item'),
      _record(f'{site}/orbax/checkpoint/x.py', logging.WARNING, 'did not provide metrics'),
      _record(f'{site}/tensorflow_datasets/core/dataset_builder.py', logging.WARNING,
              'Using custom data configuration: x'),
      _record(f'{site}/tensorflow_datasets/core/dataset_info.py', logging.INFO,
              'Load dataset info from /x'),
      _record(f'{site}/jax/_src/xla_bridge.py', logging.INFO,
              "Unable to initialize backend 'tpu': NOT_FOUND", name='jax._src.xla_bridge')]
  kept = [
      _record(f'{site}/orbax/checkpoint/x.py', logging.ERROR, 'cannot write'),
      _record(f'{site}/tensorflow_datasets/core/x.py', logging.WARNING, 'something else'),
      _record(f'{site}/jax/_src/xla_bridge.py', logging.WARNING,
              'An NVIDIA GPU may be present on this machine', name='jax._src.xla_bridge'),
      _record(f'{REPO}/pspnet_jax/train.py', logging.INFO, 'step 1/250'),
      _record(f'{REPO}/pspnet_jax/train.py', logging.WARNING, 'resuming with config changes')]
  assert [cli._keep_record(r) for r in dropped] == [False] * len(dropped)  # pylint: disable=protected-access
  assert [cli._keep_record(r) for r in kept] == [True] * len(kept)  # pylint: disable=protected-access


def test_tensorflow_starts_without_its_onednn_notice():
  script = 'from pspnet_jax import cli\ncli.quiet_environment()\nimport tensorflow\n'
  env = {name: value for name, value in os.environ.items()
         if name not in cli.QUIET_ENVIRONMENT}
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'oneDNN' not in result.stderr and 'absl::InitializeLog' not in result.stderr, \
      result.stderr

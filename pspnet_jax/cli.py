"""What every command shares around its `main`: a quiet console, one-line user errors, --help.

A command ends with `cli.run(main)` instead of `absl.app.run(main)`:

- a known user mistake (`errors.UserError`: a bad config key or value, a
  missing or unloadable config file, a missing input, a dataset not prepared,
  a checkpoint that does not fit the config, any absl flag error or
  `app.UsageError`) prints one line, `error: <what and the fix>`, to stderr and
  exits with status 2 (EXIT_USER_ERROR); any other exception is a bug and keeps
  its traceback (exit 1). PSPNET_TRACEBACK=1 shows the traceback of user errors
  too.
- The config file is loaded while the flags are parsed, before `main` runs, so
  a command that imports JAX inside `main` refuses a missing config file in a
  tenth of a second, and an unknown `--config.<key>` before JAX starts.
- Before TensorFlow is imported, its C++ INFO lines go (QUIET_ENVIRONMENT, where
  the user has not set it): TF_CPP_MIN_LOG_LEVEL=1, and TF_ENABLE_ONEDNN_OPTS=0
  as TF 2.21 prints its oneDNN notice (twice) at any log level; TF only reads
  data, writes summaries and exports here (`benchmark`, which times TF, keeps
  oneDNN). On a Linux host with no TPU, NVIDIA or AMD device, where JAX would
  settle on the CPU anyway, JAX_PLATFORMS=cpu (unless set) spares the probe of
  an installed libtpu, which prints five lines of errors when it finds no chip.
  The absl handler drops the routine lines of libraries (`quiet_logs`): orbax's
  INFO lines and expected warnings, TFDS's INFO lines and "Using custom data
  configuration", JAX's "Unable to initialize backend" probes. Warnings that
  mean something still show.
- `--config`'s --help names the override syntax, the variants and
  configs/default.py (CONFIG_HELP).

For the commands' `main`: `check_batch_sizes` and `no_empty_leftovers` (a failed
run removes the workdir it made and left empty). A workdir without the
checkpoint asked for is `checkpoint.load_model`'s own MissingFile, raised
before orbax creates anything in it.

A library module: it defines no flags and imports neither JAX nor TensorFlow
at import time.
"""

import contextlib
import difflib
import glob
import logging as std_logging
import os
import re
import shutil
import sys
import traceback

from absl import app, flags, logging

from pspnet_jax.errors import UserError

EXIT_USER_ERROR = 2
# Set (to anything but 0 or empty) to see the traceback of a user error as well.
TRACEBACK_ENV = 'PSPNET_TRACEBACK'
CONFIG_FLAG = 'config'
# The repository root: configs/ lives there.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG_HELP = (
    'Config file: configs/<dataset>.py (ade20k, cityscapes, voc2012, demo) or your own with '
    'get_config(). A variant follows a colon: configs/ade20k.py:backbone=101 (18..152), '
    ':eval=ms (multi-scale evaluation), :arch=mmseg (mmsegmentation\'s PSPNet and recipe; on '
    'Cityscapes with crop=769 or crop=512x1024), several joined by commas: '
    'configs/cityscapes.py:arch=mmseg,crop=512x1024. Any key can '
    'be overridden after it: --config.<key>=<value>, e.g. --config.train.batch_size=8 '
    '--config.model.backbone=resnet101. Every key, its default and meaning: configs/default.py.')

# Environment set before TensorFlow is imported, unless the user set it: TF's C++ INFO lines
# off (its warnings and errors stay), and its oneDNN custom ops, whose notice TF 2.21 prints
# twice per process at any log level.
QUIET_ENVIRONMENT = {'TF_CPP_MIN_LOG_LEVEL': '1', 'TF_ENABLE_ONEDNN_OPTS': '0'}
ONEDNN_ENV = 'TF_ENABLE_ONEDNN_OPTS'

# Orbax warns on every save without metrics once it tracks the best checkpoint; our
# periodic (non-evaluation) checkpoints have none by design. A failed background write
# is logged by orbax in several long tracebacks; TrainCheckpointer reports it in one line.
EXPECTED_ORBAX_WARNINGS = ('did not provide metrics', 'raised an exception',
                           'Failed to run', 'Save Finalize thread', 'Checkpointer failed')
# TFDS warns for every builder made with a config it has not registered: ours all are.
# A dataset not built yet is reported by the command (`pipeline.load_split`), with the fix.
EXPECTED_TFDS_WARNINGS = ('Using custom data configuration', 'has no dataset_info.json')


def _keep_record(record: std_logging.LogRecord) -> bool:
  """The absl handler's filter: False for a library's routine line (see the module doc)."""
  path = record.pathname.replace(os.sep, '/')
  if '/orbax/' in path:
    expected = EXPECTED_ORBAX_WARNINGS
  elif '/tensorflow_datasets/' in path:
    expected = EXPECTED_TFDS_WARNINGS
  elif record.name.startswith('jax._src.xla_bridge'):
    # Probing for a TPU (or GPU) that this host does not have: INFO, and not news.
    return not (record.levelno < std_logging.WARNING
                and record.getMessage().startswith('Unable to initialize backend'))
  else:
    return True
  if record.levelno < std_logging.WARNING:
    return False
  message = record.getMessage()
  return not any(text in message for text in expected)


def quiet_logs() -> None:
  """Installs the filter of libraries' routine lines on absl's log handler (idempotent)."""
  logging.get_absl_handler().addFilter(_keep_record)


def quiet_environment(*, keep_onednn: bool = False) -> None:
  """QUIET_ENVIRONMENT where not set, and JAX_PLATFORMS=cpu on a host without accelerators;
  effective only before TensorFlow and JAX's backends start."""
  for name, value in QUIET_ENVIRONMENT.items():
    if not (keep_onednn and name == ONEDNN_ENV):
      os.environ.setdefault(name, value)
  if 'JAX_PLATFORMS' not in os.environ and 'JAX_FORCE_TPU_INIT' not in os.environ and (
      _cpu_only_host()):
    os.environ['JAX_PLATFORMS'] = 'cpu'


# What JAX itself looks at (jax/_src/hardware_utils.py) to decide which backends can start.
_GOOGLE_PCI_VENDOR = '0x1ae0'     # TPU chips
_GPU_DEVICE_FILES = ('/dev/nvidia0', '/dev/nvidiactl', '/dev/dxg', '/dev/kfd')


def _cpu_only_host() -> bool:
  """True on Linux when no TPU chip sits on the PCI bus and no GPU device file exists."""
  if not sys.platform.startswith('linux') or any(map(os.path.exists, _GPU_DEVICE_FILES)):
    return False
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor, encoding='ascii') as file:
        if file.read().strip() == _GOOGLE_PCI_VENDOR:
          return False
    except OSError:
      return False
  return True


def run(main, argv=None, *, keep_onednn: bool = False) -> None:
  """absl's app.run(main) with user errors as one line and exit status 2 (the module doc).

  keep_onednn: leave TensorFlow's oneDNN ops on (for a command that times TensorFlow).
  """
  quiet_environment(keep_onednn=keep_onednn)
  quiet_logs()
  if CONFIG_FLAG in flags.FLAGS:
    flags.FLAGS[CONFIG_FLAG].help = CONFIG_HELP
  try:
    app.run(_usage_errors_as_user_errors(main), argv=argv, flags_parser=parse_flags)
  except UserError as error:
    if os.environ.get(TRACEBACK_ENV, '0') not in ('', '0'):
      traceback.print_exc()
    print(f'error: {error}', file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _usage_errors_as_user_errors(main):
  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError as error:
      raise UserError(f'{error} (--helpshort lists the flags)') from error
  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flags_parser: absl's parse, with its errors and the config's as UserError."""
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as error:
    problem = _config_problem(argv)
    raise UserError(problem or f'{_root_cause(error)} (--helpshort lists the flags)') from error
  except Exception as error:  # pylint: disable=broad-except
    # ml_collections raises plain AttributeError / KeyError for an unknown override key,
    # and whatever the config file's code raised. Ours only when it names the cause.
    problem = _config_problem(argv)
    if problem is None:
      raise
    raise UserError(problem) from error
  if CONFIG_FLAG in flags.FLAGS and _load_failed(flags.FLAGS[CONFIG_FLAG].value):
    # ml_collections keeps a config file that cannot be read as a value that raises on use.
    spec = _config_spec(argv)
    raise UserError(_load_config(spec)[1] or f'--{CONFIG_FLAG}={spec}: cannot be loaded')
  return remaining


def _load_failed(config) -> bool:
  try:
    config.keys()
  except OSError:
    return True
  except AttributeError:   # a config that is not a ConfigDict
    pass
  return False


def _root_cause(error: flags.Error) -> str:
  """An absl flag error as one line: `--flag=value: message` (its first line)."""
  return str(error).strip().removeprefix('flag ').splitlines()[0]


def _one_line(error: BaseException) -> str:
  text = ' '.join(str(error).split())
  return text if isinstance(error, (ValueError, OSError)) else f'{type(error).__name__}: {text}'


def _config_spec(argv: list[str]) -> str | None:
  """The value of the last --config on the command line, or None."""
  spec = None
  for i, arg in enumerate(argv[1:], 1):
    match = re.fullmatch(rf'--?{CONFIG_FLAG}(=(.*))?', arg)
    if match:
      spec = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return spec


def _config_problem(argv: list[str]) -> str | None:
  """What is wrong with the config of this command line (its file, then its override keys),
  or None when nothing is (or when the cause is not one of those)."""
  if CONFIG_FLAG not in flags.FLAGS:
    return None
  spec = _config_spec(argv)
  if spec is None:
    return None
  config, problem = _load_config(spec)
  if problem or config is None:
    return problem
  overrides = [re.sub(rf'^--?(no)?{CONFIG_FLAG}\.', '', arg.split('=', 1)[0])
               for arg in argv[1:] if re.match(rf'--?(no)?{CONFIG_FLAG}\.', arg)]
  for override in overrides:
    problem = _missing_key(config, override)
    if problem:
      return problem
  return None


def _load_config(spec: str):
  """(config, None) when `spec` (FILE[:VARIANT]) loads as --config would; (None, one line
  saying why not) when it does not; (None, None) when its code failed in another way."""
  path = spec.split(':', 1)[0]
  where = f'--{CONFIG_FLAG}={spec}'
  if not path:
    return None, f'--{CONFIG_FLAG} is empty: give a config file, e.g. configs/demo.py'
  if not os.path.exists(path):
    return None, f'{where}: no such file{_nearby_configs(path)}'
  if os.path.isdir(path):
    return None, (f'{where}: {path} is a folder; give a config file in it, e.g. '
                  f'{path.rstrip("/")}/demo.py')
  try:
    config = flags.FLAGS[CONFIG_FLAG].parser.parse(spec)
  except SyntaxError as error:
    return None, f'{where}: {error.msg} ({error.filename}, line {error.lineno})'
  except (TypeError, ValueError) as error:
    # ml_collections wraps the file's own error with its traceback as text.
    return None, f'{where}: {_one_line(error.__context__ or error)}'
  except AttributeError as error:
    if 'get_config' in str(error):
      return None, f'{where}: {path} defines no get_config()'
    return None, None
  except Exception:  # pylint: disable=broad-except  (a bug in the file: its traceback shows)
    return None, None
  if _load_failed(config):   # ml_collections keeps a read failure inside the value
    try:
      config.keys()
    except OSError as error:
      return None, f'{where}: cannot be loaded: {_one_line(error.__cause__ or error)}'
  return config, None


def _nearby_configs(path: str) -> str:
  folder = os.path.dirname(path) or '.'
  name = os.path.basename(path)
  if os.path.isdir(folder):
    files = sorted(f for f in os.listdir(folder) if f.endswith('.py') and f != '__init__.py')
    close = difflib.get_close_matches(name, files, n=1)
    if close:
      return f' (did you mean {os.path.join(os.path.dirname(path), close[0])}?)'
    if files:
      return f' ({folder}/ has {", ".join(files)})'
  if not os.path.isabs(path) and os.path.exists(os.path.join(REPO, path)):
    return (f' in {os.getcwd()}; it is in {REPO}: run from there or give '
            f'{os.path.join(REPO, path)}')
  return ''


def _missing_key(config, override: str) -> str | None:
  """`config.<override>: no such key (did you mean ...)`, or None when the key exists."""
  node, seen = config, []
  for part in override.split('.'):
    name = part.split('[', 1)[0]
    keys = _keys(node)
    if keys is None:
      return (f'config.{override}: config.{".".join(seen)} is a {type(node).__name__}, '
              'not a group of keys')
    if name not in keys:
      close = difflib.get_close_matches(name, keys, n=1)
      parent = '.'.join(seen + [''])
      hint = (f'did you mean config.{parent}{close[0]}?' if close else
              f'config.{parent.rstrip(".") or "<root>"} has {", ".join(sorted(keys))}')
      return f'config.{override}: no such key ({hint}); every key is in configs/default.py'
    if '[' in part:
      return None
    node = node[name]
    seen.append(name)
  return None


def _keys(node) -> list[str] | None:
  try:
    return [str(key) for key in node.keys()]
  except (AttributeError, TypeError):
    return None


def check_batch_sizes(config, *keys: str) -> None:
  """UserError unless each config key (e.g. 'train.batch_size') splits over all devices, as
  the mesh of every command spans them (`sharding.local_batch_size`). Imports JAX."""
  import jax  # pylint: disable=import-outside-toplevel
  devices = jax.device_count()
  for key in keys:
    section, name = key.split('.')
    value = config[section][name]
    if isinstance(value, int) and value >= 1 and value % devices:
      fits = max(devices, value // devices * devices)
      raise UserError(f'config.{key}={value} does not split over the {devices} devices: use '
                      f'a multiple of {devices}, e.g. --config.{key}={fits}')


@contextlib.contextmanager
def no_empty_leftovers(workdir: str | None, *, also=('checkpoints',), ignore=('run.lock',)):
  """On an exception inside, removes what this command created under `workdir` and left
  empty: `workdir` itself when it did not exist before and now holds nothing but the files
  named in `ignore` and empty folders, else each folder of `also` that is new and empty.
  Local folders only; an exception goes on as it was."""
  if not workdir or '://' in workdir:
    yield
    return
  workdir = os.path.abspath(os.path.expanduser(workdir))
  existed = {path for path in [workdir] + [os.path.join(workdir, sub) for sub in also]
             if os.path.exists(path)}
  try:
    yield
  except BaseException:
    if workdir not in existed:
      if os.path.isdir(workdir) and _holds_nothing(workdir, ignore):
        shutil.rmtree(workdir, ignore_errors=True)
    else:
      for sub in also:
        path = os.path.join(workdir, sub)
        if path not in existed and os.path.isdir(path) and _holds_nothing(path, ()):
          shutil.rmtree(path, ignore_errors=True)
    raise


def _holds_nothing(folder: str, ignore) -> bool:
  for root, _, files in os.walk(folder):
    if any(not (root == folder and name in ignore) for name in files):
      return False
  return True

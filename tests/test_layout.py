"""The house rules that keep the package importable: commands on top, flag-free libraries below.

Every module of the package except the commands is imported into one fresh
interpreter; none may define an absl flag (flags defined at import collide
with the importer's own, e.g. two `--config`), import a command module, or
edit sys.path.
"""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
COMMANDS = ('pspnet_jax.main', 'pspnet_jax.convert', 'pspnet_jax.benchmark',
            'pspnet_jax.evaluate', 'pspnet_jax.predict', 'pspnet_jax.refine',
            'pspnet_jax.data.prepare',
            # The commands' shared multi-process and scene-refinement flags: defining flags is
            # their purpose.
            'pspnet_jax.distributed_flags', 'pspnet_jax.refine_flags')
# Imported only by tests and benchmarks, where torch is installed.
NEEDS_TORCH = ('pspnet_jax.torch_reference',)

_PROBE = '''
import importlib, sys
from absl import flags
path_before = list(sys.path)
for name in {libraries!r}:
  importlib.import_module(name)
own_flags = sorted(module for module in flags.FLAGS.flags_by_module_dict()
                   if module.startswith('pspnet_jax'))
commands = sorted(set({commands!r}) & set(sys.modules))
assert not own_flags, f'library modules define absl flags: {{own_flags}}'
assert not commands, f'library modules import command modules: {{commands}}'
assert sys.path == path_before, 'a library module edited sys.path'
'''


def library_modules() -> list[str]:
  names = ['.'.join(path.relative_to(REPO).with_suffix('').parts)
           for path in sorted((REPO / 'pspnet_jax').rglob('*.py'))]
  names = [name.removesuffix('.__init__') for name in names]
  return [name for name in names if name not in COMMANDS + NEEDS_TORCH]


def test_libraries_define_no_flags_and_import_no_command():
  libraries = library_modules()
  assert 'pspnet_jax.train' in libraries and 'pspnet_jax.weights' in libraries
  result = subprocess.run([sys.executable, '-c', _PROBE.format(libraries=libraries,
                                                               commands=COMMANDS)],
                          cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]

"""Test setup: 8 CPU devices (set before JAX starts), the tests folder importable, a
compilation cache, and the uninterrupted demo run that the resume tests compare with.

Many tests compile the very same programs (the demo's train step in several
whole runs, 1-device and 8-device steps of one model), and on 2 cores each
compile costs seconds to tens of seconds. JAX's persistent cache, in
.pytest_cache/ (ignored by git; a fresh clone starts empty), serves repeats
within a run, in the subprocesses the tests start (through the environment)
and across runs of the fast loop. Its key is the program and the compiler
version, so a changed model compiles anew.
"""

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(_REPO, '.pytest_cache', 'jax_compilation_cache'))
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # pylint: disable=wrong-import-position  (after the environment is set)


@pytest.fixture(scope='session')
def straight_run(tmp_path_factory):
  """(data dir, workdir) of the uninterrupted resume run (`demo_runs.straight_resume_run`),
  which test_resume and test_multihost both compare their interrupted runs with."""
  import demo_runs  # pylint: disable=import-outside-toplevel  (imports JAX)
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  workdir = str(tmp_path_factory.mktemp('straight'))
  demo_runs.straight_resume_run(workdir, data_dir)
  return data_dir, workdir


def pytest_collection_modifyitems(items):
  """With pytest-xdist (`-n 2 --dist loadgroup`, pytest.ini), the tests that compare with the
  straight run share one worker, so the session fixture runs once."""
  for item in items:
    if 'straight_run' in getattr(item, 'fixturenames', ()):
      item.add_marker(pytest.mark.xdist_group('straight_run'))

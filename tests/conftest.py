"""Test setup: 8 CPU devices (set before JAX starts), the tests folder importable, and one
compilation cache for the whole session.

The cache lives in a fresh folder per session and reaches the subprocesses the
tests start through the environment: many tests compile the very same train
step (the demo config in several whole runs, 1-device and 8-device steps of
the same model), and on 2 cores each compile costs seconds to tens of seconds.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='pspnet_jax_test_xla_cache_')
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
sys.path.insert(0, os.path.dirname(__file__))

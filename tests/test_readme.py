"""The README's Python snippet runs as written, in a fresh interpreter, outside the repository.

The snippet is read from README.md (the block after its `tested:` marker) and
run with the current directory holding what it names: a run directory
`runs/demo` (a training run's config.json and a checkpoint of that model),
`photo.jpg` and `photos/`. It must finish without error and write one class
map per image, at the image's size, with classes of the model.
"""

import os
import subprocess
import sys

import numpy as np
from flax import nnx
from PIL import Image

from configs import demo
from pspnet_jax import checkpoint
from pspnet_jax.models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = '<!-- tested: tests/test_readme.py'


def readme_snippet() -> str:
  text = open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()
  after = text[text.index(MARKER):]
  start = after.index('```python\n') + len('```python\n')
  return after[start:after.index('```\n', start)]


def test_python_snippet_runs_as_written_from_another_directory(tmp_path):
  config = demo.get_config()
  config.data.crop_size = config.eval.crop_size = 65   # a small, quick model
  workdir = tmp_path / 'runs' / 'demo'
  workdir.mkdir(parents=True)
  (workdir / 'config.json').write_text(config.to_json())
  model = create_model(config, rngs=nnx.Rngs(0))
  checkpoint.save_model(str(workdir), 7, checkpoint.model_variables(model), {})
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), np.uint8)).save(tmp_path / 'photo.jpg')
  (tmp_path / 'photos').mkdir()
  for name, size in (('a', (40, 40)), ('b', (30, 81))):
    Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(tmp_path / 'photos' /
                                                                     f'{name}.png')
  environment = {**os.environ, 'PYTHONPATH': ''}   # the install makes the package importable
  result = subprocess.run([sys.executable, '-c', readme_snippet()], cwd=tmp_path,
                          env=environment, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  for name, size in (('photo', (50, 70)), ('a', (40, 40)), ('b', (30, 81))):
    gray = np.asarray(Image.open(tmp_path / 'out' / 'gray' / f'{name}.png'))
    assert gray.shape == size and gray.max() < config.data.num_classes

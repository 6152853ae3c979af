"""CascadePSP refinement of one large image: ours beside the official code, in one run.

`measure_refine(config, height, width, steps, official_reference)`: the
config's refinement module (the official ResNet-50 one for configs/cascadepsp.py)
with the official module's random initialization, a random image and an
elliptic mask of height x width, refined as `Refiner.refine(image, mask,
fast, L)` does (config.refine.L), fast (global step only) and full (global +
local steps): median seconds over `steps` calls after a warm-up call (which
compiles), the number of local patches refined, and, with
`official_reference`, the official segmentation-refinement 0.6 code timed on
the same image, mask and weights in the same process (its `process_high_res_im`
and `process_im_single_pass` with torch on the CPU, the transforms of its
`Refiner.refine` done here), with the largest difference of the two 0..255
results.

The official package is imported without running its `__init__`, which imports
torchvision only for `Refiner`'s two transforms (torchvision's wheels do not
load with the CPU build of torch here; requirements-reference.txt).
"""

import importlib
import os
import sys
import types

import jax
import numpy as np
from flax import nnx

from pspnet_jax import refinement, weights
from pspnet_jax.benchmarks.timing import median_seconds
from pspnet_jax.models import create_model

_OFFICIAL = 'segmentation_refinement'


def _official_modules():
  """(RefinementModule class, eval_helper module) of the installed official package."""
  if _OFFICIAL not in sys.modules:
    spec = importlib.util.find_spec(_OFFICIAL)
    if spec is None:
      raise ImportError('the official code is not installed: pip install --no-deps -r '
                        'requirements-reference.txt')
    package = types.ModuleType(_OFFICIAL)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules[_OFFICIAL] = package
  return (importlib.import_module(f'{_OFFICIAL}.models.psp.pspnet').RefinementModule,
          importlib.import_module(f'{_OFFICIAL}.eval_helper'))


def _scene(height: int, width: int, seed: int = 0):
  """A random RGB image and a 0/255 mask of an ellipse covering its middle."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (height, width, 3), np.uint8)
  rows, cols = np.ogrid[:height, :width]
  inside = ((rows - height / 2) / (0.35 * height))**2 + ((cols - width / 2) / (0.3 * width))**2
  return image, (inside < 1).astype(np.uint8) * 255


def measure_refine(config, height: int, width: int, steps: int,
                   official_reference: bool = False) -> dict:
  import torch  # pylint: disable=import-outside-toplevel  (benchmarks only)
  official_class, eval_helper = _official_modules()
  torch.manual_seed(config.seed)
  official = official_class().eval()
  image, mask = _scene(height, width)
  L = config.refine.L  # pylint: disable=invalid-name  (the official name)

  def our_refiner():
    model = create_model(config, rngs=nnx.Rngs(config.seed))
    tensors = {key: value.numpy() for key, value in official.state_dict().items()}
    nnx.update(model, weights.from_cascadepsp_state_dict(tensors, nnx.state(model)))
    return refinement.Refiner.from_model(model, batch_size=config.refine.batch_size)

  # A random module's global prediction sits on one side of 0.5 almost everywhere, and the
  # local step then refines no patch. Moving the last bias by the median global logit makes
  # about half of it foreground, so that patches are refined as on real masks.
  refiner = our_refiner()
  probabilities, _ = refinement.global_step(refiner.forward, *refinement.normalize(image, mask),
                                            L)
  probabilities = np.clip(probabilities.astype(np.float64), 1e-12, 1 - 1e-12)
  with torch.no_grad():
    official.final_21.bias -= float(np.median(np.log(probabilities / (1 - probabilities))))
  refiner = our_refiner()
  result = {'what': 'refine', 'size': [height, width], 'L': L,
            'devices': len(jax.local_devices()), 'device_kind': jax.devices()[0].device_kind,
            'torch_threads': torch.get_num_threads()}

  calls = []
  forward = refiner.forward

  def counting(images, masks, inter_s8):
    calls.append(0 if inter_s8 is None else len(images))
    return forward(images, masks, inter_s8)

  refiner.forward = counting   # counts the patches of the local step
  outputs = {}
  # config.refine.fast: the fast mode alone (the local step of a large image takes an hour on
  # a 2-core CPU).
  modes = (True,) if config.refine.fast else (True, False)
  for fast in modes:
    name = 'fast' if fast else 'full'

    def run(fast=fast):
      calls.clear()   # so that after the timing it holds the last call's
      outputs[fast] = refiner.refine(image, mask, fast, L)

    result[f'{name}_seconds'] = median_seconds(run, steps)
    if not fast:
      result['patches_refined'] = sum(calls)
  if official_reference:
    image_tensor = torch.from_numpy(
        ((image / np.float32(255) - refinement.IMAGE_MEAN) / refinement.IMAGE_STD)
        .astype(np.float32).transpose(2, 0, 1)[None].copy())
    mask_tensor = torch.from_numpy(np.where(mask > 127, 1, -1).astype(np.float32)[None, None])
    official_outputs = {}

    def official_run(fast):
      with torch.no_grad():
        step = eval_helper.process_im_single_pass if fast else eval_helper.process_high_res_im
        official_outputs[fast] = (step(official, image_tensor, mask_tensor, L)[0, 0].numpy()
                                  * 255).astype(np.uint8)

    for fast in modes:
      name = 'fast' if fast else 'full'
      result[f'official_{name}_seconds'] = median_seconds(lambda f=fast: official_run(f), steps)
      difference = np.abs(outputs[fast].astype(int) - official_outputs[fast].astype(int))
      result[f'{name}_max_difference'] = int(difference.max())
      result[f'{name}_agreement'] = float(np.mean((outputs[fast] > 127) ==
                                                  (official_outputs[fast] > 127)))
  result['cpu_count'] = os.cpu_count()
  return result

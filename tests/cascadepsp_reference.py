"""The official CascadePSP inference code (`segmentation-refinement` 0.6 on PyPI), importable here.

The package is installed without its dependencies (README's test command:
`pip install --no-deps -r requirements-reference.txt`): it requires torchvision,
whose wheels on the index do not load with our CPU build of torch. The official
code uses torchvision only for `transforms.ToTensor` and `transforms.Normalize`
in `Refiner.__init__`; when torchvision cannot be imported, this module puts a
stand-in of exactly those two (and `Compose`) in `sys.modules` first, written
after torchvision's documented behaviour: ToTensor turns an HxWxC (or HxW) uint8
array into a CxHxW float tensor divided by 255, Normalize subtracts the mean and
divides by the standard deviation per channel. Everything else (the model, the
global and local steps, `Refiner.refine`) is the official code as published.
"""

import importlib
import sys
import types

import numpy as np
import torch


def _to_tensor(array: np.ndarray) -> torch.Tensor:
  array = np.asarray(array)
  if array.ndim == 2:
    array = array[:, :, None]
  tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
  return tensor.float().div(255) if array.dtype == np.uint8 else tensor.float()


class _Normalize:
  def __init__(self, mean, std):
    self.mean, self.std = torch.tensor(mean), torch.tensor(std)

  def __call__(self, tensor):
    return (tensor - self.mean[:, None, None]) / self.std[:, None, None]


class _Compose:
  def __init__(self, steps):
    self.steps = steps

  def __call__(self, value):
    for step in self.steps:
      value = step(value)
    return value


def _install_transforms_stand_in() -> None:
  try:
    importlib.import_module('torchvision.transforms')
    return
  except Exception:  # pylint: disable=broad-except  (absent, or present and broken)
    for name in [name for name in sys.modules if name.startswith('torchvision')]:
      del sys.modules[name]
  transforms = types.ModuleType('torchvision.transforms')
  transforms.ToTensor = lambda: _to_tensor
  transforms.Normalize = _Normalize
  transforms.Compose = _Compose
  torchvision = types.ModuleType('torchvision')
  torchvision.transforms = transforms
  sys.modules['torchvision'] = torchvision
  sys.modules['torchvision.transforms'] = transforms


_install_transforms_stand_in()
segmentation_refinement = importlib.import_module('segmentation_refinement')
RefinementModule = importlib.import_module(
    'segmentation_refinement.models.psp.pspnet').RefinementModule
eval_helper = importlib.import_module('segmentation_refinement.eval_helper')
Refiner = segmentation_refinement.Refiner


def refiner_with_weights(model: torch.nn.Module, folder: str) -> 'Refiner':
  """The official `Refiner` loading `model`'s weights the way it loads the released file
  (a DataParallel state_dict, keys prefixed `module.`, saved as FOLDER/model), on the CPU."""
  torch.save({f'module.{key}': value for key, value in model.state_dict().items()},
             f'{folder}/model')
  return Refiner(device='cpu', model_folder=folder, download_and_check_model=False)

"""The scene-refinement flags `predict` and `evaluate` share, and the refiner they name.

A command-side module like `distributed_flags`: importing it defines absl flags,
so only the commands import it, and each adopts the flags as its own
(`flags.adopt_module_key_flags`) so that `--help` lists them.
"""

from absl import flags

from pspnet_jax.errors import UserError

WORKDIR = flags.DEFINE_string(
    'refine_workdir', None, 'A CascadePSP run directory: refine every prediction with its '
    '(latest) checkpoint (scene refinement, pspnet_jax/scene_refinement.py).')
CONFIG = flags.DEFINE_string(
    'refine_config', None, "With --refine_workdir: its config, FILE.py[:VARIANT] or a .json "
    "(default: its config.json), e.g. configs/cascadepsp.py.")


def check() -> None:
  """Raises UserError for --refine_config without --refine_workdir (before any JAX import)."""
  if CONFIG.value and not WORKDIR.value:
    raise UserError('--refine_config is the config of --refine_workdir: give both')


def scene_refiner(dataset: str):
  """The `scene_refinement.SceneRefiner` the flags name (stuff classes of `dataset`, the
  segmentation config's data.name), or None without --refine_workdir."""
  if not WORKDIR.value:
    return None
  from pspnet_jax import scene_refinement  # pylint: disable=import-outside-toplevel  (JAX)
  return scene_refinement.SceneRefiner.from_workdir(WORKDIR.value, CONFIG.value,
                                                    dataset=dataset)

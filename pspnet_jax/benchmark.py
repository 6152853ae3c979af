"""Measured throughput, printed as one JSON line.

  python -m pspnet_jax.benchmark --config=configs/ade20k.py --what=forward --batch_size=1 \\
      [--torch_reference]
  python -m pspnet_jax.benchmark --config=configs/ade20k.py --what=train --batch_size=2 \\
      --config.data.crop_size=233 [--torch_reference]
  python -m pspnet_jax.benchmark --config=configs/demo.py --what=input --steps=50 \\
      [--config.data.worker_count=2]
  python -m pspnet_jax.benchmark --config=configs/ade20k.py --what=input --fake_ade20k=64 \\
      --steps=40 --batch_size=8 --semseg_reference
  python -m pspnet_jax.benchmark --config=configs/ade20k.py --what=eval --num_images=8 \\
      --batch_size=2 [--semseg_reference]
  python -m pspnet_jax.benchmark --config=configs/ade20k.py --what=compile --topology=v5e:2x4 \\
      --batch_size=16 --config.model.dtype=bfloat16 [--noplan_eval]
  python -m pspnet_jax.benchmark --config=configs/ade20k.py --what=deploy --batch_size=1
  python -m pspnet_jax.benchmark --config=configs/cascadepsp.py --what=refine \\
      --refine_size=2000x3000 --steps=1 --official_reference

`--what=forward`: the eval-mode forward of the config's model on a
crop_size x crop_size batch of `--batch_size` (default 1) images, median over
`--steps` timed calls (benchmarks/model_speed.py).

`--what=train`: the jitted training step of train.py on a mesh of all local
devices, global batch `--batch_size` (default train.batch_size); compile time,
median step time over `--steps`, FLOPs per step from XLA and MFU where the
device's peak is known (benchmarks/model_speed.py).

`--torch_reference` (forward, train) also times the PyTorch twin of the
official model (pspnet_jax/torch_reference.py, needs torch) in the same run on
the same batch; for train with semseg's training iteration.

`--what=input`: augmented images per second and per CPU second out of
`pipeline.train_batches` over `--steps` batches of `--batch_size` (default
train.batch_size) (benchmarks/input_speed.py). `--fake_ade20k=N` measures on
N ADE20K-sized pairs written and built in a temporary folder
(benchmarks/fake_ade20k.py); `--semseg_reference` then also times semseg's
way on the same files.

`--what=eval`: the slide protocol (`inference.Predictor`, the config's
eval.crop_size, base_size, scales and flip) on `--num_images` ADE20K-sized
images, `--batch_size` windows per step over all local devices (default
eval.batch_size): images/s, windows/s and windows/s per device after a
warm-up image (compilation, timed on its own) (benchmarks/eval_speed.py).
`--semseg_reference` also times semseg's tool/test.py way in the same run on
the same images and weights: the PyTorch twin, one window at a time with its
mirror, and the ratio of the two.

`--what=compile`: no measurement but a plan, on any host with libtpu
(requirements-tpu-plan.txt): the train step (global batch `--batch_size`,
default train.batch_size) and the eval step compiled ahead of time for the TPU
slice `--topology` (e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4). Per device
and per train step: memory (arguments, outputs, temporaries, peak, and whether
it fits the chip's HBM), FLOPs and bytes accessed, the roofline bound and the
MFU it allows, collective counts; the eval step's as eval_* keys
(benchmarks/compile_plan.py).

`--what=deploy`: the eval-mode forward exported to ONNX, TF SavedModel and
TFLite and run by ONNX Runtime, TensorFlow and the TFLite interpreter beside
the jitted JAX forward, `--batch_size` (default 1) crop_size x crop_size
images, median over `--steps` calls, with each format's logit difference
from JAX (benchmarks/deploy_speed.py).

`--what=refine`: CascadePSP's `Refiner.refine` of one `--refine_size` image
(random pixels, an elliptic mask) at config.refine.L, fast and full, median
over `--steps` calls after a warm-up call, with the number of local patches;
`--official_reference` also times the official segmentation-refinement code
(torch, CPU) on the same image, mask and weights (benchmarks/refine_speed.py).

Every row also says how busy the machine was (`load_average_before`, `_after`).
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from pspnet_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_WHAT = flags.DEFINE_enum('what', 'forward',
                          ['forward', 'train', 'input', 'eval', 'compile', 'deploy', 'refine'],
                          'What to measure (compile: plan for --topology).')
_BATCH = flags.DEFINE_integer(
    'batch_size', None, 'Images per call (forward, default 1), global batch per step (train, '
    'input, compile; default config.train.batch_size) or windows per step over all devices '
    '(eval, default config.eval.batch_size).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed calls, steps or batches after the warm-up '
                              '(forward, train, input).')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 8, 'eval: ADE20K-sized images timed after the '
                                   'warm-up image.')
_TORCH = flags.DEFINE_bool('torch_reference', False,
                           'Also time the PyTorch twin (forward and train).')
_FAKE_ADE = flags.DEFINE_integer(
    'fake_ade20k', 0, 'input: write this many ADE20K-sized JPEG/PNG pairs in the official '
    'layout to a temporary folder, build them with the ADE20K builder and measure on them.')
_SEMSEG_REFERENCE = flags.DEFINE_bool(
    'semseg_reference', False, 'input with --fake_ade20k, eval: also time the semseg way on the '
    'same files (input: cv2.imread and the same augmentation per sample in a Python for loop) '
    'or images (eval: tool/test.py with the PyTorch twin, one window and its mirror at a time).')
_TOPOLOGY = flags.DEFINE_string('topology', None, 'compile: the TPU slice to compile for, '
                                '<chip>:<shape> as v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4.')
_PLAN_EVAL = flags.DEFINE_bool('plan_eval', True, 'compile: also compile the eval step.')
_REFINE_SIZE = flags.DEFINE_string('refine_size', '2000x3000', 'refine: HEIGHTxWIDTH of the image.')
_OFFICIAL_REFERENCE = flags.DEFINE_bool(
    'official_reference', False, 'refine: also time the official CascadePSP code '
    '(segmentation-refinement, requirements-reference.txt) on the same image and weights.')


def _measure(what: str, config, batch_size: int, steps: int) -> dict:
  """The measurement of --what. Imported here so that --help and flag or config errors do not
  pay for importing JAX, TF and torch."""
  # pylint: disable=import-outside-toplevel
  from pspnet_jax.benchmarks import (compile_plan, deploy_speed, eval_speed, input_speed,
                                     model_speed, refine_speed)
  # pylint: enable=import-outside-toplevel
  if what == 'forward':
    return model_speed.measure_forward(config, batch_size, steps, torch_reference=_TORCH.value)
  if what == 'train':
    return model_speed.measure_train(config, batch_size, steps, torch_reference=_TORCH.value)
  if what == 'input':
    return input_speed.measure_input(config, batch_size, steps, fake_ade20k=_FAKE_ADE.value,
                                     semseg_reference=_SEMSEG_REFERENCE.value)
  if what == 'eval':
    return eval_speed.measure_eval(config, batch_size, _NUM_IMAGES.value,
                                   semseg_reference=_SEMSEG_REFERENCE.value)
  if what == 'compile':
    return compile_plan.plan(config, _TOPOLOGY.value, batch_size, eval_step=_PLAN_EVAL.value)
  if what == 'refine':
    height, _, width = _REFINE_SIZE.value.partition('x')
    return refine_speed.measure_refine(config, int(height), int(width), steps,
                                       official_reference=_OFFICIAL_REFERENCE.value)
  return deploy_speed.measure_deploy(config, batch_size, steps)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if _TORCH.value and _WHAT.value in ('input', 'eval'):
    raise app.UsageError('--torch_reference applies to --what=forward and --what=train '
                         '(eval: --semseg_reference)')
  if _WHAT.value == 'input' and _SEMSEG_REFERENCE.value and not _FAKE_ADE.value:
    raise app.UsageError('--semseg_reference needs --fake_ade20k (the files to read)')
  if (_WHAT.value == 'compile') != bool(_TOPOLOGY.value):
    raise app.UsageError('--topology goes with --what=compile, and --what=compile needs it')
  import jax  # pylint: disable=import-outside-toplevel
  from pspnet_jax import configuration  # pylint: disable=import-outside-toplevel
  configuration.validate(config)
  if _WHAT.value == 'compile' and not jax.config.jax_platforms:
    # Planning runs nothing: with libtpu installed, JAX would otherwise look for
    # TPU chips on this host (and warn) before it settles on the CPU.
    jax.config.update('jax_platforms', 'cpu')
  batch_size = _BATCH.value
  if batch_size is None:
    if _WHAT.value in ('forward', 'deploy'):
      batch_size = 1
    elif _WHAT.value == 'eval':
      batch_size = config.eval.batch_size
    else:
      batch_size = config.train.batch_size
  # Other work on the machine can stall PyTorch's OpenMP threads (on a loaded
  # 2-core VM its forward ran 30x slower on 2 threads than on 1), so every row
  # says how busy the machine was.
  load = os.getloadavg()[0]
  result = _measure(_WHAT.value, config, batch_size, _STEPS.value)
  # An eval run takes minutes, long enough for the others' work to come or go.
  print(json.dumps({**result, 'load_average_before': round(load, 2),
                    'load_average_after': round(os.getloadavg()[0], 2)}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main, keep_onednn=True)   # --what=deploy times TensorFlow as users run it

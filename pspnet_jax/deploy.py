"""Deployable exports of the eval-mode model: `jax.export`, ONNX, TF SavedModel, LiteRT (TFLite).

One contract for every format: input `images`, float32, NHWC, RGB normalized
with the config's mean and std, H and W = 8k+1 (any H and W of the mmseg
architecture, `model.align_corners=False`); output `logits`, float32, NHWC
at the input size (`serving_function` has the alternatives: uint8 input,
class map, NCHW). The graph is the eval-mode model only (running statistics,
no dropout, no aux head). The batch is symbolic everywhere.

- `jax`: `jax.export` of the forward with the weights inside, serialized
  StableHLO for CPU, CUDA and TPU, for any H = 8h+1 and W = 8w+1 (h, w >= 4;
  the mmseg architecture: any H, W >= 33; symbolic: the resize and pooling maps
  are computed in the graph from the sizes) unless a size is given.
  `load_jax(path)` gives a callable; it needs jax only, not this project:
  `jax.export.deserialize(data).call(images)`.
  The other formats fix H x W at export (`size`, default the config's crop):
  their resize and pooling maps are constant matrices for that size, which
  every runtime runs as plain matrix products.
- `onnx`, `savedmodel`, `tflite`: the forward's jaxpr re-expressed in ONNX
  (opset ONNX_OPSET, for ONNX Runtime) or TensorFlow operators
  (`graph_export`), each BatchNorm folded into its convolution. The SavedModel
  has the signature `serving_default` (images -> {'logits'}); the TFLite
  flatbuffer is converted from it with builtin operators only, optionally with
  float16 weights. ONNX needs the `onnx` package (requirements-export.txt);
  TensorFlow is already a dependency (TFDS). Training imports none of this.

A file appears only once complete (`weights.write_atomically`), a SavedModel
directory likewise (`_write_directory`).
"""

import functools
import os
import shutil
import uuid
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pspnet_jax import checkpoint, graph_export, paths, weights
from pspnet_jax.data import transforms

EXPORT_FORMATS = ('jax', 'onnx', 'savedmodel', 'tflite')
ONNX_OPSET = 17
# The platforms a `jax` export runs on.
JAX_PLATFORMS = ('cpu', 'cuda', 'tpu')
_INSTALL_HINT = 'pip install -r requirements-export.txt (onnx, onnxruntime)'


class Serving(NamedTuple):
  """What an export runs: `fn` of images as `input_spec` describes them -> the output named
  `output` ('logits' (N, H, W, classes) float32, or 'classes' (N, H, W) int32; channels
  first with `channels_first`)."""
  fn: Callable
  input_dtype: np.dtype
  channels_first: bool
  output: str

  def input_spec(self, size: tuple[int, int], batch) -> jax.ShapeDtypeStruct:
    shape = (batch, 3, *size) if self.channels_first else (batch, *size, 3)
    return jax.ShapeDtypeStruct(shape, self.input_dtype)


def serving_function(model: nnx.Module, *, uint8_input: bool = False, class_map: bool = False,
                     channels_first: bool = False, mean=None, std=None) -> Serving:
  """The eval-mode `model` as an export runs it, its weights as constants.

  Default (the contract): images (N, H, W, 3) float32 normalized RGB -> logits
  (N, H, W, classes) float32. Alternatives: `uint8_input`, raw RGB 0-255 that
  the graph normalizes with `mean` and `std` (the config's data.mean / data.std);
  `class_map`, the argmax class per pixel (int32) instead of the logits;
  `channels_first`, NCHW images and logits (N, classes, H, W).
  """
  if not model.cls.block.bn.use_running_average:
    raise ValueError('export takes the eval-mode model: call model.eval() first')
  if uint8_input and (mean is None or std is None):
    raise ValueError('uint8 input needs the mean and std to normalize with')
  graphdef, variables, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)
  # On the host: a checkpoint restores them sharded over every device, an export is one graph.
  variables = jax.tree.map(np.asarray, variables)

  def forward(images):
    if channels_first:
      images = jnp.transpose(images, (0, 2, 3, 1))
    if uint8_input:
      images = (images.astype(jnp.float32) - np.asarray(mean, np.float32)) / np.asarray(
          std, np.float32)
    logits = nnx.merge(graphdef, variables, rest)(images).astype(jnp.float32)
    if class_map:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jnp.transpose(logits, (0, 3, 1, 2)) if channels_first else logits

  return Serving(forward, np.dtype(np.uint8 if uint8_input else np.float32), channels_first,
                 'classes' if class_map else 'logits')


def export_size(config, size) -> tuple[int, int]:
  """(H, W) of a static export: `size` (an int, or (H, W)) or the config's crop; at least 33
  each, and 8k+1 unless the model resizes to any input size (model.align_corners=False)."""
  if size is None:
    size = transforms.crop_shape(config.data)
  height, width = (size, size) if isinstance(size, int) else tuple(size)
  any_size = not config.model.align_corners
  for side in (height, width):
    if side < 33 or (side - 1) % 8 and not any_size:
      raise ValueError(f'export size {height}x{width}: H and W must be 8k+1 and at least 33 '
                       '(e.g. 473, 513, 713), as the model takes them')
  return height, width


def export_jax(serving: Serving, path: str, size: tuple[int, int] | None, *,
               any_size: bool = False, overwrite: bool = False) -> None:
  """Serialized `jax.export` of `serving` for JAX_PLATFORMS with a symbolic batch, at size
  (H, W), or with `size` None at any H = 8h+1, W = 8w+1 of at least 33 (symbolic h and w;
  `any_size`: any H, W of at least 33)."""
  if size is None and any_size:
    batch, *size = jax.export.symbolic_shape('batch, h, w', constraints=('h >= 33', 'w >= 33'))
  elif size is None:
    batch, h, w = jax.export.symbolic_shape('batch, h, w', constraints=('h >= 4', 'w >= 4'))
    size = (8 * h + 1, 8 * w + 1)
  else:
    batch, = jax.export.symbolic_shape('batch')
  exported = jax.export.export(jax.jit(serving.fn), platforms=JAX_PLATFORMS)(
      serving.input_spec(size, batch))
  _write_bytes(path, exported.serialize(), overwrite=overwrite)


def _write_bytes(path: str, data: bytes, *, overwrite: bool) -> None:
  def write(target):
    with open(target, 'wb') as file:
      file.write(data)

  weights.write_atomically(path, write, overwrite=overwrite)


def load_jax(path: str):
  """The callable of a `jax` export (images -> its output), on the default backend."""
  with open(path, 'rb') as file:
    return jax.export.deserialize(bytearray(file.read())).call


def _import_onnx():
  try:
    import onnx  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(f'the onnx format needs the onnx package: {_INSTALL_HINT}') from error
  return onnx


# The batch the forward is traced at. Not 1: at batch 1 jnp.einsum drops the size-1 axis, and
# the translated graph would be specialized to it. The translated graphs keep the batch symbolic.
_TRACE_BATCH = 2


def _jaxpr(serving: Serving, size):
  closed = jax.make_jaxpr(serving.fn)(serving.input_spec(size, _TRACE_BATCH))
  return closed.jaxpr, [np.asarray(const) for const in closed.consts]


def onnx_model(serving: Serving, size: tuple[int, int]):
  """The ONNX ModelProto of `serving` at size (H, W), symbolic batch."""
  onnx = _import_onnx()
  jaxpr, consts = _jaxpr(serving, size)
  backend = graph_export.OnnxBackend(onnx)
  translator = graph_export.Translator(backend, _TRACE_BATCH)
  output, = translator.run(jaxpr, ['images'], consts)
  backend.node('Identity', [translator.value(output)], serving.output)

  def tensor(name, aval):
    return onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype)),
        ['batch', *aval.shape[1:]])

  proto = onnx.helper.make_model(
      onnx.helper.make_graph(
          backend.nodes, 'pspnet', [tensor('images', jaxpr.invars[0].aval)],
          [tensor(serving.output, jaxpr.outvars[0].aval)], backend.initializers),
      opset_imports=[onnx.helper.make_opsetid('', ONNX_OPSET)], producer_name='pspnet_jax')
  onnx.checker.check_model(proto, full_check=True)
  return proto


def export_onnx(serving: Serving, path: str, size: tuple[int, int], *,
                overwrite: bool = False) -> None:
  proto = onnx_model(serving, size)
  weights.write_atomically(path, functools.partial(_import_onnx().save_model, proto),
                           overwrite=overwrite)


def tensorflow_module(serving: Serving, size: tuple[int, int]):
  """A tf.Module whose `serve(images)` ({serving.output: ...}, symbolic batch) is `serving`
  in TF operators, the weights as constants of the graph."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  jaxpr, consts = _jaxpr(serving, size)
  spec = serving.input_spec(size, None)

  class ServingModule(tf.Module):

    @tf.function(input_signature=[tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype),
                                                name='images')])
    def serve(self, images):
      translator = graph_export.Translator(graph_export.TensorflowBackend(tf), _TRACE_BATCH)
      output, = translator.run(jaxpr, [images], consts)
      return {serving.output: tf.identity(translator.value(output), name=serving.output)}

  return ServingModule()


def _write_directory(path: str, write, *, overwrite: bool) -> None:
  """`write(directory)` into a hidden sibling, then moved onto `path` (a local directory)."""
  weights.refuse_existing(path, overwrite)
  parent, name = os.path.split(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  # Not tempfile.mkdtemp: its directory is private (0700); this one follows the umask.
  staging = os.path.join(parent, f'.{name}.tmp-{uuid.uuid4().hex[:8]}')
  os.makedirs(staging)
  try:
    write(staging)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)  # overwrite: the old directory goes just before the new one moves in
    elif os.path.lexists(path):
      os.remove(path)
    os.replace(staging, path)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def export_savedmodel(serving: Serving, path: str, size: tuple[int, int], *,
                      overwrite: bool = False) -> None:
  """A TF SavedModel directory with the `serving_default` signature images -> logits."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if paths.is_remote(path):
    raise ValueError(f'{path}: write a SavedModel to a local directory and copy it up')
  module = tensorflow_module(serving, size)
  _write_directory(path, lambda target: tf.saved_model.save(
      module, target, signatures={'serving_default': module.serve}), overwrite=overwrite)


def tflite_model(serving: Serving, size: tuple[int, int], *,
                 float16_weights: bool = False) -> bytes:
  """The LiteRT (TFLite) flatbuffer of `serving`: builtin operators only, symbolic batch;
  `float16_weights` stores the weights as float16 (computed in float32)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  module = tensorflow_module(serving, size)
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [module.serve.get_concrete_function()], module)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if float16_weights:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  return converter.convert()


def export_tflite(serving: Serving, path: str, size: tuple[int, int], *,
                  overwrite: bool = False, float16_weights: bool = False) -> None:
  _write_bytes(path, tflite_model(serving, size, float16_weights=float16_weights),
               overwrite=overwrite)


_EXPORTERS = {'jax': export_jax, 'onnx': export_onnx, 'savedmodel': export_savedmodel,
              'tflite': export_tflite}


def export_model(config, workdir: str, path: str, fmt: str, step: int | None = None, *,
                 size=None, float16_weights: bool = False, uint8_input: bool = False,
                 class_map: bool = False, channels_first: bool = False,
                 overwrite: bool = False) -> int:
  """Writes checkpoint `step` (default latest) of `workdir` as a deployable `fmt` model at
  `size` (default the config's crop) to `path`; returns the step. `float16_weights`: tflite
  only; `uint8_input`, `class_map`, `channels_first`: `serving_function`."""
  if float16_weights and fmt != 'tflite':
    raise ValueError(f'float16 weights are a tflite option, not {fmt}')
  if fmt not in _EXPORTERS:
    raise ValueError(f'format {fmt!r} is not a deployable export; use one of {EXPORT_FORMATS}')
  # The jax format takes any 8k+1 size unless one is given; the others need one.
  size = None if fmt == 'jax' and size is None else export_size(config, size)
  weights.refuse_existing(path, overwrite)
  if fmt == 'onnx':
    _import_onnx()  # the install hint before the restore
  loaded = checkpoint.load_model(config, workdir, step)
  serving = serving_function(loaded.model, uint8_input=uint8_input, class_map=class_map,
                             channels_first=channels_first, mean=tuple(config.data.mean),
                             std=tuple(config.data.std))
  options = ({'float16_weights': float16_weights} if fmt == 'tflite' else
             {'any_size': not config.model.align_corners} if fmt == 'jax' else {})
  _EXPORTERS[fmt](serving, path, size, overwrite=overwrite, **options)
  return loaded.step

"""Deployable exports of the eval-mode model: `jax.export`, ONNX, TF SavedModel, LiteRT (TFLite).

One contract for every format: input `images`, float32, NHWC, RGB normalized
with the config's mean and std, H and W = 8k+1; output `logits`, float32, NHWC
at the input size. The graph is the eval-mode model only (running statistics,
no dropout, no aux head). The batch is symbolic; H and W are fixed at export
(`size`, default the config's crop): the resize and pooling maps are matrices
built for static sizes (`models.layers`), which is also what lets every
runtime run them as plain matrix products.

- `jax`: `jax.export` of the forward with the weights inside, serialized
  StableHLO for CPU, CUDA and TPU. `load_jax(path)` gives a callable; it needs
  jax only, not this project: `jax.export.deserialize(data).call(images)`.
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
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pspnet_jax import checkpoint, graph_export, paths, weights

EXPORT_FORMATS = ('jax', 'onnx', 'savedmodel', 'tflite')
ONNX_OPSET = 17
# The platforms a `jax` export runs on.
JAX_PLATFORMS = ('cpu', 'cuda', 'tpu')
_INSTALL_HINT = 'pip install -r requirements-export.txt (onnx, onnxruntime)'


def serving_function(model: nnx.Module):
  """images (N, H, W, 3) float32 normalized RGB -> logits (N, H, W, classes) float32, with the
  eval-mode `model`'s weights as constants."""
  if not model.cls.block.bn.use_running_average:
    raise ValueError('export takes the eval-mode model: call model.eval() first')
  graphdef, variables, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)
  # On the host: a checkpoint restores them sharded over every device, an export is one graph.
  variables = jax.tree.map(np.asarray, variables)

  def forward(images):
    return nnx.merge(graphdef, variables, rest)(images).astype(jnp.float32)

  return forward


def export_size(config, size) -> tuple[int, int]:
  """(H, W) of a static export: `size` (an int, or (H, W)) or the config's crop; 8k+1 each."""
  if size is None:
    size = config.data.crop_size
  height, width = (size, size) if isinstance(size, int) else tuple(size)
  for side in (height, width):
    if side < 33 or (side - 1) % 8:
      raise ValueError(f'export size {height}x{width}: H and W must be 8k+1 and at least 33 '
                       '(e.g. 473, 513, 713), as the model takes them')
  return height, width


def _images_spec(height: int, width: int, batch):
  return jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)


def export_jax(forward, path: str, size: tuple[int, int], *, overwrite: bool = False,
               **unused) -> None:
  """Serialized `jax.export` of `forward` for JAX_PLATFORMS, symbolic batch, size (H, W)."""
  del unused
  batch, = jax.export.symbolic_shape('batch')
  exported = jax.export.export(jax.jit(forward), platforms=JAX_PLATFORMS)(
      _images_spec(*size, batch))
  data = exported.serialize()

  def write(target):
    with open(target, 'wb') as file:
      file.write(data)

  weights.write_atomically(path, write, overwrite=overwrite)


def load_jax(path: str):
  """The callable of a `jax` export: images (N, H, W, 3) -> logits, on the default backend."""
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


def _jaxpr(forward, size):
  closed = jax.make_jaxpr(forward)(_images_spec(*size, _TRACE_BATCH))
  return closed.jaxpr, [np.asarray(const) for const in closed.consts]


def onnx_model(forward, size: tuple[int, int]):
  """The ONNX ModelProto of `forward` (`serving_function`) at size (H, W), symbolic batch."""
  onnx = _import_onnx()
  jaxpr, consts = _jaxpr(forward, size)
  backend = graph_export.OnnxBackend(onnx)
  translator = graph_export.Translator(backend, _TRACE_BATCH)
  logits, = translator.run(jaxpr, ['images'], consts)
  backend.node('Identity', [translator.value(logits)], 'logits')
  classes = jaxpr.outvars[0].aval.shape[-1]
  tensor = onnx.helper.make_tensor_value_info
  proto = onnx.helper.make_model(
      onnx.helper.make_graph(
          backend.nodes, 'pspnet',
          [tensor('images', onnx.TensorProto.FLOAT, ['batch', *size, 3])],
          [tensor('logits', onnx.TensorProto.FLOAT, ['batch', *size, classes])],
          backend.initializers),
      opset_imports=[onnx.helper.make_opsetid('', ONNX_OPSET)], producer_name='pspnet_jax')
  onnx.checker.check_model(proto, full_check=True)
  return proto


def export_onnx(forward, path: str, size: tuple[int, int], *, overwrite: bool = False,
                **unused) -> None:
  del unused
  proto = onnx_model(forward, size)
  weights.write_atomically(path, functools.partial(_import_onnx().save_model, proto),
                           overwrite=overwrite)


def tensorflow_module(forward, size: tuple[int, int]):
  """A tf.Module whose `serve(images)` ({'logits': ...}, symbolic batch) is `forward` in TF
  operators, the weights as constants of the graph."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  jaxpr, consts = _jaxpr(forward, size)

  class Serving(tf.Module):

    @tf.function(input_signature=[tf.TensorSpec([None, *size, 3], tf.float32, name='images')])
    def serve(self, images):
      translator = graph_export.Translator(graph_export.TensorflowBackend(tf), _TRACE_BATCH)
      logits, = translator.run(jaxpr, [images], consts)
      return {'logits': tf.identity(translator.value(logits), name='logits')}

  return Serving()


def _write_directory(path: str, write, *, overwrite: bool) -> None:
  """`write(directory)` into a hidden sibling, then moved onto `path` (a local directory)."""
  weights.refuse_existing(path, overwrite)
  parent, name = os.path.split(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{name}.tmp-', dir=parent)
  try:
    write(staging)
    if os.path.lexists(path):
      shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    os.replace(staging, path)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def export_savedmodel(forward, path: str, size: tuple[int, int], *, overwrite: bool = False,
                      **unused) -> None:
  """A TF SavedModel directory with the `serving_default` signature images -> logits."""
  del unused
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if paths.is_remote(path):
    raise ValueError(f'{path}: write a SavedModel to a local directory and copy it up')
  module = tensorflow_module(forward, size)
  _write_directory(path, lambda target: tf.saved_model.save(
      module, target, signatures={'serving_default': module.serve}), overwrite=overwrite)


def tflite_model(forward, size: tuple[int, int], *, float16_weights: bool = False) -> bytes:
  """The LiteRT (TFLite) flatbuffer of `forward`: builtin operators only, symbolic batch;
  `float16_weights` stores the weights as float16 (computed in float32)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  module = tensorflow_module(forward, size)
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [module.serve.get_concrete_function()], module)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if float16_weights:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  return converter.convert()


def export_tflite(forward, path: str, size: tuple[int, int], *, overwrite: bool = False,
                  float16_weights: bool = False) -> None:
  data = tflite_model(forward, size, float16_weights=float16_weights)

  def write(target):
    with open(target, 'wb') as file:
      file.write(data)

  weights.write_atomically(path, write, overwrite=overwrite)


_EXPORTERS = {'jax': export_jax, 'onnx': export_onnx, 'savedmodel': export_savedmodel,
              'tflite': export_tflite}


def export_model(config, workdir: str, path: str, fmt: str, step: int | None = None, *,
                 size=None, float16_weights: bool = False, overwrite: bool = False) -> int:
  """Writes checkpoint `step` (default latest) of `workdir` as a deployable `fmt` model at
  `size` (default the config's crop) to `path`; returns the step. `float16_weights`: tflite
  only."""
  if float16_weights and fmt != 'tflite':
    raise ValueError(f'float16 weights are a tflite option, not {fmt}')
  if fmt not in _EXPORTERS:
    raise ValueError(f'format {fmt!r} is not a deployable export; use one of {EXPORT_FORMATS}')
  size = export_size(config, size)
  weights.refuse_existing(path, overwrite)
  if fmt == 'onnx':
    _import_onnx()  # the install hint before the restore
  loaded = checkpoint.load_model(config, workdir, step)
  _EXPORTERS[fmt](serving_function(loaded.model), path, size, overwrite=overwrite,
                  float16_weights=float16_weights)
  return loaded.step

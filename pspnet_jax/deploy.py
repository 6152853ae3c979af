"""Deployable exports of the eval-mode model: `jax.export` (StableHLO) and ONNX.

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
- `onnx`: the forward's jaxpr translated to ONNX operators (`_OnnxGraph`), the
  BatchNorm of each convolution folded into its weights and bias; runs on ONNX
  Runtime. Needs the `onnx` package (requirements-export.txt); training never
  imports it.

The file appears only once complete (`weights.write_atomically`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pspnet_jax import checkpoint, weights

EXPORT_FORMATS = ('jax', 'onnx')
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


def export_jax(forward, path: str, size: tuple[int, int], *, overwrite: bool = False) -> None:
  """Serialized `jax.export` of `forward` for JAX_PLATFORMS, symbolic batch, size (H, W)."""
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


class _PendingConv:
  """A convolution not yet written, so that the per-channel affine after it (BatchNorm in eval
  mode: subtract, multiply, add constants) can go into its kernel and bias."""

  def __init__(self, source: str, kernel: np.ndarray, attributes: dict):
    self.source = source
    self.kernel = kernel.astype(np.float64)  # OIHW
    self.bias = np.zeros(kernel.shape[0], np.float64)
    self.attributes = attributes
    self.written = None  # its output's name, once written

  def fold(self, primitive: str, constant: np.ndarray, conv_first: bool) -> bool:
    """Takes `conv op constant` into the weights when the constant is per output channel."""
    channels = self.kernel.shape[0]
    if not conv_first or constant.size not in (1, channels) or (
        constant.ndim and constant.shape[-1] != constant.size):
      return False
    values = np.broadcast_to(np.asarray(constant, np.float64).reshape(-1), (channels,))
    if primitive == 'add':
      self.bias = self.bias + values
    elif primitive == 'sub':
      self.bias = self.bias - values
    elif primitive == 'mul':
      self.kernel = self.kernel * values[:, None, None, None]
      self.bias = self.bias * values
    else:
      return False
    return True


class _OnnxGraph:
  """Translates a jaxpr of the eval-mode forward into ONNX nodes (NHWC between convolutions).

  Constant subexpressions (the weights and what is computed from them) are
  evaluated here; call-like primitives (jit, custom_jvp_call) are inlined;
  each convolution's following per-channel affine is folded into it. A
  primitive without a translation fails with its name.
  """

  def __init__(self, onnx):
    self.onnx = onnx
    self.helper = onnx.helper
    self.nodes, self.initializers = [], []
    self._names = 0

  def name(self, hint: str) -> str:
    self._names += 1
    return f'{hint}_{self._names}'

  def constant(self, value: np.ndarray, hint: str = 'const') -> str:
    name = self.name(hint)
    self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
    return name

  def node(self, op: str, inputs: list, hint: str | None = None, **attributes) -> str:
    output = self.name(hint or op.lower())
    self.nodes.append(self.helper.make_node(op, inputs, [output], **attributes))
    return output

  def materialize(self, value) -> str:
    """The ONNX name of a translated value (writing a pending convolution, a constant)."""
    if isinstance(value, str):
      return value
    if isinstance(value, _PendingConv):
      if value.written is not None:
        return value.written
      nchw = self.node('Transpose', [value.source], perm=[0, 3, 1, 2])
      conv = self.node('Conv', [nchw, self.constant(value.kernel.astype(np.float32), 'kernel'),
                                self.constant(value.bias.astype(np.float32), 'bias')],
                       **value.attributes)
      value.written = self.node('Transpose', [conv], perm=[0, 2, 3, 1])
      return value.written
    return self.constant(value)

  def run(self, jaxpr, inputs: list, consts: list) -> list:
    env = {}
    uses = {}
    for eqn in jaxpr.eqns:
      for var in eqn.invars:
        if not isinstance(var, jax.extend.core.Literal):
          uses[var] = uses.get(var, 0) + 1
    for var in jaxpr.outvars:
      if not isinstance(var, jax.extend.core.Literal):
        uses[var] = uses.get(var, 0) + 1

    def read(var):
      return np.asarray(var.val) if isinstance(var, jax.extend.core.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, inputs))
    for eqn in jaxpr.eqns:
      args = [read(var) for var in eqn.invars]
      single_use = [not isinstance(var, jax.extend.core.Literal) and uses[var] == 1
                    for var in eqn.invars]
      outputs = self.equation(eqn, args, single_use)
      env.update(zip(eqn.outvars, outputs))
    return [read(var) for var in jaxpr.outvars]

  def equation(self, eqn, args: list, single_use: list) -> list:
    primitive, params = eqn.primitive.name, eqn.params
    if all(isinstance(arg, np.ndarray) for arg in args) and primitive not in _CALLS:
      # Weights and what is computed from them only: evaluated now, a constant in the graph.
      results = eqn.primitive.bind(*[jnp.asarray(arg) for arg in args], **params)
      results = results if eqn.primitive.multiple_results else [results]
      return [np.asarray(result) for result in results]
    if primitive in _CALLS:
      closed = params[_CALLS[primitive]]
      inner = closed.jaxpr if hasattr(closed, 'jaxpr') else closed
      consts = list(getattr(closed, 'consts', []))
      return self.run(inner, args, [np.asarray(c) for c in consts])
    handler = getattr(self, '_' + primitive, None)
    if handler is None:
      raise NotImplementedError(f'ONNX export: no translation for the JAX primitive '
                                f'{primitive!r}')
    return [handler(eqn, args, single_use)]

  # One method per primitive of the forward, named after it.

  def _conv_general_dilated(self, eqn, args, single_use):
    params = eqn.params
    lhs, rhs = args
    numbers = params['dimension_numbers']
    if (not isinstance(rhs, np.ndarray) or tuple(numbers.lhs_spec) != (0, 3, 1, 2)
        or tuple(numbers.rhs_spec) != (3, 2, 0, 1) or tuple(numbers.out_spec) != (0, 3, 1, 2)
        or params['feature_group_count'] != 1 or params['batch_group_count'] != 1
        or tuple(params['lhs_dilation']) != (1, 1)):
      raise NotImplementedError(f'ONNX export: convolution {numbers} not supported')
    (top, bottom), (left, right) = params['padding']
    attributes = {'strides': list(params['window_strides']),
                  'dilations': list(params['rhs_dilation']),
                  'pads': [top, left, bottom, right],
                  'kernel_shape': list(rhs.shape[:2])}
    return _PendingConv(self.materialize(lhs), np.transpose(rhs, (3, 2, 0, 1)), attributes)

  def _elementwise(self, op: str, eqn, args, single_use):
    lhs, rhs = args
    if isinstance(lhs, _PendingConv) and isinstance(rhs, np.ndarray) and single_use[0]:
      if lhs.fold(eqn.primitive.name, rhs, conv_first=True):
        return lhs
    if isinstance(rhs, _PendingConv) and isinstance(lhs, np.ndarray) and single_use[1] \
        and eqn.primitive.name in ('add', 'mul'):
      if rhs.fold(eqn.primitive.name, lhs, conv_first=True):
        return rhs
    return self.node(op, [self.materialize(lhs), self.materialize(rhs)])

  def _add(self, eqn, args, single_use):
    return self._elementwise('Add', eqn, args, single_use)

  def _sub(self, eqn, args, single_use):
    return self._elementwise('Sub', eqn, args, single_use)

  def _mul(self, eqn, args, single_use):
    return self._elementwise('Mul', eqn, args, single_use)

  def _max(self, eqn, args, single_use):
    lhs, rhs = args
    if isinstance(rhs, np.ndarray) and rhs.size == 1 and float(rhs) == 0.0:
      return self.node('Relu', [self.materialize(lhs)])
    return self.node('Max', [self.materialize(lhs), self.materialize(rhs)])

  def _reduce_window_max(self, eqn, args, single_use):
    params = eqn.params
    dimensions, strides = params['window_dimensions'], params['window_strides']
    padding = params['padding']
    if (dimensions[0], dimensions[3], strides[0], strides[3]) != (1, 1, 1, 1) or any(
        padding[axis] != (0, 0) for axis in (0, 3)):
      raise NotImplementedError('ONNX export: max-pool over batch or channels')
    nchw = self.node('Transpose', [self.materialize(args[0])], perm=[0, 3, 1, 2])
    pooled = self.node('MaxPool', [nchw], kernel_shape=list(dimensions[1:3]),
                       strides=list(strides[1:3]),
                       pads=[padding[1][0], padding[2][0], padding[1][1], padding[2][1]])
    return self.node('Transpose', [pooled], perm=[0, 2, 3, 1])

  def _dot_general(self, eqn, args, single_use):
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params['dimension_numbers']
    lhs_rank, rhs_rank = (var.aval.ndim for var in eqn.invars)
    lhs, rhs = args
    if (isinstance(rhs, np.ndarray) and lhs_rank == 4 and rhs_rank == 2
        and tuple(lhs_contract) == (3,) and tuple(rhs_contract) == (0,) and not lhs_batch):
      # A 1x1 convolution computed as a product (`layers._conv_or_dot`): a Conv again, so that
      # its BatchNorm folds in.
      return _PendingConv(self.materialize(lhs), np.transpose(rhs)[:, :, None, None],
                          {'kernel_shape': [1, 1], 'strides': [1, 1], 'dilations': [1, 1],
                           'pads': [0, 0, 0, 0]})
    letters = iter('abcdefghijklmnopqrstuvwxyz')
    lhs_labels = [next(letters) for _ in range(lhs_rank)]
    rhs_labels = [next(letters) for _ in range(rhs_rank)]
    for lhs_axis, rhs_axis in zip((*lhs_contract, *lhs_batch), (*rhs_contract, *rhs_batch)):
      rhs_labels[rhs_axis] = lhs_labels[lhs_axis]
    # dot_general's output: batch axes, then lhs free axes, then rhs free axes.
    out = ([lhs_labels[axis] for axis in lhs_batch]
           + [label for axis, label in enumerate(lhs_labels)
              if axis not in lhs_contract and axis not in lhs_batch]
           + [label for axis, label in enumerate(rhs_labels)
              if axis not in rhs_contract and axis not in rhs_batch])
    equation = f'{"".join(lhs_labels)},{"".join(rhs_labels)}->{"".join(out)}'
    operands = [self.materialize(arg if not isinstance(arg, np.ndarray)
                                 else arg.astype(np.float32)) for arg in args]
    return self.node('Einsum', operands, equation=equation)

  def _transpose(self, eqn, args, single_use):
    return self.node('Transpose', [self.materialize(args[0])],
                     perm=list(eqn.params['permutation']))

  def _concatenate(self, eqn, args, single_use):
    return self.node('Concat', [self.materialize(arg) for arg in args],
                     axis=eqn.params['dimension'])

  def _slice(self, eqn, args, single_use):
    params = eqn.params
    shape = eqn.invars[0].aval.shape
    steps = params['strides'] or (1,) * len(shape)
    # Only the axes the slice cuts: the batch axis (symbolic in the graph) stays whole.
    cuts = [(axis, start, limit, step) for axis, (start, limit, step, size) in enumerate(
        zip(params['start_indices'], params['limit_indices'], steps, shape))
            if (start, limit, step) != (0, size, 1)]
    if not cuts:
      return self.materialize(args[0])
    if any(axis == 0 for axis, *_ in cuts):
      raise NotImplementedError('ONNX export: a slice of the batch axis')
    as_input = lambda values: self.constant(np.asarray(values, np.int64), 'slice')
    axes, starts, limits, steps = zip(*cuts)
    return self.node('Slice', [self.materialize(args[0]), as_input(starts), as_input(limits),
                               as_input(axes), as_input(steps)])

  def _squeeze(self, eqn, args, single_use):
    axes = self.constant(np.asarray(eqn.params['dimensions'], np.int64), 'axes')
    return self.node('Squeeze', [self.materialize(args[0]), axes])

  def _reshape(self, eqn, args, single_use):
    old_shape, new_shape = eqn.invars[0].aval.shape, eqn.params['new_sizes']
    # The batch is symbolic in the graph: 0 copies the input's leading dimension.
    target = [0 if axis == 0 and old_shape[0] == size == _TRACE_BATCH else size
              for axis, size in enumerate(new_shape)]
    return self.node('Reshape', [self.materialize(args[0]),
                                 self.constant(np.asarray(target, np.int64), 'shape')])

  def _convert_element_type(self, eqn, args, single_use):
    target = self.helper.np_dtype_to_tensor_dtype(np.dtype(eqn.params['new_dtype']))
    return self.node('Cast', [self.materialize(args[0])], to=target)


# Call-like primitives, inlined: the parameter that holds the inner jaxpr.
_CALLS = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'custom_jvp_call': 'call_jaxpr',
          'closed_call': 'call_jaxpr'}


_TRACE_BATCH = 2


def onnx_model(forward, size: tuple[int, int]):
  """The ONNX ModelProto of `forward` (`serving_function`) at size (H, W), symbolic batch."""
  onnx = _import_onnx()
  # Traced at batch 2: at batch 1 jnp.einsum drops the size-1 axis and the graph would be
  # specialized to it; the graph's batch is symbolic either way.
  closed = jax.make_jaxpr(forward)(_images_spec(*size, _TRACE_BATCH))
  graph = _OnnxGraph(onnx)
  logits, = graph.run(closed.jaxpr, ['images'], [np.asarray(c) for c in closed.consts])
  graph.nodes.append(onnx.helper.make_node('Identity', [graph.materialize(logits)], ['logits']))
  classes = closed.jaxpr.outvars[0].aval.shape[-1]
  tensor = onnx.helper.make_tensor_value_info
  proto = onnx.helper.make_model(
      onnx.helper.make_graph(
          graph.nodes, 'pspnet',
          [tensor('images', onnx.TensorProto.FLOAT, ['batch', *size, 3])],
          [tensor('logits', onnx.TensorProto.FLOAT, ['batch', *size, classes])],
          graph.initializers),
      opset_imports=[onnx.helper.make_opsetid('', ONNX_OPSET)], producer_name='pspnet_jax')
  onnx.checker.check_model(proto, full_check=True)
  return proto


def export_onnx(forward, path: str, size: tuple[int, int], *, overwrite: bool = False) -> None:
  proto = onnx_model(forward, size)
  onnx = _import_onnx()
  weights.write_atomically(path, functools.partial(onnx.save_model, proto), overwrite=overwrite)


_EXPORTERS = {'jax': export_jax, 'onnx': export_onnx}


def export_model(config, workdir: str, path: str, fmt: str, step: int | None = None, *,
                 size=None, overwrite: bool = False) -> int:
  """Writes checkpoint `step` (default latest) of `workdir` as a deployable `fmt` model at
  `size` (default the config's crop) to `path`; returns the step."""
  if fmt not in _EXPORTERS:
    raise ValueError(f'format {fmt!r} is not a deployable export; use one of {EXPORT_FORMATS}')
  size = export_size(config, size)
  weights.refuse_existing(path, overwrite)
  if fmt == 'onnx':
    _import_onnx()  # the install hint before the restore
  loaded = checkpoint.load_model(config, workdir, step)
  _EXPORTERS[fmt](serving_function(loaded.model), path, size, overwrite=overwrite)
  return loaded.step

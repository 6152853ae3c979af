"""The eval-mode forward's jaxpr re-expressed in another framework's operators: ONNX and TensorFlow.

`Translator` walks a jaxpr once, for any backend: constant subexpressions
(the weights and what is computed from them, such as BatchNorm's
scale / sqrt(var + eps)) are evaluated here; call-like primitives (jit,
custom_jvp_call) are inlined; a convolution is held back (`PendingConv`) until
something other than a per-output-channel add, subtract or multiply by a
constant reads it, so that each eval-mode BatchNorm ends up in its
convolution's kernel and bias. A 1x1 convolution that the model computes as a
matrix product (`layers._conv_or_dot`) becomes a convolution again. The
resize and pooling maps are einsums with constant matrices, which every
backend has. A primitive without a translation fails with its name.

Backends implement a few operators (`conv`, `max_pool`, `einsum`, ...) on
their own values: `OnnxBackend` emits ONNX nodes (NHWC between convolutions,
which take NCHW), `TensorflowBackend` calls TF ops inside a `tf.function`.
Only `deploy` imports this module; onnx and tensorflow are imported by the
backend that needs them.
"""

import jax
import jax.numpy as jnp
import numpy as np

Literal = jax.extend.core.Literal


class PendingConv:
  """A convolution not yet written: input, float64 kernel (O, I, KH, KW) and bias, geometry."""

  def __init__(self, source, kernel: np.ndarray, *, strides=(1, 1), dilations=(1, 1),
               pads=((0, 0), (0, 0))):
    self.source = source
    self.kernel = np.asarray(kernel, np.float64)
    self.bias = np.zeros(self.kernel.shape[0], np.float64)
    self.strides, self.dilations = tuple(strides), tuple(dilations)
    self.pads = tuple(tuple(side) for side in pads)  # ((top, bottom), (left, right))
    self.written = None  # the backend's output value, once written

  def fold(self, primitive: str, constant: np.ndarray) -> bool:
    """Takes `conv <primitive> constant` into the kernel and bias when the constant is one
    value or one per output channel (last axis); False (and unchanged) otherwise."""
    channels = self.kernel.shape[0]
    if primitive not in ('add', 'sub', 'mul') or constant.size not in (1, channels) or (
        constant.ndim and constant.shape[-1] != constant.size):
      return False
    values = np.broadcast_to(np.asarray(constant, np.float64).reshape(-1), (channels,))
    if primitive == 'add':
      self.bias = self.bias + values
    elif primitive == 'sub':
      self.bias = self.bias - values
    else:
      self.kernel = self.kernel * values[:, None, None, None]
      self.bias = self.bias * values
    return True


# Call-like primitives, inlined: the parameter that holds the inner jaxpr.
_CALLS = {'jit': 'jaxpr', 'pjit': 'jaxpr', 'custom_jvp_call': 'call_jaxpr',
          'closed_call': 'call_jaxpr'}
_BINARY = ('add', 'sub', 'mul', 'div', 'max')


class Translator:
  """Runs a jaxpr with `backend`'s operators (see the module docstring).

  `trace_batch` is the batch size the jaxpr was traced at: the backends keep
  the batch symbolic, so a reshape that keeps it says so.
  """

  def __init__(self, backend, trace_batch: int):
    self.backend = backend
    self.trace_batch = trace_batch

  def value(self, value):
    """The backend's value of a translated value (writing a pending convolution, a constant)."""
    if isinstance(value, PendingConv):
      if value.written is None:
        value.written = self.backend.conv(
            value.source, value.kernel.astype(np.float32), value.bias.astype(np.float32),
            strides=value.strides, dilations=value.dilations, pads=value.pads)
      return value.written
    if isinstance(value, np.ndarray):
      return self.backend.constant(value)
    return value

  def run(self, jaxpr, inputs: list, consts: list) -> list:
    uses = {}
    for var in [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars):
      if not isinstance(var, Literal):
        uses[var] = uses.get(var, 0) + 1
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, inputs))
    read = lambda var: np.asarray(var.val) if isinstance(var, Literal) else env[var]
    for eqn in jaxpr.eqns:
      args = [read(var) for var in eqn.invars]
      # A pending convolution read by this equation alone may take the equation in.
      only_reader = [not isinstance(var, Literal) and uses[var] == 1 for var in eqn.invars]
      env.update(zip(eqn.outvars, self.equation(eqn, args, only_reader)))
    return [read(var) for var in jaxpr.outvars]

  def equation(self, eqn, args: list, only_reader: list) -> list:
    name, params = eqn.primitive.name, eqn.params
    if name in _CALLS:
      closed = params[_CALLS[name]]
      inner = getattr(closed, 'jaxpr', closed)
      return self.run(inner, args, [np.asarray(c) for c in getattr(closed, 'consts', [])])
    if all(isinstance(arg, np.ndarray) for arg in args):
      # Weights and what is computed from them only: evaluated now, a constant.
      results = eqn.primitive.bind(*[jnp.asarray(arg) for arg in args], **params)
      results = results if eqn.primitive.multiple_results else [results]
      return [np.asarray(result) for result in results]
    if name in _BINARY:
      return [self._binary(name, args, only_reader)]
    handler = getattr(self, '_' + name, None)
    if handler is None:
      raise NotImplementedError(f'export: no translation for the JAX primitive {name!r}')
    return [handler(eqn, *args)]

  def _binary(self, name, args, only_reader):
    lhs, rhs = args
    # conv op constant (or constant + conv, constant * conv): into the convolution.
    for conv, constant, reader, order_free in ((lhs, rhs, only_reader[0], True),
                                               (rhs, lhs, only_reader[1], name != 'sub')):
      if (isinstance(conv, PendingConv) and isinstance(constant, np.ndarray) and reader
          and order_free and conv.fold(name, constant)):
        return conv
    if name == 'max' and isinstance(rhs, np.ndarray) and rhs.size == 1 and float(rhs) == 0.0:
      return self.backend.relu(self.value(lhs))
    return self.backend.binary(name, self.value(lhs), self.value(rhs))

  # One method per primitive of the forward, named after it.

  def _conv_general_dilated(self, eqn, lhs, rhs):
    params = eqn.params
    numbers = params['dimension_numbers']
    if (not isinstance(rhs, np.ndarray) or tuple(numbers.lhs_spec) != (0, 3, 1, 2)
        or tuple(numbers.rhs_spec) != (3, 2, 0, 1) or tuple(numbers.out_spec) != (0, 3, 1, 2)
        or params['feature_group_count'] != 1 or params['batch_group_count'] != 1
        or tuple(params['lhs_dilation']) != (1, 1)):
      raise NotImplementedError(f'export: convolution {numbers} is not NHWC x HWIO')
    return PendingConv(self.value(lhs), np.transpose(rhs, (3, 2, 0, 1)),
                       strides=params['window_strides'], dilations=params['rhs_dilation'],
                       pads=params['padding'])

  def _dot_general(self, eqn, lhs, rhs):
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params['dimension_numbers']
    lhs_rank, rhs_rank = (var.aval.ndim for var in eqn.invars)
    if (isinstance(rhs, np.ndarray) and lhs_rank == 4 and rhs_rank == 2
        and tuple(lhs_contract) == (3,) and tuple(rhs_contract) == (0,) and not lhs_batch):
      return PendingConv(self.value(lhs), np.transpose(rhs)[:, :, None, None])
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
    as_float32 = lambda arg: arg.astype(np.float32) if isinstance(arg, np.ndarray) else arg
    return self.backend.einsum(equation, self.value(as_float32(lhs)),
                               self.value(as_float32(rhs)))

  def _reduce_window_max(self, eqn, operand):
    params = eqn.params
    window, strides, padding = (params['window_dimensions'], params['window_strides'],
                                params['padding'])
    if (window[0], window[3], strides[0], strides[3]) != (1, 1, 1, 1) or any(
        padding[axis] != (0, 0) for axis in (0, 3)):
      raise NotImplementedError('export: a max-pool over the batch or the channels')
    return self.backend.max_pool(self.value(operand), window[1:3], strides[1:3], padding[1:3])

  def _transpose(self, eqn, operand):
    return self.backend.transpose(self.value(operand), eqn.params['permutation'])

  def _concatenate(self, eqn, *operands):
    return self.backend.concat([self.value(operand) for operand in operands],
                               eqn.params['dimension'])

  def _slice(self, eqn, operand):
    params = eqn.params
    shape = eqn.invars[0].aval.shape
    steps = params['strides'] or (1,) * len(shape)
    # Only the axes the slice cuts: the batch axis (symbolic) stays whole.
    cuts = [(axis, start, limit, step) for axis, (start, limit, step, size) in enumerate(
        zip(params['start_indices'], params['limit_indices'], steps, shape))
            if (start, limit, step) != (0, size, 1)]
    if not cuts:
      return self.value(operand)
    if cuts[0][0] == 0:
      raise NotImplementedError('export: a slice of the batch axis')
    return self.backend.slice(self.value(operand), *zip(*cuts))

  def _squeeze(self, eqn, operand):
    if 0 in eqn.params['dimensions']:
      raise NotImplementedError('export: a squeeze of the batch axis')
    return self.backend.squeeze(self.value(operand), eqn.params['dimensions'])

  def _reshape(self, eqn, operand):
    old_shape, new_shape = eqn.invars[0].aval.shape, eqn.params['new_sizes']
    if old_shape[0] != self.trace_batch or new_shape[0] != self.trace_batch:
      raise NotImplementedError('export: a reshape across the batch axis')
    return self.backend.reshape(self.value(operand), new_shape[1:])

  def _argmax(self, eqn, operand):
    axis, = eqn.params['axes']
    return self.backend.argmax(self.value(operand), axis, np.dtype(eqn.params['index_dtype']))

  def _convert_element_type(self, eqn, operand):
    return self.backend.cast(self.value(operand), np.dtype(eqn.params['new_dtype']))


class OnnxBackend:
  """ONNX nodes and initializers; values are tensor names, NHWC except inside `conv`."""

  def __init__(self, onnx):
    self.onnx = onnx
    self.nodes, self.initializers = [], []
    self._count = 0

  def _name(self, hint: str) -> str:
    self._count += 1
    return f'{hint}_{self._count}'

  def constant(self, value: np.ndarray, hint: str = 'const') -> str:
    name = self._name(hint)
    self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
    return name

  def node(self, op: str, inputs: list, output: str | None = None, **attributes) -> str:
    output = output or self._name(op.lower())
    self.nodes.append(self.onnx.helper.make_node(op, inputs, [output], **attributes))
    return output

  def _nchw(self, x, op: str, inputs: list, **attributes) -> str:
    nchw = self.node('Transpose', [x], perm=[0, 3, 1, 2])
    return self.node('Transpose', [self.node(op, [nchw, *inputs], **attributes)],
                     perm=[0, 2, 3, 1])

  def conv(self, x, kernel, bias, *, strides, dilations, pads):
    (top, bottom), (left, right) = pads
    return self._nchw(x, 'Conv', [self.constant(kernel, 'kernel'), self.constant(bias, 'bias')],
                      strides=list(strides), dilations=list(dilations),
                      pads=[top, left, bottom, right], kernel_shape=list(kernel.shape[2:]))

  def max_pool(self, x, window, strides, padding):
    (top, bottom), (left, right) = padding
    return self._nchw(x, 'MaxPool', [], kernel_shape=list(window), strides=list(strides),
                      pads=[top, left, bottom, right])  # ONNX pads a max-pool with -inf

  def relu(self, x):
    return self.node('Relu', [x])

  def binary(self, name, lhs, rhs):
    return self.node({'add': 'Add', 'sub': 'Sub', 'mul': 'Mul', 'div': 'Div', 'max': 'Max'}[name],
                     [lhs, rhs])

  def einsum(self, equation, lhs, rhs):
    return self.node('Einsum', [lhs, rhs], equation=equation)

  def transpose(self, x, perm):
    return self.node('Transpose', [x], perm=list(perm))

  def concat(self, xs, axis):
    return self.node('Concat', xs, axis=axis)

  def _ints(self, values):
    return self.constant(np.asarray(values, np.int64), 'ints')

  def slice(self, x, axes, starts, limits, steps):
    return self.node('Slice', [x, self._ints(starts), self._ints(limits), self._ints(axes),
                               self._ints(steps)])

  def squeeze(self, x, axes):
    return self.node('Squeeze', [x, self._ints(axes)])

  def reshape(self, x, shape_after_batch):
    # 0: the input's (symbolic) batch.
    return self.node('Reshape', [x, self._ints([0, *shape_after_batch])])

  def cast(self, x, dtype):
    return self.node('Cast', [x], to=self.onnx.helper.np_dtype_to_tensor_dtype(dtype))

  def argmax(self, x, axis, dtype):
    # ArgMax gives int64 and, like jnp.argmax, the first of equal maxima.
    return self.cast(self.node('ArgMax', [x], axis=axis, keepdims=0), dtype)


class TensorflowBackend:
  """TF operators on NHWC tensors, called while a `tf.function` traces."""

  def __init__(self, tf):
    self.tf = tf

  def constant(self, value: np.ndarray):
    return self.tf.constant(value)

  def conv(self, x, kernel, bias, *, strides, dilations, pads):
    tf = self.tf
    # OIHW -> HWIO; explicit symmetric padding as the model has it.
    y = tf.nn.conv2d(x, tf.constant(np.transpose(kernel, (2, 3, 1, 0))), strides=list(strides),
                     padding=[[0, 0], list(pads[0]), list(pads[1]), [0, 0]],
                     dilations=list(dilations))
    return tf.nn.bias_add(y, tf.constant(bias))

  def max_pool(self, x, window, strides, padding):
    tf = self.tf
    padded = tf.pad(x, [[0, 0], list(padding[0]), list(padding[1]), [0, 0]],
                    constant_values=-np.inf)
    return tf.nn.max_pool2d(padded, list(window), list(strides), 'VALID')

  def relu(self, x):
    return self.tf.nn.relu(x)

  def binary(self, name, lhs, rhs):
    tf = self.tf
    return {'add': tf.add, 'sub': tf.subtract, 'mul': tf.multiply, 'div': tf.divide,
            'max': tf.maximum}[name](lhs, rhs)

  def einsum(self, equation, lhs, rhs):
    return self.tf.einsum(equation, lhs, rhs)

  def transpose(self, x, perm):
    return self.tf.transpose(x, list(perm))

  def concat(self, xs, axis):
    return self.tf.concat(xs, axis)

  def slice(self, x, axes, starts, limits, steps):
    index = [slice(None)] * len(x.shape)
    for axis, start, limit, step in zip(axes, starts, limits, steps):
      index[axis] = slice(start, limit, step)
    return x[tuple(index)]

  def squeeze(self, x, axes):
    return self.tf.squeeze(x, list(axes))

  def reshape(self, x, shape_after_batch):
    return self.tf.reshape(x, [-1, *shape_after_batch])

  def cast(self, x, dtype):
    return self.tf.cast(x, self.tf.as_dtype(dtype))

  def argmax(self, x, axis, dtype):
    return self.tf.argmax(x, axis, output_type=self.tf.as_dtype(dtype))

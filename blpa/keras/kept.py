"""``kept_bytes(model, batch_size)``: what a training step keeps for backward.

A training step holds, between its forward and its backward pass, exactly
the forward tensors that backward operations read. This module finds them
in the graph of one traced step: the backward operations are those
downstream of the model's outputs (every gradient flows from the loss,
which reads the outputs); a kept tensor is one produced outside that set
and read inside it. Nothing runs, so the figure depends neither on the
executor's schedule nor on the allocator, unlike a measured peak. It checks
:func:`blpa.keras.report`'s per-layer figures and shows what plain Keras
keeps on the same model.
"""

import numpy as np
import tensorflow as tf
from keras.src import tree

from blpa.keras import plan as plan_lib

# Inputs the caller holds anyway (the batch, variables, constants).
_NOT_ACTIVATIONS = frozenset(
    ['Placeholder', 'ReadVariableOp', 'Const', 'VarHandleOp'])
# Readers of a tensor's metadata only, not of its values.
_METADATA_READERS = frozenset(['Shape', 'ShapeN', 'Size', 'Rank'])


def _zeros(batch_size, dims, dtype, what):
  dims = [None if d is None else int(d) for d in dims]
  if any(d is None for d in dims):
    raise ValueError(
        f'{what} has an unknown dimension (shape {[None] + dims}); pass '
        'input_shapes= (shapes without the batch dimension, in the structure '
        'of the inputs) or inputs= (a sample batch)')
  dtype = tf.as_dtype(dtype)
  if dtype == tf.float64:
    dtype = tf.float32
  return tf.zeros([batch_size] + dims, dtype)


def _is_shape(value):
  return isinstance(value, (tuple, list)) and all(
      d is None or isinstance(d, int) for d in value)


def sample_inputs(model, batch_size, inputs=None, input_shapes=None):
  """Zero tensors in the structure of a model's inputs, for a batch.

  Args:
    model: a Keras model, plain or from :func:`blpa.keras.compress`.
    batch_size: the batch size (a positive integer).
    inputs: a sample batch (arrays or tensors, any structure): shapes and
      dtypes are taken from it.
    input_shapes: shapes without the batch dimension, a tuple or a dict or
      list of tuples (in the structure of the inputs), filling unknown
      dimensions; dtypes are the model's.

  Returns:
    The zero tensors (a tensor, list or dict).

  Raises:
    ValueError: a bad ``batch_size``, or shapes that cannot be known.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or \
      batch_size < 1:
    raise ValueError(f'batch_size must be a positive integer, got '
                     f'{batch_size!r}')
  if inputs is not None:
    return tree.map_structure(
        lambda a: _zeros(batch_size, np.shape(a)[1:],
                         getattr(a, 'dtype', 'float32'), 'a sample input'),
        inputs)
  source = getattr(model, '_blpa_original', model)
  graph = plan_lib.functional_of(source)
  struct = getattr(graph, '_inputs_struct', None) if graph is not None \
      else None
  if input_shapes is not None:
    if _is_shape(input_shapes):
      dtype = tree.flatten(struct)[0].dtype if struct is not None else \
          'float32'
      return _zeros(batch_size, input_shapes, dtype, 'input_shapes')
    known = {}
    if struct is not None and isinstance(struct, dict):
      known = {k: v.dtype for k, v in struct.items()}
    if isinstance(input_shapes, dict):
      return {k: _zeros(batch_size, v, known.get(k, 'float32'),
                        f'input {k!r}') for k, v in input_shapes.items()}
    return [_zeros(batch_size, v, 'float32', f'input {i}')
            for i, v in enumerate(input_shapes)]
  if struct is None:
    raise ValueError(
        f'{model.name!r} has no known inputs (a subclassed model): pass '
        'inputs= (a sample batch) or input_shapes=')
  return tree.map_structure(
      lambda kt: _zeros(batch_size, kt.shape[1:], kt.dtype,
                        f'input {kt.name!r} of {model.name!r}'), struct)


def _output_ops(model, inputs):
  """The ops of the model's outputs in the traced graph of one
  GradientTape step."""
  outputs = []

  @tf.function
  def step(xs):
    with tf.GradientTape() as tape:
      got = tree.flatten(model(xs, training=True))
      outputs.extend(got)
      loss = tf.add_n([tf.reduce_mean(tf.square(tf.cast(o, tf.float32)))
                       for o in got])
    return tape.gradient(loss, model.trainable_variables)

  step.get_concrete_function(inputs)
  return [t.op for t in outputs]


def _upstream(ops):
  """``ops`` and the operations they depend on."""
  seen, stack = set(), list(ops)
  while stack:
    op = stack.pop()
    if op in seen:
      continue
    seen.add(op)
    stack.extend(t.op for t in op.inputs)
    stack.extend(op.control_inputs)
  return seen


def _downstream(ops):
  """Operations that depend on any of ``ops`` (not ``ops`` themselves)."""
  seen, stack = set(), [c for op in ops for t in op.outputs
                        for c in t.consumers()]
  while stack:
    op = stack.pop()
    if op in seen:
      continue
    seen.add(op)
    stack.extend(c for t in op.outputs for c in t.consumers())
    stack.extend(op._control_outputs)  # pylint: disable=protected-access
  return seen


def _kept_tensors(backward_ops):
  """Tensors produced outside ``backward_ops`` whose values they read."""
  kept = {}
  for op in backward_ops:
    if op.type in _METADATA_READERS:
      continue
    for t in op.inputs:
      if t.op in backward_ops or t.op.type in _NOT_ACTIVATIONS:
        continue
      if t.dtype == tf.resource or t.dtype == tf.variant:
        continue
      if t.dtype.is_integer and t.shape.rank is not None and \
          t.shape.rank <= 1 and not t.shape.is_fully_defined():
        continue  # shape metadata (BroadcastGradientArgs...), a few ints
      kept[t.ref()] = t
  return list(kept.values())


def _nbytes(t):
  if not t.shape.is_fully_defined():
    raise ValueError(f'kept_bytes: tensor {t.name} has no static shape '
                     f'({t.shape}); its bytes cannot be counted')
  return t.shape.num_elements() * t.dtype.size


def kept_bytes(model, batch_size, inputs=None, input_shapes=None):
  """Bytes of forward tensors that one training step's backward pass reads.

  Traces (does not run) a step: the model called with ``training=True`` on
  zeros of its input shapes, a mean-square loss of its outputs, and the
  gradients of its trainable variables in ``tf.function``. The model's
  inputs, variables and constants are not counted.

  Args:
    model: a built Keras model, plain or from :func:`blpa.keras.compress`.
    batch_size: the batch size (a positive integer).
    inputs: a sample batch, for a model whose input shapes are not all
      known (a subclassed model, a sequence length ``None``).
    input_shapes: or the input shapes without the batch dimension
      (:func:`sample_inputs`).

  Returns:
    dict: ``total`` (bytes), ``by_dtype`` (dtype name -> bytes) and
    ``tensors`` (``(name, op type, dtype name, shape, bytes)`` per kept
    tensor, largest first).

  Raises:
    ValueError: if ``batch_size`` is not a positive integer, or the input
      shapes cannot be known.
  """
  output_ops = _output_ops(
      model, sample_inputs(model, batch_size, inputs, input_shapes))
  # An output computed from another output is forward, not backward.
  backward_ops = _downstream(output_ops) - _upstream(output_ops)
  tensors = sorted(
      ((t.name, t.op.type, t.dtype.name, t.shape.as_list(), _nbytes(t))
       for t in _kept_tensors(backward_ops)),
      key=lambda row: -row[-1])
  by_dtype = {}
  for row in tensors:
    by_dtype[row[2]] = by_dtype.get(row[2], 0) + row[-1]
  return dict(total=sum(row[-1] for row in tensors), by_dtype=by_dtype,
              tensors=tensors)

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

import tensorflow as tf

# Inputs the caller holds anyway (the batch, variables, constants).
_NOT_ACTIVATIONS = frozenset(
    ['Placeholder', 'ReadVariableOp', 'Const', 'VarHandleOp'])
# Readers of a tensor's metadata only, not of its values.
_METADATA_READERS = frozenset(['Shape', 'ShapeN', 'Size', 'Rank'])


def _inputs_like(model, batch_size):
  """Zero tensors shaped like the model's inputs, for a batch."""
  # A compressed model has the inputs of the model it was made from.
  inputs = getattr(getattr(model, 'source', model), 'inputs', None)
  if not inputs:
    raise ValueError(
        f'kept_bytes needs a model with known inputs; {model.name!r} has none '
        '(build a functional or Sequential model with an Input)')
  out = []
  for kt in inputs:
    dims = list(kt.shape[1:])
    if any(d is None for d in dims):
      raise ValueError(f'kept_bytes needs static input shapes; input '
                       f'{kt.name!r} of {model.name!r} has shape {kt.shape}')
    out.append(tf.zeros([batch_size] + dims, kt.dtype))
  return out


def _output_ops(model, inputs):
  """The ops of the model's outputs in the traced graph of one
  GradientTape step."""
  outputs = []

  @tf.function
  def step(*xs):
    with tf.GradientTape() as tape:
      got = tf.nest.flatten(model(list(xs) if len(xs) > 1 else xs[0],
                                  training=True))
      outputs.extend(got)
      loss = tf.add_n([tf.reduce_mean(tf.square(tf.cast(o, tf.float32)))
                       for o in got])
    return tape.gradient(loss, model.trainable_variables)

  step.get_concrete_function(*inputs)
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
      kept[t.ref()] = t
  return list(kept.values())


def _nbytes(t):
  if not t.shape.is_fully_defined():
    raise ValueError(f'kept_bytes: tensor {t.name} has no static shape '
                     f'({t.shape}); its bytes cannot be counted')
  return t.shape.num_elements() * t.dtype.size


def kept_bytes(model, batch_size):
  """Bytes of forward tensors that one training step's backward pass reads.

  Traces (does not run) a step: the model called with ``training=True`` on
  zeros of its input shapes, a mean-square loss of its outputs, and the
  gradients of its trainable variables in ``tf.function``. The model's
  inputs, variables and constants are not counted.

  Args:
    model: a built Keras model with static input shapes, plain or from
      :func:`blpa.keras.compress`.
    batch_size: the batch size (a positive integer).

  Returns:
    dict: ``total`` (bytes), ``by_dtype`` (dtype name -> bytes) and
    ``tensors`` (``(name, op type, dtype name, shape, bytes)`` per kept
    tensor, largest first).

  Raises:
    ValueError: if ``batch_size`` is not a positive integer, or the model
      has no static input shapes.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or \
      batch_size < 1:
    raise ValueError(f'batch_size must be a positive integer, got '
                     f'{batch_size!r}')
  output_ops = _output_ops(model, _inputs_like(model, batch_size))
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

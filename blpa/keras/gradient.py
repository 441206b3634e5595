"""A custom gradient recorded on the tape that keeps only what it is told.

``tf.custom_gradient`` does not fit compact activations: in graph mode it
passes the function's inputs through an ``IdentityN`` whose unused outputs
get zero gradients made from those inputs (so every layer input stays
alive until the backward pass), and in eager mode its closure holds the
function's result (TF issue #97697). :func:`custom_op` records one tape
operation whose backward function holds only what the forward function's
``backward`` closure holds.

Two things every wrapper gets from here, whatever layer it runs:

- **Logits.** Keras's crossentropy losses (``from_logits=False``) read the
  logits a softmax output carries (``output._keras_logits``) and
  differentiate those. They are recorded as extra outputs of the operation,
  so the tape reaches them (a wrapper that cannot take their gradient drops
  the attribute instead, and the loss reads the probabilities).
- **Dtypes.** Input gradients come back in each input's dtype and variable
  gradients in each variable's dtype (under mixed precision a layer
  computes in float16/bfloat16 and keeps float32 variables). Gradients are
  otherwise passed through unchanged, so a loss scale stays as it came.
"""

import tensorflow as tf
from tensorflow.python.eager import record

LOGITS_ATTR = '_keras_logits'


def trainable_of(variables):
  """The variables (Keras or tf) among ``variables`` that are trained."""
  return [v for v in variables if v is not None and v.trainable]


def raw_variable(variable):
  """The ``tf.Variable`` behind a Keras variable (no autocast), else the
  argument itself."""
  inner = getattr(variable, '_value', None)
  return inner if hasattr(inner, 'read_value') else variable


def logits_of(outputs):
  """The logits carried by the flat outputs (None where none)."""
  return [getattr(t, LOGITS_ATTR, None) for t in tf.nest.flatten(outputs)]


def drop_logits(outputs):
  """Removes the logits attribute from every output (the loss then reads
  the probabilities themselves)."""
  for t in tf.nest.flatten(outputs):
    if getattr(t, LOGITS_ATTR, None) is not None:
      try:
        delattr(t, LOGITS_ATTR)
      except AttributeError:  # pragma: no cover (a read-only tensor)
        pass


def _distinct_from(outputs, xs):
  """``outputs`` with each output (or logits it carries) that is one of
  ``xs`` replaced by an identity: an operation recorded on the tape must not
  output a tensor that is already on it (``Activation('linear')``, or a
  softmax whose logits are its input)."""
  seen = {id(x) for x in xs}

  def fresh(t):
    if id(t) in seen:
      out = tf.identity(t)
      logits = getattr(t, LOGITS_ATTR, None)
      if logits is not None:
        setattr(out, LOGITS_ATTR, logits)
      t = out
    seen.add(id(t))
    logits = getattr(t, LOGITS_ATTR, None)
    if logits is not None and id(logits) in seen:
      setattr(t, LOGITS_ATTR, tf.identity(logits))
    return t

  return tf.nest.map_structure(fresh, outputs)


def _cast_like(grads, refs):
  """Each gradient cast to its reference's dtype (None stays None)."""
  out = []
  for g, ref in zip(grads, refs):
    if g is not None and ref is not None and g.dtype != ref.dtype:
      g = tf.cast(g, ref.dtype)
    out.append(g)
  return out


def custom_op(forward, xs, variables=(), logits=False):
  """Runs ``forward`` with the tape paused and records its backward.

  Args:
    forward: ``forward(xs) -> (outputs, backward)``; ``outputs`` a tensor or
      a nest of tensors; ``backward(douts) -> (dxs, dvariables)`` with
      ``douts`` the flat list of output gradients (None for outputs that
      got none), then, when ``logits`` is set, one gradient per output that
      carries logits (in output order); ``dxs`` aligned with ``xs`` and
      ``dvariables`` with ``variables`` (None entries allowed).
    xs: list of input tensors.
    variables: trained Keras or tf variables whose gradients ``backward``
      returns.
    logits: whether ``backward`` takes the gradients of the outputs' logits
      (else the outputs' logits are dropped).

  Returns:
    ``outputs``.
  """
  xs = list(xs)
  with record.stop_recording():
    outputs, backward = forward(xs)
    outputs = _distinct_from(outputs, xs)
  flat = tf.nest.flatten(outputs)
  if logits:
    flat = flat + [t for t in logits_of(outputs) if t is not None]
  else:
    drop_logits(outputs)
  # Reads recorded on the tape connect the gradients to the variables; the
  # raw variable, so that the read has the variable's own dtype.
  reads = [tf.convert_to_tensor(raw_variable(v)) for v in variables]
  count = len(xs)

  def backward_function(*douts):
    dxs, dvars = backward(list(douts))
    return (_cast_like(list(dxs)[:count], xs) +
            _cast_like(list(dvars), reads))

  record.record_operation('BlpaKerasOp', flat, xs + reads, backward_function)
  return outputs

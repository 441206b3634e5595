"""A custom gradient recorded on the tape that keeps only what it is told.

``tf.custom_gradient`` does not fit compact activations: in graph mode it
passes the function's inputs through an ``IdentityN`` whose unused outputs
get zero gradients made from those inputs (so every layer input stays
alive until the backward pass), and in eager mode its closure holds the
function's result (TF issue #97697). :func:`custom_op` records one tape
operation whose backward function holds only what the forward function's
``backward`` closure holds.
"""

import tensorflow as tf
from tensorflow.python.eager import record


def trainable_of(variables):
  """The variables (Keras or tf) among ``variables`` that are trained."""
  return [v for v in variables if v is not None and v.trainable]


def custom_op(forward, xs, variables=()):
  """Runs ``forward`` with the tape paused and records its backward.

  Args:
    forward: ``forward(xs) -> (outputs, backward)``; ``outputs`` a tensor or
      a nest of tensors; ``backward(douts) -> (dxs, dvariables)`` with
      ``douts`` the flat list of output gradients (None for outputs that
      got none), ``dxs`` aligned with ``xs`` and ``dvariables`` with
      ``variables`` (None entries allowed).
    xs: list of input tensors.
    variables: trained Keras or tf variables whose gradients ``backward``
      returns.

  Returns:
    ``outputs``.
  """
  xs = list(xs)
  with record.stop_recording():
    outputs, backward = forward(xs)
  flat = tf.nest.flatten(outputs)
  # Reads recorded on the tape connect the gradients to the variables.
  reads = [tf.convert_to_tensor(getattr(v, 'value', v)) for v in variables]
  count = len(xs)

  def backward_function(*douts):
    dxs, dvars = backward(list(douts))
    return list(dxs)[:count] + list(dvars)

  record.record_operation('BlpaKerasOp', flat, xs + reads, backward_function)
  return outputs

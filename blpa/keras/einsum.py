"""The analytic backward pass of ``keras.layers.EinsumDense``.

For ``out = einsum('X,Y->Z', x, W)`` (``X``, ``Y``, ``Z`` index strings):
``dx = einsum('Z,Y->X', d, W)`` and ``dW = einsum('X,Z->Y', x, d)``. This
holds when every index of each operand appears in one of the other two
strings and no string repeats an index; equations with ``...`` or an index
summed within one operand are refused (:func:`reason`).
"""

import re

import tensorflow as tf

from blpa.keras import backward

_EQUATION = re.compile(r'^([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]*)$')


def parse(equation):
  """``(X, Y, Z)``: the index strings of an ``'X,Y->Z'`` equation.

  Raises:
    ValueError: the equation is not of that form (:func:`reason` says why).
  """
  why = reason(equation)
  if why:
    raise ValueError(f'einsum equation {equation!r}: {why}')
  return _EQUATION.match(equation.replace(' ', '')).groups()


def reason(equation):
  """Why an equation has no analytic backward here ('' if it has one)."""
  if not isinstance(equation, str):
    return f'equation {equation!r} is not a string'
  equation = equation.replace(' ', '')
  if '...' in equation:
    return "equation with '...'"
  match = _EQUATION.match(equation)
  if not match:
    return f'equation {equation!r} is not of the form X,Y->Z'
  x, w, z = match.groups()
  for part in (x, w, z):
    if len(set(part)) != len(part):
      return f'index repeated within {part!r}'
  for part, others in ((x, w + z), (w, x + z)):
    alone = sorted(set(part) - set(others))
    if alone:
      return (f"index {''.join(alone)!r} summed within one operand of "
              f'{equation!r}')
  return ''


def grads(equation, x, kernel, dy):
  """``(dx, dkernel)`` of ``einsum(equation, x, kernel)``.

  Args:
    equation: ``'X,Y->Z'`` (:func:`reason` is '').
    x: the (restored) input, or None when the kernel is frozen (no dkernel).
    kernel: the kernel in the compute dtype.
    dy: the output gradient.

  Returns:
    ``(dx, dkernel)``; ``dkernel`` None when ``x`` is None. ``dx`` is
    computed after ``dkernel`` (as :func:`blpa.keras.backward.dense`).
  """
  xs, ws, zs = parse(equation)
  dk = None
  if x is not None:
    dk = tf.einsum(f'{xs},{zs}->{ws}', x, dy)
  deps = [dk] if dk is not None else []
  with tf.control_dependencies(deps):
    dx = tf.einsum(f'{zs},{ws}->{xs}', dy, kernel)
  return dx, dk


def bias_grad(dy, bias_shape):
  """Gradient of a bias of shape ``bias_shape`` broadcast onto ``dy``'s
  trailing axes (EinsumDense's ``bias_axes``), accumulated in float32.

  A bias with no axis of size 1 covers the last axes whole: ``dy`` is
  reshaped to ``[-1, bias size]`` and summed by ``BiasAddGrad`` (float32
  accumulation in half precision, :func:`blpa.keras.backward.bias`);
  otherwise a float32 ``reduce_sum`` over the broadcast axes.

  Args:
    dy: the output gradient.
    bias_shape: the bias's static shape (a list of ints).

  Returns:
    The gradient, of shape ``bias_shape`` and ``dy``'s dtype.
  """
  bias_shape = [int(d) for d in bias_shape]
  lead = dy.shape.rank - len(bias_shape)
  if all(d > 1 for d in bias_shape):
    size = 1
    for d in bias_shape:
      size *= d
    g = backward.bias(tf.reshape(dy, [-1, size]))
    return tf.reshape(g, bias_shape)
  axes = list(range(lead)) + [lead + i for i, d in enumerate(bias_shape)
                              if d == 1]
  g = tf.reduce_sum(tf.cast(dy, tf.float32), axis=axes, keepdims=True)
  g = tf.reshape(g, bias_shape)
  return tf.cast(g, dy.dtype)

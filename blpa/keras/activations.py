"""Smooth elementwise activations kept as few-bit codes of their derivative.

For ``out = f(z)`` with ``f`` one of the known smooth activations
(:func:`name_of`), the backward pass needs only ``f'(z)``: the forward pass
computes it in float32 (closed forms, :func:`derivative`) and keeps it as
``bits``-bit per-channel min/max codes (:func:`blpa.keras.codecs.make`); the
backward pass is ``dz = dout * f'(z)~``. At ``bits=0`` ``z`` itself is kept
and the backward pass differentiates ``f`` at ``z`` with a tape (the ops
TensorFlow runs for the plain layer, in the layer's dtype).

Only functions recognized by identity (or, for keras-hub's
``gelu_approximate``, by name and module) are treated as smooth: an
arbitrary Python function keeps the generic path.
"""

import functools
import math

import keras
import tensorflow as tf

from blpa.keras import codecs

A = keras.activations

#: keras-hub's GELU (tanh approximation), recognized by name and module.
_HUB_GELU = ('gelu_approximate', 'keras_hub.src.utils.keras_utils')

_BY_FUNCTION = {A.gelu: 'gelu', A.silu: 'silu', A.tanh: 'tanh',
                A.sigmoid: 'sigmoid', A.elu: 'elu', A.softplus: 'softplus'}

#: Activations whose Keras output carries ``_keras_logits`` (the loss may
#: differentiate those instead of the output).
LOGIT_ACTS = ('sigmoid',)

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_TANH_K = 0.044715


def name_of(fn):
  """The name of a known smooth activation, else None.

  Args:
    fn: an activation function (a layer's ``activation``).

  Returns:
    ``'gelu'``, ``'gelu_tanh'`` (approximate GELU), ``'silu'``, ``'tanh'``,
    ``'sigmoid'``, ``'elu'``, ``'softplus'`` or None.
  """
  if isinstance(fn, functools.partial):
    if fn.func is A.gelu and not fn.args and set(fn.keywords) <= {
        'approximate'}:
      return 'gelu_tanh' if fn.keywords.get('approximate') else 'gelu'
    return None
  try:
    name = _BY_FUNCTION.get(fn)
  except TypeError:  # an unhashable callable
    return None
  if name:
    return name
  if (getattr(fn, '__name__', None), getattr(fn, '__module__', None)) == \
      _HUB_GELU:
    return 'gelu_tanh'
  return None


def derivative(name, z):
  """``f'(z)`` in float32 (closed forms of the functions of :func:`name_of`).

  Args:
    name: a name from :func:`name_of`.
    z: the pre-activation (any float dtype; computed in float32).

  Returns:
    float32 tensor of ``z``'s shape.
  """
  z = tf.cast(z, tf.float32)
  if name == 'gelu':
    return 0.5 * (1.0 + tf.math.erf(z * _SQRT_HALF)) + \
        z * tf.exp(-0.5 * tf.square(z)) * _INV_SQRT_2PI
  if name == 'gelu_tanh':
    z2 = tf.square(z)
    t = tf.tanh(_TANH_C * z * (1.0 + _TANH_K * z2))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - tf.square(t)) * _TANH_C * (
        1.0 + 3.0 * _TANH_K * z2)
  if name == 'silu':
    s = tf.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))
  if name == 'tanh':
    return 1.0 - tf.square(tf.tanh(z))
  if name == 'sigmoid':
    s = tf.sigmoid(z)
    return s * (1.0 - s)
  if name == 'elu':
    return tf.where(z > 0, 1.0, tf.exp(tf.minimum(z, 0.0)))
  if name == 'softplus':
    return tf.sigmoid(z)
  raise ValueError(f'no derivative for activation {name!r}')


class Derivative:
  """What a smooth activation keeps for its backward pass.

  Args:
    fn: the activation function (run again at ``bits=0``).
    name: its :func:`name_of` name.
    z: the pre-activation (the layer's compute dtype).
    bits: 0, 4 or 8.
  """

  def __init__(self, fn, name, z, bits):
    self.fn, self.name, self.bits = fn, name, bits
    if bits:
      self.z = None
      self.codec = codecs.make(derivative(name, z), bits)
    else:
      self.z, self.codec = z, None

  def tensors(self):
    """The tensors made for the copy."""
    return self.codec.tensors() if self.codec is not None else []

  def grad(self, dout, dlogits=None):
    """``dL/dz`` (in ``dout``'s dtype) from the output's gradient and, for
    an output carrying logits, the logits' gradient (None if none)."""
    if self.codec is None:
      with tf.GradientTape() as tape:
        tape.watch(self.z)
        out = self.fn(self.z)
      dz = tape.gradient(out, self.z, output_gradients=tf.cast(dout,
                                                                out.dtype))
      dz = tf.cast(dz, dout.dtype)
    else:
      d = self.codec.restore()
      dz = tf.cast(tf.cast(dout, tf.float32) * d, dout.dtype)
    if dlogits is not None:
      dz = dz + tf.cast(dlogits, dz.dtype)
    return dz


def run_activation(layer, x, name, bits, call=None):
  """An ``Activation`` layer with a smooth function: keeps only the
  derivative (:class:`Derivative`); backward ``dout * f'(z)~``.

  Args:
    layer: the ``keras.layers.Activation``.
    x: its input.
    name: :func:`name_of` of its function.
    bits: 0, 4 or 8.
    call: ``call(x)`` running the layer (default ``layer``).

  Returns:
    The layer's output.
  """
  # pylint: disable=import-outside-toplevel
  from blpa.keras import wrappers
  from blpa.keras.gradient import custom_op
  call = call or layer

  def forward(xs):
    out = call(xs[0])
    z = wrappers.autocast_input(layer, xs[0])
    kept = Derivative(layer.activation, name, z, bits)
    out = codecs.after(out, kept.tensors())

    def grad(douts):
      dlogits = douts[1] if len(douts) > 1 else None
      after = wrappers._after  # pylint: disable=protected-access
      return [after(douts, lambda: kept.grad(douts[0], dlogits))], []

    return out, grad

  return custom_op(forward, [x], logits=name in LOGIT_ACTS)

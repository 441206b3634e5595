"""LayerNormalization and RMSNormalization with an analytic backward pass.

The forward pass is the layer's own ``call`` (so the output is Keras's,
bit for bit); the statistics are computed again beside it, in float32, with
the ops Keras uses. What is kept (:class:`NormCopy`):

- at ``bits`` 4 or 8, K-bit codes of the normalized values ``y`` (BLPA's
  fixed-range quantizer, offset 0: ``y`` spans about ±3 per token); at 8
  bits the range is widened per feature so that no value is clipped
  (:func:`blpa.keras.wrappers.code_widening`); plus the per-token ``rstd``
  (float32; and ``mean * rstd`` for LayerNormalization's deprecated
  ``rms_scaling``);
- at ``bits=0``, the input ``x`` itself (the statistics are recomputed)
  and the output (what its readers restore).

The same object is the codec of the layer's output (``gamma * y~ + beta``),
so the layers that read the output (Dense/EinsumDense projections,
attention) keep no second copy.

Backward, with ``gy = dout * gamma`` and means over the normalized (last)
axis: LayerNormalization ``dx = rstd * (gy - mean(gy) - y * mean(gy * y))``;
RMSNormalization (``y = x * rrms``) ``dx = rrms * (gy - y * mean(gy * y))``;
``rms_scaling`` (``y = x * rstd``, ``rstd`` of the variance)
``dx = rstd * (gy - (y - mean * rstd) * mean(gy * y))``. ``dgamma = sum(dout
* y)`` and ``dbeta = sum(dout)`` over all other axes.
"""

import keras
import tensorflow as tf
from keras import ops

from blpa import quant
from blpa.keras import codecs
from blpa.keras.gradient import raw_variable

L = keras.layers

#: The kinds of :mod:`blpa.keras.plan` this module runs.
KINDS = ('layernorm', 'rmsnorm')
#: How the codes' range is set: ``'feature'`` (BLPA's fixed range, widened
#: per feature at 8 bits) or ``'token'`` (each token's own max |y|).
RANGES = ('feature', 'token')
#: The range used (chosen by measurement, docs/keras.md).
DEFAULT_RANGE = 'feature'
_SPAN = 3.0  # normalized half-range of BLPA's codes at offset 0


def kind_of(layer):
  """``'layernorm'``, ``'rmsnorm'`` or None (exact Keras classes only)."""
  if type(layer) is L.LayerNormalization:
    return 'layernorm'
  if hasattr(L, 'RMSNormalization') and type(layer) is L.RMSNormalization:
    return 'rmsnorm'
  return None


def reason(layer, input_tensors):
  """Why a normalization layer has no analytic backward here ('' if it
  has one)."""
  if not input_tensors:
    return 'no tensor inputs'
  shape = input_tensors[0].shape
  rank = len(shape)
  axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [
      layer.axis]
  if rank < 2 or len(axis) != 1 or axis[0] not in (-1, rank - 1):
    return f'normalizes axis {layer.axis}, not the last alone'
  if shape[-1] is None:
    return 'unknown feature count'
  return ''


def _epsilon(layer):
  return layer.epsilon if layer.epsilon is not None else \
      keras.config.epsilon()


def _weights(layer, kind):
  """``(gamma, beta)`` Keras variables (None where absent)."""
  if kind == 'rmsnorm':
    return layer.scale, None
  return layer.gamma, layer.beta


def _as_float32(layer, kind, variable):
  """A scale/offset as the layer's call uses it, in float32 (RMSNormalization
  autocasts its scale to the compute dtype first)."""
  if variable is None:
    return None
  value = tf.convert_to_tensor(raw_variable(variable))  # no autocast
  if kind == 'rmsnorm' and layer.autocast:
    value = tf.cast(value, layer.compute_dtype)
  return tf.cast(value, tf.float32)


def statistics(layer, kind, x):
  """``(y, rstd, shift)`` of an input, in float32, as the layer computes
  them: ``y`` the normalized values, ``rstd`` per token (``[..., 1]``),
  ``shift`` ``mean * rstd`` for ``rms_scaling`` (else None)."""
  x = tf.cast(x, tf.float32)
  eps = _epsilon(layer)
  if kind == 'rmsnorm':
    rstd = tf.math.rsqrt(ops.mean(ops.square(x), axis=[-1], keepdims=True)
                         + eps)
    return x * rstd, rstd, None
  mean, variance = ops.moments(x, axes=[-1], keepdims=True)
  if layer.rms_scaling:
    rstd = tf.math.rsqrt(ops.var(x, axis=[-1], keepdims=True) + eps)
    return x * rstd, rstd, mean * rstd
  rstd = tf.math.rsqrt(variance + eps)
  return (x - mean) * rstd, rstd, None


class NormCopy:
  """What a LayerNormalization/RMSNormalization keeps; also the codec of its
  output.

  Args:
    layer: the Keras layer.
    kind: ``'layernorm'`` or ``'rmsnorm'``.
    bits: 0, 4 or 8.
    x: the layer's input.
    out: the layer's output.
    code_range: one of :data:`RANGES`.
  """

  def __init__(self, layer, kind, bits, x, out, code_range=DEFAULT_RANGE):
    if code_range not in RANGES:
      raise ValueError(f'code_range must be one of {RANGES}, got '
                       f'{code_range!r}')
    self.layer, self.kind, self.bits = layer, kind, bits
    self.code_range = code_range
    self.out_dtype = tf.as_dtype(out.dtype)
    self.shape, self.static_shape = tf.shape(x), x.shape
    gamma, beta = _weights(layer, kind)
    self.gamma = _as_float32(layer, kind, gamma)
    self.beta = _as_float32(layer, kind, beta)
    if not bits:
      self.x, self.out = x, out
      return
    y, self.rstd, self.shift = statistics(layer, kind, x)
    channels = int(x.shape[-1])
    self.zero = tf.zeros([channels])
    y4 = codecs.as_4d(y)
    if code_range == 'token':
      reach = tf.reduce_max(tf.abs(y4), axis=-1, keepdims=True)
      self.cs = tf.maximum(reach / (_SPAN - 2.0 * 6.0 / 2**bits), 1e-30)
      self.codes = quant.save_act(y4 / self.cs, self.zero, bits)
    else:
      self.cs = self._widening(y4, bits)
      self.codes = quant.save_scaled_act(y4, self.cs, self.zero, bits)

  @staticmethod
  def _widening(y4, bits):
    """Per-feature divisor: ones, at 8 bits widened so that nothing is
    clipped (as BN's :func:`blpa.keras.wrappers.code_widening`)."""
    # pylint: disable=import-outside-toplevel
    from blpa.keras import wrappers
    channels = y4.shape[-1]
    widen = wrappers.code_widening(y4, tf.zeros([channels]),
                                   tf.ones([channels]), bits)
    return tf.ones([channels]) if widen is None else widen

  def tensors(self):
    """The tensors made for the copy."""
    if not self.bits:
      return []
    return [self.codes, self.rstd] + (
        [self.shift] if self.shift is not None else [])

  def normalized(self):
    """``(y, rstd, shift)``: the (restored) normalized values and the
    statistics, float32."""
    if not self.bits:
      return statistics(self.layer, self.kind, self.x)
    approx, _ = quant.restore_act(self.codes, self.zero, self.bits)
    y = tf.reshape(approx * self.cs, self.shape)
    y.set_shape(self.static_shape)
    return y, self.rstd, self.shift

  def restore(self):
    """The (approximate) output ``gamma * y + beta``, in its dtype (the
    output itself at ``bits=0``)."""
    if not self.bits:
      return self.out
    y = self.normalized()[0]
    if self.gamma is not None:
      y = y * self.gamma
    if self.beta is not None:
      y = y + self.beta
    return tf.cast(y, self.out_dtype)

  def grad(self, dout):
    """``(dx, dgamma, dbeta)`` (float32; None for an absent weight)."""
    dout = tf.cast(dout, tf.float32)
    y, rstd, shift = self.normalized()
    axes = list(range(dout.shape.rank - 1))
    dgamma = tf.reduce_sum(dout * y, axis=axes) if self.gamma is not None \
        else None
    dbeta = tf.reduce_sum(dout, axis=axes) if self.beta is not None else None
    gy = dout * self.gamma if self.gamma is not None else dout
    proj = tf.reduce_mean(gy * y, axis=-1, keepdims=True)
    if self.kind == 'rmsnorm':
      dx = rstd * (gy - y * proj)
    elif shift is not None:
      dx = rstd * (gy - (y - shift) * proj)
    else:
      dx = rstd * (gy - tf.reduce_mean(gy, axis=-1, keepdims=True) -
                   y * proj)
    return dx, dgamma, dbeta


def run_norm(layer, kind, x, bits, call=None, code_range=None):
  """A LayerNormalization/RMSNormalization as one custom gradient.

  Args:
    layer: the Keras layer.
    kind: ``'layernorm'`` or ``'rmsnorm'``.
    x: its input.
    bits: 0, 4 or 8.
    call: ``call(x)`` running the layer (default ``layer``).
    code_range: one of :data:`RANGES` (default :data:`DEFAULT_RANGE`).

  Returns:
    ``(out, copy)``: the output and its :class:`NormCopy` (the codec of
    ``out``).
  """
  # pylint: disable=import-outside-toplevel
  from blpa.keras import wrappers
  from blpa.keras.gradient import custom_op, trainable_of
  call = call or layer
  code_range = code_range or DEFAULT_RANGE
  gamma, beta = _weights(layer, kind)
  weights = trainable_of([gamma, beta])
  kept = {}

  def forward(xs):
    out = call(xs[0])
    x = wrappers.autocast_input(layer, xs[0])
    kept['copy'] = copy = NormCopy(layer, kind, bits, x, out, code_range)
    out = codecs.after(out, copy.tensors())

    def grad(douts):
      # pylint: disable=protected-access
      dx, dgamma, dbeta = wrappers._after(douts,
                                          lambda: copy.grad(douts[0]))
      by_var = {id(gamma): dgamma, id(beta): dbeta}
      weight_grads = [by_var[id(v)] for v in weights]
      return wrappers._handed_on([dx], weight_grads), weight_grads

    return out, grad

  out = custom_op(forward, [x], weights)
  return out, kept['copy']

"""Analytic backward passes of ``MultiHeadAttention`` and ``Softmax`` layers.

``keras.layers.MultiHeadAttention`` (MHA) runs as one leaf with its own
backward: the forward pass runs the layer's own sublayers and ops in
Keras's order (projections, scaled query, scores einsum, masked softmax,
dropout, combine einsum, output projection), so its output, and the dropout
mask drawn from the layer's ``SeedGenerator``, are the layer's. It keeps

- the projections' inputs, through ``copy_of`` (a shared per-tensor copy);
- K-bit per-channel codes of the scaled query, the key and the value
  (``[B, T, N, H]`` merged to ``[B, T, N*H]``: one range per head channel);
- the attention probabilities as :class:`RowCodes` (K-bit codes spanning
  ``[0, rowmax]`` of each row, zeros exact);
- the dropout mask, 1 bit per probability (packed by :mod:`blpa.masks`);
- K-bit codes of the combined heads (the output projection's input);

(at ``bits=0`` the tensors themselves), and nothing is recomputed in
backward: ``dV = Pd^T dA``, ``dPd = dA V^T``, the dropout mask, the softmax
backward ``dS = P (dP - sum(P dP))``, ``dQs = dS K``, ``dK = dS^T Qs``, and
each projection's einsum gradients. A ``Softmax`` layer (or
``Activation('softmax')``) keeps the :class:`RowCodes` of its output.
"""

import inspect
import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from blpa import masks as masks_lib, quant
from blpa.keras import codecs, einsum, wrappers
from blpa.keras.gradient import custom_op, raw_variable, trainable_of

_FLOAT_DTYPES = ('float16', 'bfloat16', 'float32')
_MASK_ARGS = ('query_mask', 'value_mask', 'key_mask')
_TINY = np.float32(1e-30)
#: Normalized offset at which the quantizer's shift is 1 (any offset >= 3):
#: code 0 then holds exactly the values <= 0, which restore to 0.
_ZERO_CODE_OFFSET = 4.0

# ---------------------------------------------------------------------------
# Compact copies of the attention's tensors.


class RowCodes:
  """``bits``-bit codes of non-negative values, scaled per row of the last
  axis so that the codes span ``[0, rowmax]`` (softmax probabilities).

  Code 0 holds exactly the zeros (masked positions restore to 0, so that
  their gradient stays 0); codes ``1 .. 2**bits - 1`` split ``(0, rowmax]``
  into equal bins, restored to their centres. The row maxima are kept in
  float32 (4 bytes per row).

  Args:
    p: float tensor, rank >= 2, values >= 0, a known last dimension.
    bits: 4 or 8.
  """

  def __init__(self, p, bits):
    self.bits = bits
    self.shape, self.static_shape = tf.shape(p), p.shape
    n = 1 << bits
    self.top = np.float32(6.0 * (n - 1) / n)
    p32 = tf.cast(p, tf.float32)
    self.rowmax = tf.maximum(tf.reduce_max(p32, axis=-1, keepdims=True),
                             _TINY)
    self.offset = tf.fill(tf.shape(p)[-1:], np.float32(_ZERO_CODE_OFFSET))
    self.codes = quant.save_act(codecs.as_4d(p32 * (self.top / self.rowmax)),
                                self.offset, bits)

  def tensors(self):
    """The tensors made for the copy."""
    return [self.codes, self.rowmax]

  def restore(self):
    """The approximate values, float32."""
    approx, _ = quant.restore_act(self.codes, self.offset, self.bits)
    approx = tf.reshape(tf.nn.relu(approx), self.shape)
    p = approx * (self.rowmax / self.top)
    p.set_shape(self.static_shape)
    return p


class _Exact32(codecs.Exact):
  """The tensor itself, restored as float32 (bits 0 of :func:`row_codec`)."""

  def restore(self):
    return tf.cast(self.x, tf.float32)


def row_codec(p, bits):
  """:class:`RowCodes` of ``p`` at bits 4/8, else ``p`` itself (restored as
  float32)."""
  return RowCodes(p, bits) if bits else _Exact32(p)


def row_codec_bytes(shape, bits, itemsize=4):
  """Bytes of :func:`row_codec` of a tensor of that (batched) shape."""
  shape = [int(d) for d in shape]
  if not bits:
    return math.prod(shape) * itemsize
  rows = math.prod(shape[:-1])
  return rows * (quant.packed_channels(shape[-1], bits) + 4)


class Heads:
  """A codec of ``[B, T, N, H]`` heads: :func:`codecs.make` of the tensor
  merged to ``[B, T, N*H]`` (a range per head channel)."""

  def __init__(self, x, bits):
    self.shape, self.static_shape = tf.shape(x), x.shape
    width = int(x.shape[-2]) * int(x.shape[-1])
    merged = tf.reshape(x, tf.concat([tf.shape(x)[:-2], [width]], 0))
    merged.set_shape(x.shape[:-2].concatenate([width]))
    self.inner = codecs.make(merged, bits)

  def tensors(self):
    """The tensors made for the copy."""
    return self.inner.tensors()

  def restore(self):
    x = tf.reshape(self.inner.restore(), self.shape)
    x.set_shape(self.static_shape)
    return x


# ---------------------------------------------------------------------------
# What is supported.

_CALL = inspect.signature(keras.layers.MultiHeadAttention.call)


def bind(args, kwargs):
  """``(query, value, key, rest)`` of a ``MultiHeadAttention`` call's
  arguments (``key`` None when not given; ``rest`` the other arguments by
  name)."""
  bound = _CALL.bind(None, *args, **kwargs).arguments
  bound.pop('self', None)
  rest = dict(bound)
  query, value = rest.pop('query'), rest.pop('value')
  key = rest.pop('key', None)
  return query, value, key, rest


def _projection_reason(dense):
  """Why an EinsumDense projection cannot take the analytic path."""
  if getattr(dense, 'activation', None) not in (
      None, keras.activations.linear):
    return f'{dense.name} has an activation'
  if getattr(dense, 'lora_enabled', False):
    return f'{dense.name}: LoRA enabled'
  if getattr(dense, 'quantization_mode', None):
    return f'{dense.name}: quantized ({dense.quantization_mode})'
  return einsum.reason(dense.equation)


def _layer_reason(layer):
  """Why a MultiHeadAttention layer's configuration is not supported."""
  if type(layer) is not keras.layers.MultiHeadAttention:
    return f'{type(layer).__name__} is not keras.layers.MultiHeadAttention'
  if not layer.built:
    return 'not built'
  if layer.compute_dtype not in _FLOAT_DTYPES:
    return f'compute dtype {layer.compute_dtype}'
  if tuple(layer._attention_axes or ()) != (1,):  # pylint: disable=protected-access
    return f'attention_axes {layer._attention_axes} (only the default)'  # pylint: disable=protected-access
  if getattr(layer, '_use_gate', False):
    return 'gated attention'
  if getattr(layer, '_flash_attention', False):
    return 'flash attention'
  if layer._output_shape is not None:  # pylint: disable=protected-access
    return 'output_shape given'
  for dense in (layer._query_dense, layer._key_dense, layer._value_dense,  # pylint: disable=protected-access
                layer._output_dense):  # pylint: disable=protected-access
    reason = _projection_reason(dense)
    if reason:
      return reason
  for equation in (layer._dot_product_equation, layer._combine_equation):  # pylint: disable=protected-access
    reason = einsum.reason(equation)
    if reason:
      return reason
  return ''


def _call_reason(layer, kwargs, tensors):
  """Why a call's arguments are not supported."""
  if kwargs.get('return_attention_scores'):
    return 'return_attention_scores=True'
  for name in _MASK_ARGS:
    if kwargs.get(name) is not None:
      return f'{name} given'
  mask = kwargs.get('attention_mask')
  if mask is not None and tf.as_dtype(mask.dtype).is_floating:
    return 'float attention_mask'
  training = kwargs.get('training')
  if layer.dropout > 0 and not isinstance(training, (bool, type(None))):
    return 'training flag is a tensor (dropout on or off not known)'
  for t in tensors:
    if t is mask:
      continue
    if not tf.as_dtype(t.dtype).is_floating:
      return f'non-float tensor argument ({tf.as_dtype(t.dtype).name})'
    if tf.as_dtype(t.dtype).name not in _FLOAT_DTYPES:
      return f'input dtype {tf.as_dtype(t.dtype).name}'
    if getattr(t, '_keras_mask', None) is not None:
      return 'input carries a Keras mask'
    if len(t.shape) != 3 or t.shape[-1] is None:
      return f'input of shape {tuple(t.shape)} (only [B, T, dim])'
  return ''


def attention_reason(layer, kwargs, tensors):
  """'' when :func:`run_attention` supports this call of a
  ``MultiHeadAttention``, else a short reason (for ``blpa.keras.report``).

  Args:
    layer: the layer.
    kwargs: the call's keyword arguments.
    tensors: the call's tensor arguments (float inputs; a functional node's
      list also holds its ``attention_mask``).
  """
  return _layer_reason(layer) or _call_reason(layer, kwargs, tensors)


def softmax_reason(layer, kwargs, tensors):
  """'' when :func:`run_softmax` supports this call of a ``Softmax`` or
  ``Activation('softmax')`` layer, else the reason (None when the layer is
  neither)."""
  if type(layer) is keras.layers.Softmax:
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else \
        [layer.axis]
  elif type(layer) is keras.layers.Activation and \
      layer.activation is keras.activations.softmax:
    axes = [-1]
  else:
    return None
  if kwargs.get('mask') is not None or any(
      getattr(t, '_keras_mask', None) is not None for t in tensors):
    return 'masked softmax'
  if len(tensors) != 1:
    return 'several tensor arguments'
  x = tensors[0]
  rank = len(x.shape)
  if len(axes) != 1 or axes[0] not in (-1, rank - 1):
    return f'softmax over axis {layer.axis} (only the last)'
  if rank < 2 or x.shape[-1] is None:
    return f'input of shape {tuple(x.shape)}'
  if tf.as_dtype(x.dtype).name not in _FLOAT_DTYPES or \
      layer.compute_dtype not in _FLOAT_DTYPES:
    return f'dtype {tf.as_dtype(x.dtype).name}'
  return ''


# ---------------------------------------------------------------------------
# MultiHeadAttention.


def _projections(layer):
  """The query, key, value and output EinsumDense sublayers."""
  return (layer._query_dense, layer._key_dense, layer._value_dense,  # pylint: disable=protected-access
          layer._output_dense)  # pylint: disable=protected-access


def _dense_backward(dense, x_codec, kernel, d):
  """``(dx, {id(variable): grad})`` of an EinsumDense from its output's
  gradient ``d`` (``x_codec`` None when its kernel is frozen)."""
  grads = {}
  trained = dense.kernel.trainable and x_codec is not None
  x = tf.cast(x_codec.restore(), d.dtype) if trained else None
  dx, dk = einsum.grads(dense.equation, x, kernel, d)
  if trained:
    grads[id(dense.kernel)] = dk
  if dense.bias is not None and dense.bias.trainable:
    grads[id(dense.bias)] = einsum.bias_grad(d, dense.bias.shape)
  return dx, grads


def _distinct(query, value, key):
  """``(xs, roles)``: the distinct input tensors and, for query, value and
  key, the index of theirs in ``xs`` (a tensor given twice is one input:
  its gradient is the sum over its uses)."""
  xs, roles = [], []
  for t in (query, value, value if key is None else key):
    for i, seen in enumerate(xs):
      if seen is t:
        roles.append(i)
        break
    else:
      roles.append(len(xs))
      xs.append(t)
  return xs, roles


def dropout_on(layer, kwargs):
  """Whether the call drops attention probabilities."""
  return layer.dropout > 0 and kwargs.get('training') is True


def run_attention(layer, query, value, key, kwargs, copy_of, bits):
  """One call of a ``MultiHeadAttention`` with an analytic backward.

  Args:
    layer: the layer (:func:`attention_reason` gave '').
    query, value, key: the call's tensors (``key`` None: the value).
    kwargs: the call's other arguments (``attention_mask``,
      ``use_causal_mask``, ``training``; masks None).
    copy_of: ``copy_of(tensor)``: the shared compact copy of an input.
    bits: 0, 4 or 8.

  Returns:
    The layer's output.
  """
  xs, roles = _distinct(query, value, key)
  denses = _projections(layer)
  dtype = tf.as_dtype(layer.compute_dtype)
  # The copy of an input is kept when a trained kernel reads it.
  needed = {roles[i] for i, dense in enumerate(denses[:3])
            if dense.kernel.trainable}
  kept_in = [copy_of(x) if i in needed else None for i, x in enumerate(xs)]
  variables = [v for dense in denses
               for v in (dense.kernel, dense.bias) if v is not None]
  weights = trainable_of(variables)
  training = kwargs.get('training') is True
  drop = dropout_on(layer, kwargs)

  def forward(xs):
    q_in, v_in, k_in = (xs[r] for r in roles)
    mask = layer._compute_attention_mask(  # pylint: disable=protected-access
        q_in, v_in, attention_mask=kwargs.get('attention_mask'),
        use_causal_mask=bool(kwargs.get('use_causal_mask')))
    q = layer._query_dense(q_in)  # pylint: disable=protected-access
    k = layer._key_dense(k_in)  # pylint: disable=protected-access
    v = layer._value_dense(v_in)  # pylint: disable=protected-access
    scale = layer._inverse_sqrt_key_dim  # pylint: disable=protected-access
    qs = ops.multiply(q, ops.cast(scale, q.dtype))
    scores = ops.einsum(layer._dot_product_equation, k, qs)  # pylint: disable=protected-access
    p = layer._masked_softmax(scores, mask)  # pylint: disable=protected-access
    pd = layer._dropout_layer(p, training=training) if layer.dropout > 0 \
        else p  # pylint: disable=protected-access
    a = ops.einsum(layer._combine_equation, pd, v)  # pylint: disable=protected-access
    out = layer._output_dense(a)  # pylint: disable=protected-access
    kept = dict(qs=Heads(qs, bits), k=Heads(k, bits), v=Heads(v, bits),
                p=row_codec(p, bits),
                a=Heads(a, bits) if denses[3].kernel.trainable else None)
    packed = masks_lib.pack(tf.not_equal(pd, 0))[0] if drop else None
    made = [t for c in kept.values() if c is not None for t in c.tensors()]
    made += [t for c in kept_in if c is not None for t in c.tensors()]
    out = codecs.after(out, made + [packed])
    kernels = [tf.cast(tf.convert_to_tensor(raw_variable(d.kernel)), dtype)
               for d in denses]

    def grad(douts):
      dout = tf.cast(douts[0], dtype)
      dxs, by_var = wrappers._after(douts, lambda: _attention_grads(  # pylint: disable=protected-access
          layer, dout, kept, kept_in, roles, kernels, packed, len(xs)))
      weight_grads = [by_var.get(id(v)) for v in weights]
      return wrappers._handed_on(dxs, weight_grads), weight_grads  # pylint: disable=protected-access

    return out, grad

  return custom_op(forward, xs, weights)


def softmax_grad(p, dp):
  """``p * (dp - sum(p * dp))`` over the last axis (float32)."""
  return p * (dp - tf.reduce_sum(p * dp, axis=-1, keepdims=True))


def _attention_grads(layer, dout, kept, kept_in, roles, kernels, packed,
                     count):
  """``(input gradients, {id(variable): grad})`` of one attention call."""
  q_dense, k_dense, v_dense, o_dense = _projections(layer)
  dtype = dout.dtype
  by_var = {}
  da, grads = _dense_backward(o_dense, kept['a'], kernels[3], dout)
  by_var.update(grads)
  scale = 1.0 / (1.0 - layer.dropout) if packed is not None else 1.0
  p = kept['p'].restore()
  pd = tf.cast(p, dtype)
  if packed is not None:
    pd = masks_lib.select(pd, packed, scale)
  dpd, dv = einsum.grads(layer._combine_equation, pd,  # pylint: disable=protected-access
                         tf.cast(kept['v'].restore(), dtype), da)
  if packed is not None:
    dpd = masks_lib.select(dpd, packed, scale)
  ds = tf.cast(softmax_grad(p, tf.cast(dpd, tf.float32)), dtype)
  dk, dqs = einsum.grads(layer._dot_product_equation,  # pylint: disable=protected-access
                         tf.cast(kept['k'].restore(), dtype),
                         tf.cast(kept['qs'].restore(), dtype), ds)
  dq = dqs * tf.cast(layer._inverse_sqrt_key_dim, dtype)  # pylint: disable=protected-access
  dxs = [None] * count
  for dense, d, kernel, role in ((q_dense, dq, kernels[0], roles[0]),
                                 (v_dense, dv, kernels[2], roles[1]),
                                 (k_dense, dk, kernels[1], roles[2])):
    dx, grads = _dense_backward(dense, kept_in[role], kernel, d)
    by_var.update(grads)
    dxs[role] = dx if dxs[role] is None else dxs[role] + dx
  return dxs, by_var


def kept_bytes(layer, query_shape, value_shape, bits, dropout):
  """Bytes that :func:`run_attention` keeps besides its inputs' copies.

  Args:
    layer: the MultiHeadAttention.
    query_shape, value_shape: batched shapes ``[B, T, dim]``, ``[B, S,
      dim]``.
    bits: 0, 4 or 8.
    dropout: whether the call drops probabilities (a 1-bit mask is kept).
  """
  batch, t = int(query_shape[0]), int(query_shape[1])
  s = int(value_shape[1])
  heads, hk = layer.num_heads, layer.key_dim
  hv = layer.value_dim or hk
  itemsize = tf.as_dtype(layer.compute_dtype).size
  size = 0
  shapes = [[batch, t, heads * hk], [batch, s, heads * hk],
            [batch, s, heads * hv]]
  if layer._output_dense.kernel.trainable:  # pylint: disable=protected-access
    shapes.append([batch, t, heads * hv])
  for shape in shapes:
    size += codecs.copy_bytes(shape, bits, itemsize) * batch
  probs = [batch, heads, t, s]
  size += row_codec_bytes(probs, bits, itemsize)
  if dropout:
    size += -(-math.prod(probs) // 8)
  return size


# ---------------------------------------------------------------------------
# Softmax layers.


def run_softmax(layer, x, bits, call=None):
  """A ``Softmax`` (or ``Activation('softmax')``) layer over the last axis
  with an analytic backward: keeps the :func:`row_codec` of its output;
  ``dx = P (dP - sum(P dP))``, plus the gradient of the logits the output
  carries (Keras's crossentropy differentiates those).

  Args:
    layer: the layer (:func:`softmax_reason` gave '').
    x: its input.
    bits: 0, 4 or 8.
    call: ``call(x)`` running the layer (default ``layer``).
  """
  call = call or layer

  def forward(xs):
    out = call(xs[0])
    copy = row_codec(out, bits)
    out = codecs.after(out, copy.tensors())
    dtype, shape = out.dtype, tf.shape(out)

    def grad(douts):
      def compute():
        dx = None
        if douts[0] is not None:
          p = copy.restore()
          dx = tf.cast(softmax_grad(p, tf.cast(douts[0], tf.float32)), dtype)
        for dlogits in douts[1:]:
          if dlogits is not None:
            dlogits = tf.cast(dlogits, dtype)
            dx = dlogits if dx is None else dx + dlogits
        return dx if dx is not None else tf.zeros(shape, dtype)
      return [wrappers._after(douts, compute)], []  # pylint: disable=protected-access

    return out, grad

  return custom_op(forward, [x], logits=True)

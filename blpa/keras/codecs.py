"""Compact copies of activations kept for the backward pass.

A codec is made in the forward pass from a tensor and gives back, in the
backward pass, the tensor itself (:class:`Exact`, ``bits=0``) or an
approximation of it (:class:`MinMax`: ``bits`` per value, per-channel
minimum and maximum). Boolean masks (ReLU, Dropout) are packed eight to a
byte by :mod:`blpa.masks`. The K-bit codes are those of :mod:`blpa.quant`
(native ops when built, else its pure-TF fallback).

Every codec here also restores a slice of the batch, ``restore_rows(start,
stop)`` (rows ``start:stop`` of the first axis, equal to
``restore()[start:stop]``) without making the whole tensor: the codes are
``[N, ...]`` like the tensor, so a slice of the codes restores a slice of
the tensor. A Conv2D's kernel gradient uses it to run over the batch in
chunks (:func:`blpa.keras.backward.conv2d_chunked`).
"""

import math

import numpy as np
import tensorflow as tf

from blpa import quant


def as_4d(x):
  """``x`` reshaped to ``[N, H, W, C]`` for the quantization ops.

  Rank 2 ``[N, C]`` becomes ``[N, 1, 1, C]``; rank 3 ``[N, T, C]`` becomes
  ``[N, 1, T, C]``; rank 5 and more merge the middle dimensions.
  """
  rank = x.shape.rank
  if rank == 4:
    return x
  shape = tf.shape(x)
  middle = tf.reduce_prod(shape[1:-1]) if rank > 2 else 1
  return tf.reshape(x, tf.stack([shape[0], 1, middle, shape[-1]]))


def quantizable(x):
  """Whether :class:`MinMax` can copy a tensor (float, rank >= 2, known C)."""
  shape = tf.TensorShape(x.shape)
  return (tf.as_dtype(x.dtype).is_floating and shape.rank is not None and
          shape.rank >= 2 and shape[-1] is not None and shape[-1] > 0)


class Exact:
  """Keeps the tensor itself (one full-precision reference)."""

  bits = 0

  def __init__(self, x):
    self.x = x

  def restore(self):
    return self.x

  def restore_rows(self, start, stop):
    """Rows ``start:stop`` of the batch (a slice of the tensor)."""
    return self.x[start:stop]

  def tensors(self):
    """The tensors made for the copy (none: it is the tensor itself)."""
    return []


class MinMax:
  """``bits``-bit codes with per-channel minimum and maximum.

  Per channel, values are mapped affinely onto ``[-3, 3]`` (the quantizer's
  range at offset 0) and stored as :func:`blpa.quant.save_act` codes; the
  restore returns bin centres, at most half a bin (``range / 2**bits / 2``)
  from the original value.

  Args:
    x: float tensor of rank >= 2 with a known last dimension.
    bits: 4 or 8.
  """

  def __init__(self, x, bits):
    self.bits = bits
    self.shape = tf.shape(x)
    self.static_shape = x.shape
    self.dtype = x.dtype
    x4 = tf.cast(as_4d(x), tf.float32)
    lo = tf.reduce_min(x4, axis=[0, 1, 2])
    hi = tf.reduce_max(x4, axis=[0, 1, 2])
    self.mid = (lo + hi) / 2
    self.half = tf.maximum((hi - lo) / 2, np.float32(1e-30))
    self.zero = tf.zeros_like(lo)
    self.codes = quant.save_act((x4 - self.mid) * (3.0 / self.half), self.zero,
                                bits)

  def tensors(self):
    """The tensors made for the copy."""
    return [self.codes]

  def restore(self):
    approx, _ = quant.restore_act(self.codes, self.zero, self.bits)
    x = tf.reshape(approx * (self.half / 3.0) + self.mid, self.shape)
    x = tf.cast(x, self.dtype)
    x.set_shape(self.static_shape)
    return x

  def restore_rows(self, start, stop):
    """Rows ``start:stop`` of the batch, restored from those rows'
    codes only."""
    approx, _ = quant.restore_act(self.codes[start:stop], self.zero,
                                  self.bits)
    x = tf.reshape(approx * (self.half / 3.0) + self.mid,
                   rows_shape(self.shape, start, stop))
    x = tf.cast(x, self.dtype)
    x.set_shape(tf.TensorShape([None]).concatenate(self.static_shape[1:]))
    return x


class Zeros:
  """Keeps only a tensor's shape and dtype; restores zeros (the input of an
  op whose gradient does not depend on its input's values)."""

  bits = 0

  def __init__(self, x):
    self.shape, self.dtype, self.static_shape = tf.shape(x), x.dtype, x.shape

  def restore(self):
    x = tf.zeros(self.shape, self.dtype)
    x.set_shape(self.static_shape)
    return x

  def restore_rows(self, start, stop):
    """Zeros of rows ``start:stop``."""
    return tf.zeros(rows_shape(self.shape, start, stop), self.dtype)

  def tensors(self):
    return []


class Padded:
  """The copy of a ZeroPadding2D output: its input's copy, padded again on
  restore (the zeros cost nothing, and a BN+ReLU's codes serve the padded
  tensor too).

  Args:
    inner: the codec of the padding layer's input.
    padding: ``((top, bottom), (left, right))`` (channels_last).
  """

  def __init__(self, inner, padding):
    self.inner = inner
    self.bits = inner.bits
    (top, bottom), (left, right) = padding
    self.paddings = [[0, 0], [top, bottom], [left, right], [0, 0]]

  def restore(self):
    return tf.pad(self.inner.restore(), self.paddings)

  def restore_rows(self, start, stop):
    """Rows ``start:stop`` of the padded tensor."""
    return tf.pad(self.inner.restore_rows(start, stop), self.paddings)

  def tensors(self):
    """The inner copy's tensors."""
    return self.inner.tensors()


def restores_rows(codec):
  """Whether ``codec`` (and any codec it wraps, ``.inner``) restores slices
  of the batch (``restore_rows``)."""
  while codec is not None:
    if not callable(getattr(codec, 'restore_rows', None)):
      return False
    codec = getattr(codec, 'inner', None)
  return True


def rows_shape(shape, start, stop):
  """``shape`` (an int32 shape) with its first dimension ``stop - start``."""
  return tf.concat([tf.reshape(stop - start, [1]), shape[1:]], 0)


def make(x, bits):
  """A codec of ``x``: :class:`Exact` at ``bits=0`` (or when ``x`` cannot be
  quantized), else :class:`MinMax`."""
  if bits and quantizable(x):
    return MinMax(x, bits)
  return Exact(x)


def after(outputs, tensors):
  """``outputs`` made to wait for ``tensors`` (the copies a layer keeps), so
  that the next layer starts only once the full-size values the copies were
  made from can be freed."""
  tensors = [t for t in tensors if t is not None]
  if not tensors:
    return outputs
  with tf.control_dependencies(tensors):
    return tf.nest.map_structure(_identity, outputs)


def _identity(t):
  """``tf.identity`` that keeps the logits a softmax output carries."""
  out = tf.identity(t)
  logits = getattr(t, '_keras_logits', None)
  if logits is not None:
    out._keras_logits = logits  # pylint: disable=protected-access
  return out


# ---------------------------------------------------------------------------
# Bytes kept, per example, from static shapes (for the report).


def _per_example(shape):
  return math.prod(int(d) for d in shape[1:])


def copy_bytes(shape, bits, itemsize=4):
  """Bytes per example of a codec of a tensor of that (batched) shape."""
  if not bits or len(shape) < 2:
    return _per_example(shape) * itemsize
  channels = int(shape[-1])
  pixels = _per_example(shape) // max(channels, 1)
  return pixels * quant.packed_channels(channels, bits)


def mask_bytes(shape):
  """Bytes per example of a packed mask (rounded up to whole bytes)."""
  return -(-_per_example(shape) // 8)

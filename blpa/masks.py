"""Boolean masks packed one bit per value, and gradients masked by them.

The compressed Keras layers (:mod:`blpa.keras`) keep a 1-bit mask for the
backward pass of a ReLU (and of ReLU6's upper bound), a Dropout and a max
pool with non-overlapping windows:

- :func:`pack`: a boolean tensor as uint8 ``[ceil(n/8)]``, value ``8i + j``
  in bit ``j`` (weight ``2**j``) of byte ``i``.
- :func:`select`: ``tf.where(mask, x * scale, 0.0)`` from the packed mask.
- :func:`unpack`: the boolean tensor back.

On the CPU, :func:`pack` and :func:`select` run the native ops
``BlpaPackMask`` and ``BlpaMaskedSelect`` (``ops/mask_*.cc``), which read
the packed bits directly: no full-size boolean or integer temporary in
either pass. Without the native library (or with ``BLPA_PY_OPS=1``), when
a GPU is present (the ops have no GPU kernels), or for a ``select`` of a
tensor that is not float32, the same values come from TensorFlow ops.
"""

import tensorflow as tf

from blpa import native

__all__ = ["pack", "unpack", "select", "backend"]

_BIT_WEIGHTS = tf.constant([1, 2, 4, 8, 16, 32, 64, 128], tf.uint8)


def _lib():
  """The native library, if it has the ops and no GPU is present."""
  return native.cpu_library_with("blpa_pack_mask")


def backend():
  """``"native"`` when :func:`pack` and :func:`select` run the native ops,
  else ``"python"``."""
  return "native" if _lib() is not None else "python"


def pack(mask):
  """Packs a boolean tensor eight values to a byte.

  Args:
    mask: boolean tensor of any shape.

  Returns:
    ``(packed, shape)``: uint8 ``[ceil(n/8)]`` and the int32 shape of
    ``mask``.

  Raises:
    ValueError: ``mask`` is not boolean.
  """
  mask = tf.convert_to_tensor(mask)
  if mask.dtype != tf.bool:
    raise ValueError(f"pack: needs a boolean tensor, got dtype "
                     f"{mask.dtype.name}")
  shape = tf.shape(mask)
  lib = _lib()
  if lib is not None:
    return lib.blpa_pack_mask(mask), shape
  flat = tf.cast(tf.reshape(mask, [-1]), tf.uint8)
  flat = tf.pad(flat, [[0, (-tf.size(flat)) % 8]])
  # Distinct powers of two: the sum is the bitwise or, and fits a byte.
  return tf.reduce_sum(tf.reshape(flat, [-1, 8]) * _BIT_WEIGHTS, axis=1), shape


def unpack(packed, shape):
  """Inverse of :func:`pack`: the boolean tensor of that shape."""
  bits = tf.bitwise.bitwise_and(packed[:, None], _BIT_WEIGHTS) > 0
  flat = tf.reshape(bits, [-1])[:tf.reduce_prod(shape)]
  return tf.reshape(flat, shape)


def select(x, packed, scale=1.0):
  """``x * scale`` where the packed mask is set, ``+0.0`` elsewhere.

  Args:
    x: float tensor, the shape the mask was packed from.
    packed: uint8 ``[ceil(n/8)]`` from :func:`pack`.
    scale: Python float.

  Returns:
    A tensor of ``x``'s shape and dtype.

  Raises:
    ValueError: ``packed`` is not a uint8 vector, or (statically known) its
      length is not ``ceil(n/8)``.
  """
  x = tf.convert_to_tensor(x)
  packed = tf.convert_to_tensor(packed)
  if packed.dtype != tf.uint8 or packed.shape.rank not in (None, 1):
    raise ValueError(f"select: packed must be a uint8 vector, got "
                     f"{packed.dtype.name} of shape {packed.shape}")
  n = x.shape.num_elements()
  if n is not None and packed.shape[0] is not None and \
      packed.shape[0] != -(-n // 8):
    raise ValueError(f"select: packed has {packed.shape[0]} bytes but x of "
                     f"shape {x.shape} needs ceil({n}/8) = {-(-n // 8)}")
  lib = _lib()
  if lib is not None and x.dtype == tf.float32:
    return lib.blpa_masked_select(x, packed, scale=float(scale))
  scaled = x * tf.cast(scale, x.dtype) if scale != 1.0 else x
  return tf.where(unpack(packed, tf.shape(x)), scaled, tf.zeros([], x.dtype))

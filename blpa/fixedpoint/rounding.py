"""Rounding to the fixed-point format Q(bd.ad), native op and pure-TF fallback.

``bd`` bits before the binary point, the sign bit included, ``ad`` after it
(``bd >= 1``, ``ad >= 0``, ``bd + ad <= 24``). Step ``2^-ad``; symmetric
saturation at ``MAXVAL = 2^(bd-1) - 2^-ad``. With ``S = 2^ad`` and the
integer ``M = MAXVAL * S``:

* deterministic: ``t = min(|x|·S, M)``, ``f = floor(t) + (t - floor(t) >= 0.5)``,
  ``q = ±f / S`` (C's ``round``: halves away from zero, unlike ``tf.round``);
* stochastic: ``t = clip(x·S, -M, M)``,
  ``f = floor(t) + ((t - floor(t)) + U >= 1)``, ``q = f / S``, so that
  ``E[q] = x`` inside the range.

Clamping to the integer ``M`` first equals rounding then saturating. NaN
stays NaN, ±inf saturate to ±MAXVAL, ``-0.0`` is never produced.

``U`` is a counter-based hash of the seed and the flat element index ``i``
(mod 2^32), computed identically by the C++/CUDA kernels
(``ops/fixedpoint_common.h``) and here with ``tf.bitwise`` on uint32::

  fmix32(h): h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35;
             h ^= h >> 16                      (murmur3's finalizer)
  k1 = fmix32(lo32(seed) ^ 0x9E3779B9); k2 = fmix32(hi32(seed) ^ k1 ^ 0x7F4A7C15)
  U  = (fmix32(fmix32(i ^ k1) ^ k2) >> 8) · 2^-24

so the native op and the fallback give the same bits for the same seed.
Without a seed, each call draws a fresh one from a ``tf.random.Generator``.

Faults of the reference (ADaPTION) not copied: its CPU "stochastic" rounding
drew ``rand()/RAND_MAX`` in integer division (so it was ``floor``); its GPU
kernel lacked a ``break`` after the deterministic case (out-of-place rounding
was always stochastic); before 2016-11 ``bd`` excluded the sign bit.
"""

import threading

import numpy as np
import tensorflow as tf

from blpa import native

__all__ = ["round_fixed", "check_format", "max_value", "ROUNDINGS",
           "MAX_WORD_BITS"]

ROUNDINGS = ("deterministic", "stochastic")
MAX_WORD_BITS = 24

try:
  # dx = dy (straight through); the seed gets no gradient.
  tf.RegisterGradient("BlpaRoundFixed")(lambda op, dy: [dy, None])
except KeyError:  # already registered (module reloaded)
  pass

_generator_lock = threading.Lock()
_generator = None


def _is_int(value):
  return (isinstance(value, (int, np.integer)) and
          not isinstance(value, (bool, np.bool_)))


def check_format(bd, ad):
  """Validates a Q(bd.ad) format.

  Args:
    bd: bits before the binary point, sign bit included (int >= 1).
    ad: bits after the binary point (int >= 0).

  Returns:
    ``(bd, ad)`` as Python ints.

  Raises:
    ValueError: not ints, bd < 1, ad < 0 or bd + ad > 24.
  """
  if not _is_int(bd) or not _is_int(ad):
    raise ValueError(f"fixed-point format Q(bd.ad) needs integer bd and ad, "
                     f"got bd={bd!r}, ad={ad!r}")
  bd, ad = int(bd), int(ad)
  if bd < 1:
    raise ValueError(f"bd (bits before the binary point, sign included) must "
                     f"be >= 1, got {bd}")
  if ad < 0:
    raise ValueError(f"ad (bits after the binary point) must be >= 0, got {ad}")
  if bd + ad > MAX_WORD_BITS:
    raise ValueError(f"word length bd + ad must be <= {MAX_WORD_BITS} (exact "
                     f"in float32), got Q{bd}.{ad} ({bd + ad} bits)")
  return bd, ad


def _check_rounding(rounding):
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
  return rounding


def max_value(bd, ad):
  """``MAXVAL = 2^(bd-1) - 2^-ad``, the largest magnitude of Q(bd.ad)."""
  bd, ad = check_format(bd, ad)
  return 2.0**(bd - 1) - 2.0**-ad


def _as_float32(x):
  """x as a float32 tensor and its original dtype; refuses non-floats."""
  x = tf.convert_to_tensor(x, dtype_hint=tf.float32)
  if not x.dtype.is_floating:
    raise ValueError(f"round_fixed needs a float tensor, got dtype "
                     f"{x.dtype.name}")
  return (x if x.dtype == tf.float32 else tf.cast(x, tf.float32)), x.dtype


def _fresh_seed():
  """A new int64 seed per call (a stateful op, so also in tf.function)."""
  global _generator
  with _generator_lock:
    if _generator is None:
      with tf.init_scope():
        _generator = tf.random.Generator.from_non_deterministic_state()
  return _generator.uniform_full_int([], dtype=tf.int64)


def _seed_tensor(seed):
  if seed is None:
    return _fresh_seed()
  if _is_int(seed):  # taken mod 2^64, as a two's-complement int64
    value = int(seed) & ((1 << 64) - 1)
    return tf.constant(value - (1 << 64) if value >= 1 << 63 else value,
                       tf.int64)
  seed = tf.convert_to_tensor(seed)
  if not seed.dtype.is_integer:
    raise ValueError(f"seed must be an int or an integer scalar tensor, got "
                     f"dtype {seed.dtype.name}")
  if seed.shape.rank not in (None, 0):
    raise ValueError(f"seed must be a scalar, got shape {seed.shape}")
  return seed


# ---------------------------------------------------------------------------
# Pure-TF fallback: the float32 operations of ops/fixedpoint_common.h in the
# same order.


def _u32(value):
  return tf.constant(value, tf.uint32)


def _fmix32(h):
  h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, _u32(16)))
  h = h * _u32(0x85EBCA6B)
  h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, _u32(13)))
  h = h * _u32(0xC2B2AE35)
  return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, _u32(16)))


def _keys(seed):
  """``(k1, k2)`` uint32 scalars of an int64 seed."""
  lo = tf.cast(seed, tf.uint32)  # wraps: the low 32 bits
  hi = tf.cast(tf.bitwise.right_shift(seed, tf.constant(32, tf.int64)),
               tf.uint32)
  k1 = _fmix32(tf.bitwise.bitwise_xor(lo, _u32(0x9E3779B9)))
  k2 = _fmix32(tf.bitwise.bitwise_xor(tf.bitwise.bitwise_xor(hi, k1),
                                      _u32(0x7F4A7C15)))
  return k1, k2


def uniform_tf(shape, seed):
  """The U of stochastic rounding for a tensor of this shape (pure TF).

  Args:
    shape: the tensor's shape (int32 vector).
    seed: int64 scalar.

  Returns:
    float32 tensor of that shape, values ``k·2^-24`` in [0, 1).
  """
  k1, k2 = _keys(seed)
  index = tf.cast(tf.range(tf.reduce_prod(tf.cast(shape, tf.int64))),
                  tf.uint32)
  h = _fmix32(tf.bitwise.bitwise_xor(_fmix32(tf.bitwise.bitwise_xor(index, k1)),
                                     k2))
  u = tf.cast(tf.bitwise.right_shift(h, _u32(8)), tf.float32) * np.float32(
      2.0**-24)
  return tf.reshape(u, shape)


def _round_tf(x, bd, ad, rounding, seed):
  scale = np.float32(2.0**ad)
  inv_scale = np.float32(2.0**-ad)
  max_code = np.float32(2.0**(bd - 1 + ad) - 1)
  if rounding == "deterministic":
    t = tf.abs(x) * scale
    t = tf.where(t > max_code, max_code, t)
    r = tf.floor(t)
    r = r + tf.where(t - r >= np.float32(0.5), np.float32(1), np.float32(0))
    y = r * inv_scale
    y = tf.where(x < 0, np.float32(0) - y, y)
  else:
    t = x * scale
    t = tf.where(t > max_code, max_code, t)
    t = tf.where(t < -max_code, -max_code, t)
    r = tf.floor(t)
    u = uniform_tf(tf.shape(x), tf.cast(seed, tf.int64))
    r = r + tf.where((t - r) + u >= np.float32(1), np.float32(1),
                     np.float32(0))
    y = r * inv_scale
  return tf.where(tf.math.is_nan(x), x, y)


def _round_tf_ste(x, bd, ad, rounding, seed):
  """The fallback with the straight-through gradient of the native op."""

  @tf.custom_gradient
  def run(x):
    return _round_tf(x, bd, ad, rounding, seed), lambda dy: dy

  return run(x)


# ---------------------------------------------------------------------------
# Public op.


def round_fixed(x, bd, ad, rounding="deterministic", seed=None):
  """Rounds ``x`` to the fixed-point format Q(bd.ad), with saturation.

  Differentiable with a straight-through gradient (``dx = dy``, no
  saturation mask).

  Args:
    x: float tensor, any shape (non-float32 floats are computed in float32
      and cast back).
    bd: bits before the binary point, sign bit included (int >= 1).
    ad: bits after the binary point (int >= 0); ``bd + ad <= 24``.
    rounding: ``'deterministic'`` (to nearest, halves away from zero) or
      ``'stochastic'`` (``floor(x·2^ad + U)``).
    seed: stochastic only: an int or int64 scalar tensor (same seed, same
      result, native or fallback); None draws a fresh seed per call.

  Returns:
    Tensor of x's shape and dtype, on the grid ``k·2^-ad`` with
    ``|k·2^-ad| <= MAXVAL``; NaN where x is NaN.

  Raises:
    ValueError: invalid format, rounding, seed or a non-float x.
  """
  bd, ad = check_format(bd, ad)
  rounding = _check_rounding(rounding)
  x, dtype = _as_float32(x)
  if rounding == "stochastic":
    seed = tf.cast(_seed_tensor(seed), tf.int64)
  else:
    seed = tf.constant(0, tf.int64)
  lib = native.library()
  if lib is not None:
    y = lib.blpa_round_fixed(x, seed, bd=bd, ad=ad, rounding=rounding)
  else:
    y = _round_tf_ste(x, bd, ad, rounding, seed)
  return y if dtype == tf.float32 else tf.cast(y, dtype)

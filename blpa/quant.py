"""Activation quantization for Backprop with Approximate Activations.

The forward pass is exact; each layer keeps only an ``nbits``-bit copy
(``nbits`` in {4, 8}) of its activation for the backward pass.

With ``n = 2**nbits`` bins of width ``6/n`` and ``S = float32(n/6)``:

* per channel with offset ``c``: ``shift = clamp(n/2 - floor(c*S), 1, n)``
(the upper clamp keeps the int conversion defined and changes nothing
while ``shift < n``; a NaN offset gives ``shift = 1``; a subnormal offset
counts as 0),
* per activation ``a``: ``q = clip(floor((a - 1e-6) * S) + shift, 0, n-1)``
(float32 subtract, then float32 multiply; a NaN activation gives ``q = 0``),
* restore: ``approx = (float(q - shift) + 0.5) * (6/n)``,
``mask = (q >= shift)``, which equals ``approx > 0``.

Codes are uint8 ``[N,H,W,B]`` with ``B = ceil(C*nbits/8)``. For 8 bits byte
``k`` holds channel ``k``; for 4 bits byte ``k`` holds channel ``2k`` in its
low nibble and channel ``2k+1`` in its high nibble (0 for odd ``C``).

The ops come from the native library ``blpa/_quant_ops.so`` (built by
``bash make.sh``), loaded on first use; ``BLPA_QUANT_SO`` names another path.
When it cannot be loaded, or ``BLPA_PY_OPS=1`` is set, a pure-TF fallback
that gives bit-identical results is used.
"""

import numpy as np
import tensorflow as tf

from blpa import native

__all__ = [
    "save_act",
    "save_scaled_act",
    "restore_act",
    "packed_channels",
    "compact_bytes",
    "backend",
]

_NBITS = (4, 8)
_EPS = np.float32(1e-6)
_FLT_MIN = np.finfo(np.float32).tiny  # smallest normal float32

for _op in ("BlpaSaveAct", "BlpaSaveScaledAct", "BlpaRestoreAct"):
  try:
    tf.no_gradient(_op)
  except KeyError:  # already registered (module reloaded)
    pass

# The library is shared with the package's other native ops (blpa.native).
_so_path = native.so_path
_native_lib = native.library
_reset_for_tests = native.reset_for_tests
backend = native.backend


def _check_nbits(nbits):
  if isinstance(nbits,
                (bool, np.bool_)) or not isinstance(nbits, (int, np.integer)):
    raise ValueError(f"nbits must be 4 or 8, got {nbits!r}")
  if int(nbits) not in _NBITS:
    raise ValueError(f"nbits must be 4 or 8, got {int(nbits)}")
  return int(nbits)


def packed_channels(channels, nbits):
  """Bytes of codes per pixel.

  Args:
    channels: number of channels C (int >= 0).
    nbits: 4 or 8.

  Returns:
    ``ceil(channels * nbits / 8)`` as an int.
  """
  nbits = _check_nbits(nbits)
  channels = int(channels)
  if channels < 0:
    raise ValueError(f"channels must be >= 0, got {channels}")
  return (channels * nbits + 7) // 8


def compact_bytes(shape, nbits):
  """Bytes of the codes that ``save_act`` keeps for an activation shape.

  Args:
    shape: activation shape ``[N, H, W, C]`` (list, tuple or fully known
      ``tf.TensorShape``).
    nbits: 4 or 8.

  Returns:
    ``N * H * W * packed_channels(C, nbits)`` as an int.
  """
  dims = tf.TensorShape(shape)
  if dims.rank != 4 or not dims.is_fully_defined():
    raise ValueError(f"shape must be a fully known [N,H,W,C], got {dims}")
  n, h, w, c = dims.as_list()
  return n * h * w * packed_channels(c, nbits)


# ---------------------------------------------------------------------------
# Python-side validation (static shapes only; the kernels check the rest).


def _check_rank(tensor, rank, name):
  if tensor.shape.rank is not None and tensor.shape.rank != rank:
    layout = "[N,H,W,C]" if rank == 4 else "[C]"
    raise ValueError(f"{name} must have rank {rank} {layout}, got rank "
                     f"{tensor.shape.rank} (shape {tensor.shape})")


def _check_common(data, offset, name):
  """Checks ranks and C >= 1; returns the static C or None."""
  _check_rank(data, 4, name)
  _check_rank(offset, 1, "offset")
  channels = offset.shape[0] if offset.shape.rank == 1 else None
  if channels == 0:
    raise ValueError(
        "the number of channels C (length of offset) must be >= 1, got 0")
  return channels


def _as_float32(act):
  act = tf.convert_to_tensor(act, dtype_hint=tf.float32)
  if act.dtype == tf.float32:
    return act
  if not act.dtype.is_floating:
    raise ValueError(f"act must be a float tensor, got dtype {act.dtype.name}")
  return tf.cast(act, tf.float32)


# ---------------------------------------------------------------------------
# Pure-TF fallback: the float32 operations of ops/quant_common.h in the same
# order, with the same clamps and NaN handling.


def _scale(nbits):
  return np.float32((1 << nbits) / 6.0)


def _shift_tf(offset, nbits):
  n = 1 << nbits
  # Subnormal offsets count as 0, whatever the flush-to-zero mode.
  offset = tf.where(tf.abs(offset) < _FLT_MIN, np.float32(0), offset)
  s = np.float32(n // 2) - tf.floor(offset * _scale(nbits))
  s = tf.where(s >= 1.0, s, np.float32(1.0))  # NaN -> 1
  s = tf.minimum(s, np.float32(n))
  return tf.cast(s, tf.int32)


def _codes_tf(act, shift, nbits):
  """Unpacked int32 codes of act [N,H,W,C] given int32 shifts [C]."""
  n = 1 << nbits
  t = (act - _EPS) * _scale(nbits)
  # Clamping t to [-2n, n] leaves every code unchanged (see quant_common.h)
  # and maps NaN to -2n, hence code 0.
  t = tf.where(t >= np.float32(-2 * n), t, np.float32(-2 * n))
  t = tf.minimum(t, np.float32(n))
  return tf.clip_by_value(tf.cast(tf.floor(t), tf.int32) + shift, 0, n - 1)


def _channels(offset, static_channels):
  return static_channels if static_channels is not None else tf.shape(offset)[0]


def _check_last_dim(tensor, offset, expected_fn, message):
  """tensor, checked at run time to have last dim expected_fn(C) when that
  could not be checked statically (C = length of offset)."""
  if tensor.shape[3] is not None and offset.shape[0] is not None:
    return tensor
  check = tf.debugging.assert_equal(tf.shape(tensor)[3],
                                    expected_fn(tf.shape(offset)[0]),
                                    message=message)
  with tf.control_dependencies([check]):
    return tf.identity(tensor)


def _save_act_tf(act, offset, nbits, static_channels):
  channels = _channels(offset, static_channels)
  act = _check_last_dim(
      act,
      offset,
      lambda c: c,
      "offset length must equal the number of channels C of act",
  )
  q = _codes_tf(act, _shift_tf(offset, nbits), nbits)
  if nbits == 4:
    q = tf.pad(q, [[0, 0], [0, 0], [0, 0], [0, channels % 2]])
    pairs = tf.reshape(q, tf.concat([tf.shape(q)[:3], [-1, 2]], 0))
    q = tf.bitwise.bitwise_or(pairs[..., 0],
                              tf.bitwise.left_shift(pairs[..., 1], 4))
  codes = tf.cast(q, tf.uint8)
  packed = None
  if static_channels is not None:
    packed = packed_channels(static_channels, nbits)
  codes.set_shape(act.shape[:3].concatenate([packed]))
  return codes


def _restore_act_tf(codes, offset, nbits, static_channels):
  channels = _channels(offset, static_channels)
  codes = _check_last_dim(
      codes,
      offset,
      lambda c: (c * nbits + 7) // 8,
      "codes last dimension must be ceil(C*nbits/8) for C = length of offset",
  )
  q = tf.cast(codes, tf.int32)
  if nbits == 4:
    nibbles = tf.stack(
        [tf.bitwise.bitwise_and(q, 15),
         tf.bitwise.right_shift(q, 4)], axis=-1)
    q = tf.reshape(nibbles, tf.concat([tf.shape(q)[:3], [-1]], 0))
    q = q[..., :channels]
  shift = _shift_tf(offset, nbits)
  width = np.float32(6.0 / (1 << nbits))
  approx = (tf.cast(q - shift, tf.float32) + np.float32(0.5)) * width
  mask = q >= shift
  out_shape = codes.shape[:3].concatenate([static_channels])
  approx.set_shape(out_shape)
  mask.set_shape(out_shape)
  return approx, mask


# ---------------------------------------------------------------------------
# Public ops.


def save_act(act, offset, nbits):
  """Quantizes an activation to packed ``nbits``-bit codes.

  Args:
    act: float32 tensor ``[N, H, W, C]`` (other float dtypes are cast).
    offset: float32 tensor ``[C]``, the per-channel offset.
    nbits: 4 or 8 (Python int).

  Returns:
    uint8 tensor ``[N, H, W, ceil(C*nbits/8)]`` of packed codes (layout in
    the module docstring). Not differentiable.

  Raises:
    ValueError: bad nbits, or statically known shapes that do not fit.
  """
  nbits, act, offset, channels = _save_args(act, offset, nbits)
  lib = _native_lib()
  if lib is not None:
    return lib.blpa_save_act(act, offset, nbits=nbits)
  return _save_act_tf(act, offset, nbits, channels)


def _save_args(act, offset, nbits):
  """Checked ``(nbits, act, offset, static C or None)`` of a save."""
  nbits = _check_nbits(nbits)
  act = _as_float32(act)
  offset = tf.convert_to_tensor(offset, dtype=tf.float32)
  channels = _check_common(act, offset, "act")
  act_channels = act.shape[3] if act.shape.rank == 4 else None
  if act_channels == 0:
    raise ValueError(
        f"act must have at least one channel, got C = 0 (shape {act.shape})")
  if channels is not None and act_channels is not None and channels != act_channels:
    raise ValueError(
        f"offset length ({channels}) must equal the number of channels C "
        f"of act ({act_channels}); act shape {act.shape}")
  return nbits, act, offset, channels if channels is not None else act_channels


def save_scaled_act(act, scale, offset, nbits):
  """``save_act(act / scale, offset, nbits)`` without the quotient tensor.

  The native CPU op ``BlpaSaveScaledAct`` divides row by row (the same IEEE
  division as ``act / scale``), so no full-size temporary is allocated.
  Without the native library, or when a GPU is present (the op has no GPU
  kernel), it is ``save_act(act / scale, offset, nbits)``: the same codes.

  Args:
    act: float32 tensor ``[N, H, W, C]``.
    scale: float32 tensor ``[C]``, the per-channel divisor.
    offset: float32 tensor ``[C]``, the per-channel offset.
    nbits: 4 or 8 (Python int).

  Returns:
    uint8 tensor ``[N, H, W, ceil(C*nbits/8)]``, as :func:`save_act`.

  Raises:
    ValueError: bad nbits, or statically known shapes that do not fit.
  """
  nbits, act, offset, channels = _save_args(act, offset, nbits)
  scale = tf.convert_to_tensor(scale, dtype=tf.float32)
  _check_rank(scale, 1, "scale")
  if (channels is not None and scale.shape[0] is not None and
      scale.shape[0] != channels):
    raise ValueError(
        f"scale length ({scale.shape[0]}) must equal the number of channels "
        f"C of act ({channels}); act shape {act.shape}")
  lib = native.cpu_library_with("blpa_save_scaled_act")
  if lib is None:
    return save_act(act / scale, offset, nbits)
  return lib.blpa_save_scaled_act(act, offset, scale, nbits=nbits)


def restore_act(codes, offset, nbits):
  """Restores the approximate activation and its ReLU mask from codes.

  Args:
    codes: uint8 tensor ``[N, H, W, ceil(C*nbits/8)]`` from ``save_act``.
    offset: float32 tensor ``[C]``, the offset given to ``save_act``.
    nbits: 4 or 8 (Python int).

  Returns:
    ``(approx, mask)``: float32 ``[N, H, W, C]`` bin centres
    ``(q - shift + 0.5) * 6/n`` and bool ``[N, H, W, C]`` ``q >= shift``
    (equal to ``approx > 0``). Not differentiable.

  Raises:
    ValueError: bad nbits, or statically known shapes that do not fit.
  """
  nbits = _check_nbits(nbits)
  codes = tf.convert_to_tensor(codes, dtype=tf.uint8)
  offset = tf.convert_to_tensor(offset, dtype=tf.float32)
  channels = _check_common(codes, offset, "codes")
  got = codes.shape[3] if codes.shape.rank == 4 else None
  if channels is not None and got is not None:
    expected = packed_channels(channels, nbits)
    if got != expected:
      raise ValueError(
          f"codes last dimension must be ceil(C*nbits/8) = {expected} for "
          f"C = {channels} (length of offset), nbits = {nbits}; got {got} "
          f"(codes shape {codes.shape})")
  lib = _native_lib()
  if lib is not None:
    return tuple(lib.blpa_restore_act(codes, offset, nbits=nbits))
  return _restore_act_tf(codes, offset, nbits, channels)

"""Selecting channels of a tensor, and summing their squares.

Sampled layers (:mod:`blpa.approx`) keep k of the C input channels of a
product: they score the channels by their norms, copy the kept channels of
the input (its last axis) and of the kernel (an inner axis), and autodiff
scatters the gradients of the copies back to C channels.

- :func:`gather_channels`: ``tf.gather(x, indices, axis)``, whose gradient
  is :func:`scatter_channels`.
- :func:`scatter_channels`: the transpose, ``y``'s channels summed into C
  channels at ``indices`` (zeros elsewhere); its gradient is
  :func:`gather_channels`.
- :func:`channel_square_sums`: ``tf.reduce_sum(tf.square(x), other axes)``
  over the last axis, in float32.

On the CPU they run the native ops ``BlpaGatherChannels``,
``BlpaScatterChannels`` and ``BlpaChannelSquareSums``
(``ops/channels_*.cc``), which read and write each element once: the
gradient TF gives ``tf.gather`` on an axis other than the first transposes
the whole tensor twice around an ``UnsortedSegmentSum``, and ``tf.square``
writes a full-size temporary. Without the native library (or with ``BLPA_PY_OPS=1``), or when
a GPU is present (the ops have no GPU kernels), the same functions are
computed with ``tf.gather``, ``tf.math.unsorted_segment_sum`` and
``tf.reduce_sum``: the same values (the float32 sums of squares may differ
in the last bits, from the order of the additions).
"""

import tensorflow as tf

from blpa import native

__all__ = ["gather_channels", "scatter_channels", "channel_square_sums",
           "backend"]

_FLOATS = (tf.float32, tf.float64, tf.float16, tf.bfloat16)


def _lib():
  """The native library, if it has the ops and no GPU is present."""
  return native.cpu_library_with("blpa_gather_channels")


def backend():
  """``"native"`` when the functions run the native ops, else ``"python"``."""
  return "native" if _lib() is not None else "python"


def _float_tensor(x, name):
  """x as a float tensor that is not a scalar (else ValueError)."""
  x = tf.convert_to_tensor(x)
  if x.dtype not in _FLOATS:
    raise ValueError(f"{name}: needs a float tensor, got dtype "
                     f"{x.dtype.name}")
  if x.shape.rank == 0:
    raise ValueError(f"{name}: needs a tensor of rank >= 1, got a scalar")
  return x


def _checked(x, indices, axis, name):
  """``(x, int32 indices, axis in [0, rank))`` with x float of known rank
  >= 1, indices a vector, axis an int in [-rank, rank)."""
  x = _float_tensor(x, name)
  indices = tf.convert_to_tensor(indices)
  if not indices.dtype.is_integer:
    raise ValueError(f"{name}: indices must be integers, got dtype "
                     f"{indices.dtype.name}")
  if indices.shape.rank is not None and indices.shape.rank != 1:
    raise ValueError(f"{name}: indices must be a vector, got shape "
                     f"{indices.shape}")
  rank = x.shape.rank
  if rank is None:
    raise ValueError(f"{name}: needs a tensor of known rank")
  if isinstance(axis, bool) or not isinstance(axis, int) or \
      not -rank <= axis < rank:
    raise ValueError(f"{name}: axis must be an int in [{-rank}, {rank}) for "
                     f"rank {rank}, got {axis!r}")
  return x, tf.cast(indices, tf.int32), axis % rank


def _check_static_indices(indices, channels, name):
  """Raises ValueError for a constant index outside [0, channels)."""
  value = tf.get_static_value(indices)
  if value is None or channels is None:
    return
  bad = [int(i) for i in value.ravel() if not 0 <= i < channels]
  if bad:
    raise ValueError(f"{name}: index {bad[0]} is not in [0, {channels}) "
                     f"(the number of channels)")


def gather_channels(x, indices, axis=-1):
  """``tf.gather(x, indices, axis)``, with a one-pass gradient.

  Args:
    x: float tensor of known rank >= 1, with C entries on ``axis``.
    indices: int vector ``[k]`` of channels in ``[0, C)`` (repeats allowed;
      their gradients add up).
    axis: the channel axis (Python int; default the last).

  Returns:
    x with k entries on ``axis``: ``y[..., j, ...] = x[..., indices[j],
    ...]``. Its gradient with respect to x is :func:`scatter_channels`;
    indices get none.

  Raises:
    ValueError: a non-float x, a scalar x or one of unknown rank, a bad
      axis, non-vector or non-integer indices, or a constant index out of
      range.
  """
  x, indices, axis = _checked(x, indices, axis, "gather_channels")
  channels = x.shape[axis]
  _check_static_indices(indices, channels, "gather_channels")

  @tf.custom_gradient
  def gather(x):
    channels_now = channels if channels is not None else tf.shape(x)[axis]

    def grad(dy):
      return scatter_channels(dy, indices, channels_now, axis)

    return _gather(x, indices, axis), grad

  return gather(x)


def _gather(x, indices, axis):
  lib = _lib()
  if lib is None:
    return tf.gather(x, indices, axis=axis)
  return lib.blpa_gather_channels(x, indices, axis=axis)


def scatter_channels(y, indices, channels, axis=-1):
  """The transpose of :func:`gather_channels`: y's channels placed among C.

  Args:
    y: float tensor of known rank >= 1, with k entries on ``axis``.
    indices: int vector ``[k]`` of channels in ``[0, channels)``.
    channels: C (a Python int; a scalar tensor uses the fallback).
    axis: the channel axis (Python int; default the last).

  Returns:
    y with C entries on ``axis``: entry c is the sum of y's entries j with
    ``indices[j] == c``, 0 where there is none. Its gradient with respect to
    y is :func:`gather_channels`.

  Raises:
    ValueError: as :func:`gather_channels`; a channels < 1; y's size on
      ``axis`` other than k.
  """
  y, indices, axis = _checked(y, indices, axis, "scatter_channels")
  static = tf.get_static_value(channels)
  if static is not None:
    static = int(static)
    if static < 1:
      raise ValueError(f"scatter_channels: channels must be >= 1, got "
                       f"{static}")
    _check_static_indices(indices, static, "scatter_channels")
  if (y.shape[axis] is not None and indices.shape[0] is not None and
      y.shape[axis] != indices.shape[0]):
    raise ValueError(f"scatter_channels: y's dimension {axis} "
                     f"({y.shape[axis]}) must equal the number of indices "
                     f"({indices.shape[0]})")

  @tf.custom_gradient
  def scatter(y):

    def grad(dx):
      return gather_channels(dx, indices, axis)

    channels_now = static if static is not None else channels
    return _scatter(y, indices, channels_now, axis), grad

  return scatter(y)


def _scatter(y, indices, channels, axis):
  lib = _lib()
  if lib is None or not isinstance(channels, int):
    rank = y.shape.rank
    perm = [axis] + [d for d in range(rank) if d != axis]
    summed = tf.math.unsorted_segment_sum(tf.transpose(y, perm), indices,
                                          channels)
    return tf.transpose(summed, list(range(1, axis + 1)) + [0] +
                        list(range(axis + 1, rank)))
  return lib.blpa_scatter_channels(y, indices, channels=channels, axis=axis)


def channel_square_sums(x):
  """Sum of squares of each channel over every other axis, in float32.

  Args:
    x: float tensor ``[..., C]`` (rank >= 1).

  Returns:
    float32 ``[C]``: ``sum(x[..., c]**2)``. Not differentiable (the input is
    read through ``tf.stop_gradient``).

  Raises:
    ValueError: a non-float or scalar x.
  """
  x = tf.stop_gradient(_float_tensor(x, "channel_square_sums"))
  lib = _lib()
  if lib is None:
    rank = x.shape.rank
    if rank is None:
      raise ValueError("channel_square_sums: the fallback needs x's rank")
    squares = tf.square(tf.cast(x, tf.float32))
    return tf.reduce_sum(squares, axis=list(range(rank - 1)))
  return lib.blpa_channel_square_sums(x)

"""Writing a tensor into a variable's own buffer.

``var.assign(value)`` makes the variable adopt ``value``'s buffer.  For the
copies that a :class:`blpa.graph.Graph` keeps between its forward and
backward passes, that buffer was allocated wherever the allocator found
room while the forward pass ran, and TensorFlow's BFC allocator counts the
whole chunk it took (up to twice the bytes asked for).  Written into the
buffers allocated for them side by side, the copies keep their place and
their size, step after step.

:func:`resize` allocates a variable's buffer for a batch size (zeroed, one
buffer per variable), :func:`write` stores into it.  :func:`write` does that
with the native op ``BlpaWriteVariable``
(``ops/storage_*.cc``): it copies ``value`` into the variable's buffer when
dtype and shape agree and nothing else references the buffer, and adopts
``value``'s buffer otherwise.  ``ResourceStridedSliceAssign`` would also
write in place, but turns on the variable's copy-on-read mode: every later
read would copy it.  Without the native library (or with ``BLPA_PY_OPS=1``),
or for a variable that is not on a CPU, :func:`write` is ``var.assign``:
the same values, only the layout differs.
"""

import tensorflow as tf

from blpa import native

__all__ = ['resize', 'write']


def _lib():
  """The native library if it has the ops, else None."""
  return native.library_with('blpa_resize_variable')


def _on_cpu(var):
  device = var.device or ''
  return device == '' or 'CPU' in device.upper()


def write(var, value):
  """Stores ``value`` in ``var`` (in ``var``'s buffer where possible).

  Args:
    var: a resource variable (inside a replica context, a per-replica
      variable's local copy).
    value: a tensor of ``var``'s dtype whose shape ``var`` accepts.

  Returns:
    The op that writes, to wait on.

  Raises:
    ValueError: if ``value``'s dtype differs from ``var``'s.
  """
  value = tf.convert_to_tensor(value)
  if value.dtype != var.dtype:
    raise ValueError(f'write: value has dtype {value.dtype.name}, variable '
                     f'{var.name} has {var.dtype.name}')
  lib = _lib()
  if lib is None or not _on_cpu(var):
    return var.assign(value, read_value=False)
  return lib.blpa_write_variable(var.handle, value)


def resize(var, rows):
  """Gives ``var`` a zeroed buffer of ``rows`` rows, unless it has them.

  Args:
    var: a resource variable of rank >= 1 whose first dimension may change
      (created with ``shape=[None, ...]``).
    rows: the new first dimension (int or int32/int64 scalar tensor).

  Returns:
    The op that resizes, to wait on.
  """
  rows = tf.cast(rows, tf.int64)
  lib = _lib()
  if lib is None or not _on_cpu(var):
    def allocate():
      var.assign(tf.zeros(tf.concat([[rows], tf.shape(var, tf.int64)[1:]],
                                    0), var.dtype), read_value=False)
      return tf.constant(True)
    return tf.cond(tf.equal(tf.shape(var, tf.int64)[0], rows),
                   lambda: tf.constant(False), allocate)
  return lib.blpa_resize_variable(var.handle, rows, dtype=var.dtype)

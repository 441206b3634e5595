"""Analytic backward passes of Keras layers, as functions of tensors.

Each function takes what the layer kept (shapes, compact copies restored by
:mod:`blpa.keras.codecs`, weights read in the forward pass) and the
gradient of the layer's output, and returns input and weight gradients.
They use TensorFlow's own gradient kernels, so at ``bits=0`` they give the
gradients Keras computes.
"""

import contextlib
import os
import platform
import sys

import tensorflow as tf


def _after(tensor):
  """Control dependencies on ``tensor`` (none when it is None): the input
  gradient is computed after the weight gradient, so that the incoming
  gradient and the restored input are freed layer by layer."""
  return tf.control_dependencies([tensor] if tensor is not None else [])


def _strides(values):
  return [1] + list(values) + [1]


def _conv_args(layer):
  """Strides, padding and dilations of a channels_last Keras convolution,
  as TensorFlow's raw convolution ops take them."""
  return dict(strides=_strides(layer.strides), padding=layer.padding.upper(),
              dilations=_strides(layer.dilation_rate))


def conv2d(layer, x_shape, x, kernel, dy):
  """Conv2D (channels_last, ``groups=1``).

  Args:
    layer: the ``keras.layers.Conv2D``.
    x_shape: int32 shape of the input.
    x: the (restored) input, or None when the kernel is not trained.
    kernel: the kernel read in the forward pass.
    dy: gradient of the output (before the bias add).

  Returns:
    ``(dx, dkernel)`` (``dkernel`` None when ``x`` is None).
  """
  if max(layer.dilation_rate) > 1:  # TF's CPU kernels take no dilation
    return _conv_nd(2, layer.strides, layer.padding.upper(),
                    layer.dilation_rate, x_shape, x, kernel, dy)
  args = _conv_args(layer)
  dk = None
  if x is not None:
    with low_memory_kernels(dy, layer.strides):
      dk = tf.raw_ops.Conv2DBackpropFilter(input=x,
                                           filter_sizes=tf.shape(kernel),
                                           out_backprop=dy, **args)
  with _after(dk), low_memory_kernels(dy, layer.strides):
    dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=x_shape, filter=kernel,
                                        out_backprop=dy, **args)
  return dx, dk


#: The CPU kernels of ``Conv2DBackpropFilter``/``Conv2DBackpropInput`` that
#: hold no im2col block (TensorFlow registers them under this label).
_LOW_MEMORY_LABELS = {'Conv2DBackpropFilter': 'eigen_tensor',
                      'Conv2DBackpropInput': 'eigen_tensor'}
#: A Conv2D whose output gradient has at least this many bytes computes its
#: gradients with those kernels (smaller ones, as in the tests' tiny
#: models, keep TensorFlow's default kernels: Keras's own numbers).
LOW_MEMORY_KERNEL_BYTES = 2**20


def low_memory_kernels(dy, strides=(1, 1)):
  """Context in which a Conv2D's gradient ops run TensorFlow's
  ``eigen_tensor`` CPU kernels, when ``dy`` is large.

  TensorFlow's default CPU kernels of both ops (oneDNN off; and in half
  precision also with oneDNN on, where oneDNN does not take them on a CPU
  without bfloat16 instructions) unfold the input into an im2col block of
  about 30 MiB (its L3 target, ``(30 << 20) / sizeof(T)`` values, whatever
  the batch): 27 MiB of the compressed ResNet-20's 75 MiB peak at batch
  128, 24 MiB for the input gradient in bfloat16. The ``eigen_tensor``
  kernels of the same ops (Eigen's spatial-convolution backward) hold
  none for the kernel gradient and one output-sized block for the input
  gradient. In float32 with oneDNN on (:func:`onednn_enabled`; a
  labelled op is not rewritten to oneDNN's kernels, whose float32
  gradients hold no such block) only unstrided convolutions get the label:
  there the Eigen kernels were faster than oneDNN's (the subclassed
  ResNet-20's compressed step 0.82x plain's with them on every conv, 1.15x
  with none), but on a strided one, ViT's 4x4 stride-4 patch embedding,
  60 times slower (157 against 2.6 ms a step, batch 16). No effect in
  eager mode, on a GPU, or for small tensors
  (:data:`LOW_MEMORY_KERNEL_BYTES`).

  Args:
    dy: the output gradient.
    strides: the convolution's strides (spatial).
  """
  shape = dy.shape
  small = (not shape.is_fully_defined() or
           shape.num_elements() * dy.dtype.size < LOW_MEMORY_KERNEL_BYTES)
  if small or tf.executing_eagerly() or _has_gpu() or (
      dy.dtype == tf.float32 and max(strides) > 1 and onednn_enabled()):
    return contextlib.nullcontext()
  # A private Graph method (TF 2.x); without it, TF's default kernels run.
  label_map = getattr(tf.compat.v1.get_default_graph(), '_kernel_label_map',
                      None)
  if label_map is None:  # pragma: no cover (a TensorFlow without it)
    return contextlib.nullcontext()
  return label_map(_LOW_MEMORY_LABELS)


def _has_gpu():
  return bool(tf.config.list_logical_devices('GPU'))


def onednn_enabled():
  """Whether TensorFlow runs its oneDNN CPU kernels (its x86-64 Linux
  builds, unless ``TF_ENABLE_ONEDNN_OPTS`` is 0/false)."""
  flag = os.environ.get('TF_ENABLE_ONEDNN_OPTS', '').strip().lower()
  if flag in ('0', 'false'):
    return False
  if flag in ('1', 'true'):
    return True
  # TensorFlow's default: on in its x86-64 Linux builds.
  return sys.platform.startswith('linux') and platform.machine().lower() in (
      'x86_64', 'amd64')


#: Bytes that one chunk of a Conv2D's kernel gradient may hold: restored
#: input rows and output-gradient rows (:func:`conv2d_bytes_per_example`).
CONV_CHUNK_BYTES = 4 * 2**20
#: A Conv2D's kernel gradient is computed in chunks only when the whole
#: batch's working set (same estimate) exceeds this many bytes.
CONV_CHUNK_THRESHOLD = 8 * 2**20


def conv2d_bytes_per_example(layer, input_shape, dtype):
  """Working set of a Conv2D's kernel gradient per example, in bytes.

  With :func:`low_memory_kernels`, ``Conv2DBackpropFilter`` holds no
  buffer of its own: what a chunk adds is the restored input rows (in the
  compute dtype; a narrower one is cast from the codecs' float32 restore,
  so both count) and the slice of the output gradient.

  Args:
    layer: the ``keras.layers.Conv2D`` (channels_last).
    input_shape: static ``[N, H, W, C]`` of its input.
    dtype: the compute dtype.

  Returns:
    int bytes, or None when ``H``, ``W`` or ``C`` is not static.
  """
  _, h, w, c = tf.TensorShape(input_shape).as_list()
  if None in (h, w, c):
    return None
  (kh, kw), (sh, sw) = layer.kernel_size, layer.strides
  if layer.padding == 'same':
    ho, wo = -(-h // sh), -(-w // sw)
  else:
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  size = tf.as_dtype(dtype).size
  x_bytes = h * w * c * (size + (4 if size < 4 else 0))
  return x_bytes + ho * wo * layer.filters * size


def conv2d_chunk_rows(layer, input_shape, dtype):
  """Examples per chunk of a Conv2D's kernel gradient (None: one pass).

  The peak of a compressed step is the kept copies plus one layer's
  backward working set. With :func:`low_memory_kernels`, a Conv2D's
  input-gradient phase holds the incoming gradient, the input gradient
  and Eigen's output-sized block (3 activations: 8 MiB each on the first
  stage of the CIFAR ResNet-20 at batch 128, float32), next to the other
  branch's gradient at a residual join. Its kernel-gradient phase holds
  the incoming gradient and the whole restored input (in half precision
  also its float32 restore). In chunks of at most
  :data:`CONV_CHUNK_BYTES` (4 MiB: half an activation there, and still
  thousands of output pixels per matrix product) the restored input costs
  less than one activation, so the kernel-gradient phase stays below the
  input-gradient phase. Layers whose whole-batch working set is at most
  :data:`CONV_CHUNK_THRESHOLD` (8 MiB, two chunks) are computed in one
  pass: chunking them saves at most 4 MiB and costs loop steps.

  Args:
    layer: the ``keras.layers.Conv2D``.
    input_shape: static shape of its input (the batch may be unknown).
    dtype: the compute dtype.

  Returns:
    int rows per chunk (chunks of equal size, the last one smaller), or
    None for one pass (small working set, dilated kernel, unknown
    shapes). With an unknown batch size the layer is always chunked.
  """
  if max(layer.dilation_rate) > 1 or layer.data_format != 'channels_last':
    return None
  per = conv2d_bytes_per_example(layer, input_shape, dtype)
  if per is None:
    return None
  n = tf.TensorShape(input_shape)[0]
  if n is None:
    return max(1, CONV_CHUNK_BYTES // per)
  if n * per <= CONV_CHUNK_THRESHOLD:
    return None
  chunks = -(-n * per // CONV_CHUNK_BYTES)
  rows = -(-n // chunks)
  return rows if rows < n else None


def conv2d_chunked(layer, x_shape, x_rows, kernel, dy, rows):
  """Conv2D as :func:`conv2d`, the kernel gradient summed over chunks of
  the batch (the input is restored one chunk at a time, never whole).

  Args:
    layer: the ``keras.layers.Conv2D`` (no dilation).
    x_shape: int32 shape of the input.
    x_rows: ``x_rows(start, stop)``: rows ``start:stop`` of the restored
      input, in the compute dtype.
    kernel: the kernel read in the forward pass.
    dy: gradient of the output (before the bias add).
    rows: examples per chunk (:func:`conv2d_chunk_rows`).

  Returns:
    ``(dx, dkernel)``.
  """
  args = _conv_args(layer)
  filter_sizes = tf.shape(kernel)

  def chunk(start, stop):
    x = x_rows(start, stop)
    with low_memory_kernels(dy, layer.strides):  # the loop body's own graph
      return tf.raw_ops.Conv2DBackpropFilter(
          input=x, filter_sizes=filter_sizes, out_backprop=dy[start:stop],
          **args)

  dk = chunked_sum(chunk, x_shape[0], rows, kernel.shape, kernel.dtype,
                   after=[dy])
  with _after(dk), low_memory_kernels(dy, layer.strides):
    dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=x_shape, filter=kernel,
                                        out_backprop=dy, **args)
  return dx, dk


def chunked_sum(fn, n, rows, shape, dtype, after=()):
  """``fn(0, rows) + fn(rows, 2*rows) + ...`` up to ``n``, one chunk at a
  time, accumulated in float32.

  The chunks run in a ``tf.while_loop`` with ``parallel_iterations=1``, so
  in ``tf.function`` only one chunk's tensors are alive at a time. The
  loop counter starts only once the ``after`` tensors are computed: TF's
  executor runs a loop body's ops as soon as their own inputs are ready,
  so without it the first chunk's restore (which needs only the counter
  and the copy) ran in the forward pass and its output stayed alive until
  the gradient arrived (2 MiB per chunked layer on the ResNet-20, and the
  step's peak rose from 46 to 62 MiB over four steps).

  Args:
    fn: ``fn(start, stop)`` (int32 scalars) returning a tensor of ``shape``.
    n: the number of rows (int or int32 scalar).
    rows: rows per chunk (Python int >= 1).
    shape: static shape of the sum.
    dtype: dtype of the result.
    after: tensors the first chunk waits for (the gradient it reads).

  Returns:
    The sum, cast to ``dtype``.
  """
  if rows < 1:
    raise ValueError(f'chunked_sum needs rows >= 1, got {rows}')
  n = tf.cast(n, tf.int32)
  count = (n + rows - 1) // rows
  with tf.control_dependencies(list(after)):
    first = tf.constant(0) + 0  # an op, so that it waits

  def body(i, total):
    start = i * rows
    stop = tf.minimum(start + rows, n)
    # The static shape, which a restored chunk may have lost (an unknown
    # channel count), so that the loop's shape stays invariant.
    part = tf.reshape(tf.cast(fn(start, stop), tf.float32), shape)
    return i + 1, total + part

  _, total = tf.while_loop(lambda i, _: i < count, body,
                           (first, tf.zeros(shape, tf.float32)),
                           parallel_iterations=1)
  return tf.cast(total, dtype)


def depthwise_conv2d(layer, x_shape, x, kernel, dy):
  """DepthwiseConv2D (channels_last, rank 2); as :func:`conv2d`."""
  args = _conv_args(layer)
  dk = None
  if x is not None:
    dk = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
        input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, **args)
  with _after(dk):
    dx = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
        input_sizes=x_shape, filter=kernel, out_backprop=dy, **args)
  return dx, dk


def separable_conv2d(layer, x_shape, x, kernels, dy):
  """SeparableConv2D (channels_last, no dilation), as
  ``tf.nn.separable_conv2d`` computes it: a depthwise convolution, then a
  1x1 convolution. The depthwise output, which the pointwise kernel's
  gradient needs, is recomputed from ``x``.

  Args:
    layer: the ``keras.layers.SeparableConv2D``.
    x_shape: int32 shape of the input.
    x: the (restored) input, or None when the kernels are not trained.
    kernels: ``[depthwise, pointwise]`` read in the forward pass.
    dy: gradient of the output (before the bias add).

  Returns:
    ``(dx, [ddepthwise, dpointwise])`` (kernel gradients None when ``x`` is
    None).
  """
  depthwise, pointwise = kernels
  point = dict(strides=[1, 1, 1, 1], padding='VALID', dilations=[1, 1, 1, 1])
  dpoint = None
  mid_shape = tf.concat([tf.shape(dy)[:3], tf.shape(pointwise)[2:3]], 0)
  if x is not None:
    mid = tf.raw_ops.DepthwiseConv2dNative(input=x, filter=depthwise,
                                           **_conv_args(layer))
    with low_memory_kernels(dy):
      dpoint = tf.raw_ops.Conv2DBackpropFilter(
          input=mid, filter_sizes=tf.shape(pointwise), out_backprop=dy,
          **point)
  with _after(dpoint), low_memory_kernels(dy):
    dmid = tf.raw_ops.Conv2DBackpropInput(input_sizes=mid_shape,
                                          filter=pointwise, out_backprop=dy,
                                          **point)
  dx, ddepth = depthwise_conv2d(layer, x_shape, x, depthwise, dmid)
  return dx, [ddepth, dpoint]


def dense(x_shape, x, kernel, dy):
  """Dense on inputs of any rank ``[..., in]``; as :func:`conv2d`."""
  out_dim = tf.shape(kernel)[1]
  dy2 = tf.reshape(dy, [-1, out_dim])
  dk = None
  if x is not None:
    x2 = tf.reshape(x, [-1, tf.shape(kernel)[0]])
    dk = tf.matmul(x2, dy2, transpose_a=True)
  with _after(dk):
    dx = tf.reshape(tf.matmul(dy2, kernel, transpose_b=True), x_shape)
  return dx, dk


def bias(dy):
  """Gradient of a bias added on the last axis: ``BiasAddGrad``, the op
  TensorFlow's gradient of Keras's broadcast add runs (in half precision
  it accumulates in float32, where ``reduce_sum`` would not)."""
  if dy.shape.rank == 1:
    return dy
  return tf.raw_ops.BiasAddGrad(out_backprop=dy)


def batch_norm(g, y_norm, gamma, inv_sigma, batch_stats):
  """BatchNormalization on the last axis, from the normalized input.

  Args:
    g: gradient of the BN output (already masked by the activation).
    y_norm: the (restored) normalized input ``(z - mean) / sigma``.
    gamma: scale (a tensor; ones when the layer has none).
    inv_sigma: ``1 / sqrt(var + epsilon)`` of the statistics used.
    batch_stats: whether the forward pass used batch statistics.

  Returns:
    ``(dz, dgamma, dbeta)``.
  """
  axes = list(range(g.shape.rank - 1))
  dbeta = tf.reduce_sum(g, axis=axes)
  dgamma = tf.reduce_sum(g * y_norm, axis=axes)
  if batch_stats:
    # g - mean(g) - y * mean(g * y), with the sums just taken.
    count = tf.cast(tf.size(g) // tf.shape(g)[-1], g.dtype)
    g = g - (y_norm * (dgamma / count) + dbeta / count)
  return g * (gamma * inv_sigma), dgamma, dbeta


def max_pool2d(layer, x, dy):
  """MaxPooling2D from the (restored) input."""
  args = dict(ksize=_strides(layer.pool_size), strides=_strides(layer.strides),
              padding=layer.padding.upper())
  y = tf.nn.max_pool2d(x, **args)
  return tf.raw_ops.MaxPoolGrad(orig_input=x, orig_output=y, grad=dy, **args)


def _pool_origins(layer, in_size, out_size, axis):
  """Input index of each output window's first row (``axis`` 0) or column
  (1) of a channels_last 2-D pool: ``o * stride - pad_before``."""
  k, stride = layer.pool_size[axis], layer.strides[axis]
  origin = tf.range(out_size) * stride
  if layer.padding == 'same':
    origin -= tf.maximum((out_size - 1) * stride + k - in_size, 0) // 2
  return origin


def max_pool_offsets(layer, x):
  """Where each window of a MaxPooling2D has its maximum, as TF's
  ``MaxPoolGrad`` chooses it (the first, row-major): the offset in the
  window, one byte per output value.

  Args:
    layer: the ``keras.layers.MaxPooling2D`` (channels_last, windows of at
      most 255 positions).
    x: its input (as the layer computes it).

  Returns:
    uint8 ``[N, Ho, Wo, C]``.
  """
  _, argmax = tf.nn.max_pool_with_argmax(
      x, layer.pool_size, layer.strides, layer.padding.upper(),
      include_batch_in_index=False)
  shape = tf.shape(x, out_type=tf.int64)
  width, channels = shape[2], shape[3]
  out = tf.shape(argmax, out_type=tf.int64)
  rows = argmax // (width * channels)
  cols = argmax // channels % width
  top = tf.cast(_pool_origins(layer, shape[1], out[1], 0), tf.int64)
  left = tf.cast(_pool_origins(layer, width, out[2], 1), tf.int64)
  offsets = (rows - top[None, :, None, None]) * layer.pool_size[1] + (
      cols - left[None, None, :, None])
  return tf.cast(offsets, tf.uint8)


def max_pool_from_offsets(layer, x_shape, offsets, dy):
  """MaxPooling2D's input gradient from :func:`max_pool_offsets`: each
  output's gradient added at its window's maximum.

  Args:
    layer: the ``keras.layers.MaxPooling2D``.
    x_shape: int32 shape of the input.
    offsets: uint8 ``[N, Ho, Wo, C]``.
    dy: gradient of the output.

  Returns:
    ``dx``.
  """
  shape = tf.cast(x_shape, tf.int64)
  n, height, width, channels = shape[0], shape[1], shape[2], shape[3]
  out = tf.shape(dy, out_type=tf.int64)
  off = tf.cast(offsets, tf.int64)
  top = tf.cast(_pool_origins(layer, height, out[1], 0), tf.int64)
  left = tf.cast(_pool_origins(layer, width, out[2], 1), tf.int64)
  rows = top[None, :, None, None] + off // layer.pool_size[1]
  cols = left[None, None, :, None] + off % layer.pool_size[1]
  batch = tf.range(n)[:, None, None, None]
  channel = tf.range(channels)[None, None, None, :]
  flat = ((batch * height + rows) * width + cols) * channels + channel
  dx = tf.math.unsorted_segment_sum(tf.reshape(dy, [-1]),
                                    tf.reshape(flat, [-1]),
                                    n * height * width * channels)
  return tf.reshape(dx, x_shape)


def first_max_mask(x, out, ph, pw):
  """Where TF's ``MaxPoolGrad`` sends the gradient of a max pool with
  non-overlapping ``ph x pw`` windows: in each window, the first position
  (row-major) equal to its maximum (ties are common in half precision and
  at a ReLU's zeros).

  Args:
    x: the pooled part of the input, ``[N, Ho * ph, Wo * pw, C]``.
    out: the pool's output ``[N, Ho, Wo, C]``.
    ph: window height.
    pw: window width.

  Returns:
    A boolean tensor shaped like ``x``.
  """
  shape = tf.shape(out)
  n, ho, wo, c = shape[0], shape[1], shape[2], shape[3]
  equal = tf.reshape(x, [n, ho, ph, wo, pw, c]) == \
      out[:, :, None, :, None, :]
  window = tf.reshape(tf.transpose(equal, [0, 1, 3, 5, 2, 4]),
                      [n, ho, wo, c, ph * pw])
  before = tf.cumsum(tf.cast(window, tf.int32), axis=-1, exclusive=True)
  first = tf.reshape(window & (before == 0), [n, ho, wo, c, ph, pw])
  return tf.reshape(tf.transpose(first, [0, 1, 4, 2, 5, 3]),
                    [n, ho * ph, wo * pw, c])


def repeat2d(t, ph, pw):
  """Each pixel of ``t`` repeated ``ph x pw`` times (nearest upsampling)."""
  return tf.repeat(tf.repeat(t, ph, axis=1), pw, axis=2)


def avg_pool2d(layer, x_shape, dy):
  """AveragePooling2D (only the input shape is needed)."""
  return tf.raw_ops.AvgPoolGrad(orig_input_shape=x_shape, grad=dy,
                                ksize=_strides(layer.pool_size),
                                strides=_strides(layer.strides),
                                padding=layer.padding.upper())


def global_avg_pool2d(layer, x_shape, dy):
  """GlobalAveragePooling2D (channels_last)."""
  if not layer.keepdims:
    dy = dy[:, None, None, :]
  # Keras averages 16-bit inputs in float32: so is dy divided here.
  dtype = dy.dtype
  g = tf.cast(dy, tf.float32) if dtype.size < 4 else dy
  area = tf.cast(x_shape[1] * x_shape[2], g.dtype)
  return tf.cast(tf.broadcast_to(g / area, x_shape), dtype)


def zero_padding2d(layer, x_shape, dy):
  """ZeroPadding2D (channels_last): the unpadded window of ``dy``."""
  (top, _), (left, _) = layer.padding
  return tf.slice(dy, [0, top, left, 0], x_shape)


def cropping2d(layer, dy):
  """Cropping2D (channels_last): ``dy`` padded back with zeros."""
  (top, bottom), (left, right) = layer.cropping
  return tf.pad(dy, [[0, 0], [top, bottom], [left, right], [0, 0]])


def unbroadcast(dy, shape):
  """The gradient of an input of shape ``shape`` broadcast to ``dy``'s
  shape (by an add): ``dy`` summed over the broadcast axes."""
  axes, _ = tf.raw_ops.BroadcastGradientArgs(s0=shape, s1=tf.shape(dy))
  return tf.reshape(tf.reduce_sum(dy, axes), shape)


def concatenate(axis, sizes, dy):
  """Concatenate: ``dy`` split along the axis into the inputs' sizes."""
  return tf.split(dy, sizes, axis=axis)


# ---------------------------------------------------------------------------
# More layers: Conv1D, Conv3D, Conv2DTranspose, UpSampling1D/2D, global max
# pooling, GlobalAveragePooling1D, AveragePooling1D, MaxPooling1D.
#
# Each ``supports_*`` predicate returns '' when the function below it handles
# the layer's configuration, else the reason it does not (the caller then
# takes the generic path).
#
# Dilated convolutions: TensorFlow's CPU gradient kernels (Conv2DBackprop*,
# Conv3DBackprop*V2) reject dilation rates > 1, and ``tf.nn.convolution``
# (which Keras calls) does not run a dilated convolution natively anyway: it
# pads, moves the dilation into the batch (SpaceToBatchND), runs a 'VALID'
# undilated convolution and moves back (BatchToSpaceND), on CPU and GPU alike.
# :func:`_conv_nd` differentiates that same sequence, so that it gives the
# gradients of autodiff on every device.
# ---------------------------------------------------------------------------


def _reason(checks):
  """The first reason in ``checks`` (``(failed, reason)`` pairs), or ''."""
  for failed, why in checks:
    if failed:
      return why
  return ''


def _channels_last(layer):
  return (getattr(layer, 'data_format', 'channels_last') != 'channels_last',
          f'data_format={getattr(layer, "data_format", None)!r} (only '
          'channels_last)')


def _conv_checks(layer, rank, paddings):
  return [
      (len(getattr(layer, 'kernel_size', ())) != rank,
       f'not a rank-{rank} convolution'),
      _channels_last(layer),
      (getattr(layer, 'groups', 1) != 1,
       f'groups={getattr(layer, "groups", None)} (only 1)'),
      (getattr(layer, 'padding', None) not in paddings,
       f'padding={getattr(layer, "padding", None)!r} (only {paddings})'),
      (max(getattr(layer, 'strides', (1,))) > 1
       and max(getattr(layer, 'dilation_rate', (1,))) > 1,
       'strides > 1 with dilation_rate > 1'),
      (getattr(layer, 'lora_enabled', False), 'LoRA-enabled kernel'),
  ]


def _conv_ops(rank):
  """Raw (forward, backprop input, backprop filter) ops of a rank-2 or rank-3
  convolution (rank 1 runs as rank 2, see :func:`_conv_nd`)."""
  if rank == 3:
    return (tf.raw_ops.Conv3D, tf.raw_ops.Conv3DBackpropInputV2,
            tf.raw_ops.Conv3DBackpropFilterV2)
  return (tf.raw_ops.Conv2D, tf.raw_ops.Conv2DBackpropInput,
          tf.raw_ops.Conv2DBackpropFilter)


def _conv_undilated(rank, strides, padding, x_shape, x, kernel, dy):
  """Gradients of an undilated channels_last convolution of rank 1, 2 or 3,
  with the raw ops ``tf.nn.convolution`` uses (rank 1: ``tf.nn.conv1d``,
  which runs Conv2D on ``[N, 1, W, C]`` inputs and ``[1, k, in, out]``
  kernels)."""
  strides = list(strides)
  if rank == 1:
    x_shape = tf.concat([x_shape[:1], [1], x_shape[1:]], 0)
    x = None if x is None else tf.expand_dims(x, 1)
    kernel = tf.expand_dims(kernel, 0)
    dy = tf.expand_dims(dy, 1)
    strides = [1] + strides
  _, backprop_input, backprop_filter = _conv_ops(max(rank, 2))
  args = dict(strides=_strides(strides), padding=padding)
  if rank < 3:
    args['dilations'] = [1] * (len(strides) + 2)
  dk = None
  if x is not None:
    with low_memory_kernels(dy, strides):
      dk = backprop_filter(input=x, filter_sizes=tf.shape(kernel),
                           out_backprop=dy, **args)
  with _after(dk), low_memory_kernels(dy, strides):
    dx = backprop_input(input_sizes=x_shape, filter=kernel, out_backprop=dy,
                        **args)
  if rank == 1:
    dx = tf.squeeze(dx, [1])
    dk = None if dk is None else tf.squeeze(dk, [0])
  return dx, dk


def _conv_nd(rank, strides, padding, dilation_rate, x_shape, x, kernel, dy):
  """Gradients of a channels_last convolution of rank 1, 2 or 3, computed
  as ``tf.nn.convolution`` computes the convolution.

  Args:
    rank: number of spatial dimensions.
    strides: ``rank`` ints.
    padding: 'VALID' or 'SAME'.
    dilation_rate: ``rank`` ints (all 1 when any stride is > 1).
    x_shape: int32 shape of the input.
    x: the input, or None when the kernel is not trained.
    kernel: the kernel ``[*kernel_size, in, out]``.
    dy: gradient of the output.

  Returns:
    ``(dx, dkernel)`` (``dkernel`` None when ``x`` is None).
  """
  x_shape = tf.convert_to_tensor(x_shape, tf.int32)
  dilation_rate = [int(d) for d in dilation_rate]
  if all(d == 1 for d in dilation_rate):
    return _conv_undilated(rank, strides, padding, x_shape, x, kernel, dy)
  # tf.nn.convolution's _WithSpaceToBatch: SAME becomes explicit padding of
  # the dilated kernel's extent (more at the end), then padding to multiples
  # of the dilation.
  kernel_size = kernel.shape[:rank].as_list()
  if padding == 'SAME':
    extra = [(k - 1) * d for k, d in zip(kernel_size, dilation_rate)]
    base = [[e // 2, e - e // 2] for e in extra]
  else:
    base = [[0, 0]] * rank
  spatial = x_shape[1:rank + 1]
  paddings, crops = tf.required_space_to_batch_paddings(
      spatial, dilation_rate, base_paddings=tf.constant(base, tf.int32))
  # d(BatchToSpaceND(r, crops)) / dr is SpaceToBatchND(g, crops).
  dys = tf.space_to_batch_nd(dy, dilation_rate, crops)
  xs = None if x is None else tf.space_to_batch_nd(x, dilation_rate, paddings)
  block = 1
  for d in dilation_rate:
    block *= d
  xs_shape = tf.concat([
      x_shape[:1] * block,
      (spatial + paddings[:, 0] + paddings[:, 1]) // dilation_rate,
      x_shape[-1:]], 0)
  dxs, dk = _conv_undilated(rank, [1] * rank, 'VALID', xs_shape, xs, kernel,
                            dys)
  # d(SpaceToBatchND(x, paddings)) / dx is BatchToSpaceND(g, paddings).
  dx = tf.batch_to_space(dxs, dilation_rate, paddings)
  return dx, dk


def supports_conv1d(layer):
  """'' when :func:`conv1d` handles ``layer`` (a Conv1D), else why not."""
  return _reason(_conv_checks(layer, 1, ('valid', 'same', 'causal')))


def conv1d(layer, x_shape, x, kernel, dy):
  """Conv1D (channels_last, ``groups=1``; padding 'valid', 'same' or
  'causal'; any strides, or any dilation_rate with stride 1).

  Causal padding is Keras's: the input is padded on the left by
  ``dilation_rate * (kernel_size - 1)``, then convolved 'valid'.

  Args:
    layer: the ``keras.layers.Conv1D``.
    x_shape: int32 shape of the input ``[N, W, C]``.
    x: the (restored) input, or None when the kernel is not trained.
    kernel: the kernel ``[k, C, filters]`` read in the forward pass.
    dy: gradient of the output (before the bias add).

  Returns:
    ``(dx, dkernel)`` (``dkernel`` None when ``x`` is None).
  """
  x_shape = tf.convert_to_tensor(x_shape, tf.int32)
  padding = layer.padding
  left = 0
  if padding == 'causal':
    left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
    padding = 'valid'
    x_shape = x_shape + tf.constant([0, left, 0], tf.int32)
    if x is not None:
      x = tf.pad(x, [[0, 0], [left, 0], [0, 0]])
  dx, dk = _conv_nd(1, layer.strides, padding.upper(), layer.dilation_rate,
                    x_shape, x, kernel, dy)
  if left:
    dx = dx[:, left:, :]
  return dx, dk


def supports_conv3d(layer):
  """'' when :func:`conv3d` handles ``layer`` (a Conv3D), else why not."""
  return _reason(_conv_checks(layer, 3, ('valid', 'same')))


def conv3d(layer, x_shape, x, kernel, dy):
  """Conv3D (channels_last, ``groups=1``; padding 'valid' or 'same'; any
  strides, or any dilation_rate with stride 1).

  Args:
    layer: the ``keras.layers.Conv3D``.
    x_shape: int32 shape of the input ``[N, D, H, W, C]``.
    x: the (restored) input, or None when the kernel is not trained.
    kernel: the kernel ``[kd, kh, kw, C, filters]`` read in the forward
      pass.
    dy: gradient of the output (before the bias add).

  Returns:
    ``(dx, dkernel)`` (``dkernel`` None when ``x`` is None).
  """
  return _conv_nd(3, layer.strides, layer.padding.upper(),
                  layer.dilation_rate, x_shape, x, kernel, dy)


def supports_conv2d_transpose(layer):
  """'' when :func:`conv2d_transpose` handles ``layer`` (a Conv2DTranspose),
  else why not."""
  return _reason([
      (len(getattr(layer, 'kernel_size', ())) != 2,
       'not a rank-2 transposed convolution'),
      _channels_last(layer),
      (getattr(layer, 'padding', None) not in ('valid', 'same'),
       f'padding={getattr(layer, "padding", None)!r}'),
      (getattr(layer, 'lora_enabled', False), 'LoRA-enabled kernel'),
  ])


def conv2d_transpose(layer, x_shape, x, kernel, dy):
  """Conv2DTranspose (channels_last; padding 'valid' or 'same'; any strides,
  output_padding and dilation_rate).

  Keras's TensorFlow backend runs ``tf.nn.conv_transpose``, i.e.
  ``Conv2DBackpropInput(input_sizes=output shape, filter=kernel,
  out_backprop=x)`` (output_padding only sets the output shape). Its
  gradients are TensorFlow's: ``dx = Conv2D(dy, kernel)`` and
  ``dkernel = Conv2DBackpropFilter(input=dy, out_backprop=x)``, with the
  layer's strides, padding and dilations. (TensorFlow's CPU kernels reject
  dilation_rate > 1 here, in the forward pass as in this one.)

  Args:
    layer: the ``keras.layers.Conv2DTranspose``.
    x_shape: int32 shape of the input (unused: ``dx`` takes it from the
      convolution).
    x: the (restored) input, or None when the kernel is not trained.
    kernel: the kernel ``[kh, kw, filters, C]`` read in the forward pass.
    dy: gradient of the output (before the bias add).

  Returns:
    ``(dx, dkernel)`` (``dkernel`` None when ``x`` is None).
  """
  del x_shape
  args = _conv_args(layer)
  dk = None
  if x is not None:
    dk = tf.raw_ops.Conv2DBackpropFilter(input=dy,
                                         filter_sizes=tf.shape(kernel),
                                         out_backprop=x, **args)
  with _after(dk):
    dx = tf.raw_ops.Conv2D(input=dy, filter=kernel, **args)
  return dx, dk


def supports_upsampling(layer):
  """'' when :func:`upsampling` handles ``layer`` (an UpSampling1D or
  UpSampling2D), else why not."""
  size = getattr(layer, 'size', None)
  rank = 1 if isinstance(size, int) else len(size or ())
  return _reason([
      (rank not in (1, 2), f'size={size!r} (only 1 or 2 dimensions)'),
      _channels_last(layer),
      (getattr(layer, 'interpolation', 'nearest') != 'nearest',
       f'interpolation={getattr(layer, "interpolation", None)!r} (only '
       'nearest)'),
  ])


def upsampling(layer, x_shape, dy):
  """UpSampling1D, or UpSampling2D with ``interpolation='nearest'``
  (channels_last): each input position gets the sum of ``dy`` over its
  block (as autodiff of Keras's ``repeat``: width block first, then height).

  Args:
    layer: the ``keras.layers.UpSampling1D`` or ``UpSampling2D``.
    x_shape: int32 shape of the input (``[N, W, C]`` or ``[N, H, W, C]``).
    dy: gradient of the output.

  Returns:
    ``dx``.
  """
  x_shape = tf.convert_to_tensor(x_shape, tf.int32)
  size = [layer.size] if isinstance(layer.size, int) else list(layer.size)
  if len(size) == 1:
    blocks = tf.reshape(dy, tf.stack([x_shape[0], x_shape[1], size[0],
                                      x_shape[2]]))
    return tf.reduce_sum(blocks, axis=2)
  ph, pw = size
  n, h, w, c = x_shape[0], x_shape[1], x_shape[2], x_shape[3]
  dy = tf.reduce_sum(tf.reshape(dy, tf.stack([n, h * ph, w, pw, c])), axis=3)
  return tf.reduce_sum(tf.reshape(dy, tf.stack([n, h, ph, w, c])), axis=2)


def supports_global_max_pool(layer):
  """'' when :func:`global_max_pool` handles ``layer`` (a
  GlobalMaxPooling1D or GlobalMaxPooling2D), else why not."""
  return _reason([_channels_last(layer)])


def _global_axes(rank):
  """Spatial axes of a channels_last tensor of rank ``rank``."""
  return list(range(1, rank - 1))


def global_max_pool_mask(layer, x):
  """Where the input equals its per-(sample, channel) maximum: what
  :func:`global_max_pool` needs.

  Args:
    layer: the ``keras.layers.GlobalMaxPooling1D`` or ``GlobalMaxPooling2D``
      (channels_last).
    x: the layer's input.

  Returns:
    A boolean tensor of ``x``'s shape.
  """
  del layer
  axes = _global_axes(x.shape.rank)
  return tf.equal(x, tf.reduce_max(x, axis=axes, keepdims=True))


def global_max_pool(layer, mask, dy):
  """GlobalMaxPooling1D or GlobalMaxPooling2D (channels_last, keepdims True
  or False).

  As TensorFlow's gradient of ``reduce_max``, the gradient of each
  (sample, channel) is split equally among the positions that hold the
  maximum: ``mask / count * dy``, in ``dy``'s dtype.

  Args:
    layer: the layer.
    mask: boolean tensor of the input's shape, from
      :func:`global_max_pool_mask`.
    dy: gradient of the output.

  Returns:
    ``dx``.
  """
  axes = _global_axes(mask.shape.rank)
  if not layer.keepdims:
    for axis in axes:
      dy = tf.expand_dims(dy, axis)
  indicators = tf.cast(mask, dy.dtype)
  count = tf.reduce_sum(indicators, axis=axes, keepdims=True)
  return indicators / count * dy


def supports_global_avg_pool1d(layer, masked=False):
  """'' when :func:`global_avg_pool1d` handles ``layer`` (a
  GlobalAveragePooling1D), called with a Keras mask when ``masked``, else
  why not."""
  return _reason([_channels_last(layer),
                  (masked, 'called with a mask (not supported)')])


def global_avg_pool1d(layer, x_shape, dy):
  """GlobalAveragePooling1D (channels_last, keepdims True or False, called
  without a mask).

  Keras averages 16-bit inputs in float32; so is ``dy`` divided here, then
  cast back to its dtype.

  Args:
    layer: the ``keras.layers.GlobalAveragePooling1D``.
    x_shape: int32 shape of the input ``[N, W, C]``.
    dy: gradient of the output.

  Returns:
    ``dx``.
  """
  x_shape = tf.convert_to_tensor(x_shape, tf.int32)
  if not layer.keepdims:
    dy = dy[:, None, :]
  dtype = dy.dtype
  g = tf.cast(dy, tf.float32) if dtype.size < 4 else dy
  g = tf.broadcast_to(g, x_shape) / tf.cast(x_shape[1], g.dtype)
  return tf.cast(g, dtype)


def _pool1d_checks(layer):
  return [_channels_last(layer),
          (getattr(layer, 'padding', None) not in ('valid', 'same'),
           f'padding={getattr(layer, "padding", None)!r}')]


def _pool1d_args(layer):
  """Arguments of the rank-2 pooling ops that ``tf.nn.max_pool1d`` and
  ``avg_pool1d`` run, on ``[N, 1, W, C]``."""
  return dict(ksize=[1, 1, layer.pool_size[0], 1],
              strides=[1, 1, layer.strides[0], 1],
              padding=layer.padding.upper())


def supports_avg_pool1d(layer):
  """'' when :func:`avg_pool1d` handles ``layer`` (an AveragePooling1D),
  else why not."""
  return _reason(_pool1d_checks(layer))


def avg_pool1d(layer, x_shape, dy):
  """AveragePooling1D (channels_last; padding 'valid' or 'same'; any
  pool_size and strides). Only the input shape is needed.

  Args:
    layer: the ``keras.layers.AveragePooling1D``.
    x_shape: int32 shape of the input ``[N, W, C]``.
    dy: gradient of the output.

  Returns:
    ``dx``.
  """
  x_shape = tf.convert_to_tensor(x_shape, tf.int32)
  shape4 = tf.concat([x_shape[:1], [1], x_shape[1:]], 0)
  dx = tf.raw_ops.AvgPoolGrad(orig_input_shape=shape4,
                              grad=tf.expand_dims(dy, 1),
                              **_pool1d_args(layer))
  return tf.squeeze(dx, [1])


def supports_max_pool1d(layer):
  """'' when :func:`max_pool1d` handles ``layer`` (a MaxPooling1D), else
  why not."""
  return _reason(_pool1d_checks(layer))


def max_pool1d(layer, x, dy):
  """MaxPooling1D from the (restored) input (channels_last; padding 'valid'
  or 'same'; any pool_size and strides). As TensorFlow's MaxPoolGrad, each
  window's gradient goes to one position holding its maximum.

  Args:
    layer: the ``keras.layers.MaxPooling1D``.
    x: the (restored) input ``[N, W, C]``.
    dy: gradient of the output.

  Returns:
    ``dx``.
  """
  args = _pool1d_args(layer)
  x4 = tf.expand_dims(x, 1)
  y4 = tf.nn.max_pool2d(x4, **args)
  dx = tf.raw_ops.MaxPoolGrad(orig_input=x4, orig_output=y4,
                              grad=tf.expand_dims(dy, 1), **args)
  return tf.squeeze(dx, [1])

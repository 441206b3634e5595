"""Analytic backward passes of Keras layers, as functions of tensors.

Each function takes what the layer kept (shapes, compact copies restored by
:mod:`blpa.keras.codecs`, weights read in the forward pass) and the
gradient of the layer's output, and returns input and weight gradients.
They use TensorFlow's own gradient kernels, so at ``bits=0`` they give the
gradients Keras computes.
"""

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
  args = _conv_args(layer)
  dk = None
  if x is not None:
    dk = tf.raw_ops.Conv2DBackpropFilter(input=x,
                                         filter_sizes=tf.shape(kernel),
                                         out_backprop=dy, **args)
  with _after(dk):
    dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=x_shape, filter=kernel,
                                        out_backprop=dy, **args)
  return dx, dk


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
    dpoint = tf.raw_ops.Conv2DBackpropFilter(
        input=mid, filter_sizes=tf.shape(pointwise), out_backprop=dy, **point)
  with _after(dpoint):
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
  """Gradient of a bias added on the last axis."""
  return tf.reduce_sum(dy, axis=list(range(dy.shape.rank - 1)))


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
  area = tf.cast(x_shape[1] * x_shape[2], dy.dtype)
  return tf.broadcast_to(dy / area, x_shape)


def zero_padding2d(layer, x_shape, dy):
  """ZeroPadding2D (channels_last): the unpadded window of ``dy``."""
  (top, _), (left, _) = layer.padding
  return tf.slice(dy, [0, top, left, 0], x_shape)


def cropping2d(layer, dy):
  """Cropping2D (channels_last): ``dy`` padded back with zeros."""
  (top, bottom), (left, right) = layer.cropping
  return tf.pad(dy, [[0, 0], [top, bottom], [left, right], [0, 0]])


def concatenate(axis, sizes, dy):
  """Concatenate: ``dy`` split along the axis into the inputs' sizes."""
  return tf.split(dy, sizes, axis=axis)

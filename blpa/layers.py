"""Layer specs of width-2 residual chains, and each layer's exact math.

A network is a data layer, a chain of layers and a loss layer
(``docs/algorithm.md`` states each layer's forward and backward pass).  Each
layer applies, in order: res_in (add the residual buffer), BN, bias, ReLU /
max pool, res_out (copy into the residual buffer), global average pool,
convolution.  This module holds

* the user-facing spec types :class:`NLDef`, :class:`SimpleData` and
  :class:`LogLoss`;
* :class:`Layer`, one layer with its shapes checked when it is added;
* the per-layer forward pass (:func:`forward`) and the hand-written backward
  pass (:func:`backward`) as pure functions of tensors, so that
  :mod:`blpa.graph` (one device) and :mod:`blpa.mgraph` (several) share them.

What a layer keeps for its backward pass (``saved``) is a dict of tensors:
``'act'`` (the K-bit codes of ``a = out/cs``, or a full-precision copy of the
pre-scale value ``u``: the BN output ``y``, or the input sum ``z`` without
BN), ``'sigma'`` (BN standard deviation) and ``'offset'`` (``c = b/cs``).
"""

import dataclasses
from typing import Optional, Tuple

import tensorflow as tf

from blpa import fused

BN_EPSILON = 1e-3
SCALE_MIN = 1e-8
RUNNING_MOMENTUM = 0.9
PADDINGS = ('SAME', 'VALID')
QTYPES = (0, 4, 8)


class NLDef:
  """What a layer does to its input before its convolution.

  Args:
    bn: batch-normalize (batch statistics) with a learned scale.
    relu: apply ReLU after BN and bias.
    res_in: add the pending residual buffer to the input first.
    res_out: ``1`` copy the input sum (before BN) into the residual buffer,
      ``2`` copy the post-ReLU (post-pool) output, ``None`` nothing.
    avpool: global average pool before the convolution (needs ``ksz == 1``).
    maxpool: 3x3 stride-2 SAME max pool after the ReLU.
  """

  def __init__(self, bn, relu, res_in, res_out, avpool, maxpool=False):
    if res_out in (0, False):
      res_out = None
    if res_out not in (None, 1, 2):
      raise ValueError(f'NLDef: res_out must be None, 1 or 2, got {res_out!r}')
    self.bn = bool(bn)
    self.relu = bool(relu)
    self.res_in = bool(res_in)
    self.res_out = res_out
    self.avpool = bool(avpool)
    self.maxpool = bool(maxpool)

  def as_list(self):
    """Returns ``[bn, relu, res_in, res_out, avpool]`` (+ maxpool if set)."""
    out = [self.bn, self.relu, self.res_in, self.res_out, self.avpool]
    return out + [True] if self.maxpool else out

  def __eq__(self, other):
    return isinstance(other, NLDef) and self.as_list() == other.as_list()

  def __repr__(self):
    args = ', '.join(repr(v) for v in self.as_list()[:5])
    return f'NLDef({args}{", maxpool=True" if self.maxpool else ""})'


class SimpleData:
  """Data layer: a float32 batch of shape ``[batch, height, width, channels]``.

  Args:
    shape: the four sizes; the batch size is the default for memory
      estimates, and ``forward`` accepts other batch sizes.
  """

  def __init__(self, shape):
    shape = [int(s) for s in shape]
    if len(shape) != 4 or min(shape) < 1:
      raise ValueError('SimpleData: shape must be [batch, height, width, '
                       f'channels] with positive sizes, got {shape}')
    self.shape = shape


class LogLoss:
  """Loss layer: per-class bias, mean softmax cross-entropy and accuracy.

  The number of classes is the last layer's ``out_ch``; labels are integers
  in ``[0, classes)``, shaped ``[B, 1, 1, 1]`` (or ``[B]``).
  """


@dataclasses.dataclass
class Layer:
  """One layer of the chain, with its shapes worked out when it was added.

  Attributes:
    index: position in the chain (0 is the layer on the data).
    ksz, out_ch, stride, pad: the convolution.
    nl: the :class:`NLDef`.
    in_shape: ``(H, W, C)`` of the layer's input (the previous conv output).
    residual_shape: ``(H, W, C)`` of the residual buffer joined at res_in.
    pool_shape: ``(H, W, C)`` after ReLU / max pool (the res_out=2 copy).
    out_shape: ``(H, W, out_ch)`` of the convolution output.
    bits: 4 or 8 if the activation copy is K-bit, 0 for a full-precision
      copy (set by ``close``).
  """
  index: int
  ksz: int
  out_ch: int
  stride: int
  pad: str
  nl: NLDef
  in_shape: Tuple[int, int, int]
  residual_shape: Optional[Tuple[int, int, int]] = None
  pool_shape: Tuple[int, int, int] = None
  out_shape: Tuple[int, int, int] = None
  bits: int = 0

  @property
  def has_scale(self):
    return self.nl.bn

  @property
  def has_bias(self):
    return self.index > 0

  @property
  def in_ch(self):
    return self.in_shape[2]

  @property
  def residual_ratio(self):
    """Box size r of the downsampling join (1 when sizes agree)."""
    return self.residual_shape[0] // self.in_shape[0]

  @property
  def residual_pad(self):
    """Zero channels added on each side of the residual at the join."""
    return (self.in_ch - self.residual_shape[2]) // 2

  def param_shapes(self):
    """Shapes of the layer's weights, in checkpoint order."""
    shapes = []
    if self.has_scale:
      shapes.append(('scale', (self.in_ch,)))
    if self.has_bias:
      shapes.append(('bias', (self.in_ch,)))
    shapes.append(('kernel', (self.ksz, self.ksz, self.in_ch, self.out_ch)))
    return shapes

  def describe(self):
    return (f'layer {self.index} (add({self.ksz}, {self.out_ch}, '
            f'{self.stride}, {self.pad!r}, {self.nl!r}))')


def _conv_size(size, ksz, stride, pad):
  if pad == 'SAME':
    return -(-size // stride)
  return -(-(size - ksz + 1) // stride)


def make_layer(index, ksz, out_ch, stride, pad, nl, in_shape, residual):
  """Checks one ``add`` call and works out its shapes.

  Args:
    index: the new layer's position.
    ksz, out_ch, stride, pad, nl: the arguments of ``add``.
    in_shape: ``(H, W, C)`` of the input.
    residual: ``(shape, source_index)`` of the pending residual, or None.

  Returns:
    ``(layer, residual)``: the :class:`Layer` and the residual pending after
    it (``None`` if none).

  Raises:
    ValueError: naming the layer and what is wrong with it.
  """
  where = f'layer {index} (add({ksz}, {out_ch}, {stride}, {pad!r}, {nl!r}))'

  def fail(msg):
    raise ValueError(f'{where}: {msg}')

  if not isinstance(nl, NLDef):
    fail(f'the last argument must be an NLDef, got {type(nl).__name__}')
  for name, value in (('ksz', ksz), ('out_ch', out_ch), ('stride', stride)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      fail(f'{name} must be a positive integer, got {value!r}')
  if pad not in PADDINGS:
    fail(f'pad must be one of {PADDINGS}, got {pad!r}')
  if nl.avpool and ksz != 1:
    fail(f'avpool needs ksz == 1 (the pooled input is 1x1), got ksz={ksz}')
  h, w, c = in_shape
  layer = Layer(index, ksz, out_ch, stride, pad, nl, tuple(in_shape))
  if nl.res_in:
    if residual is None:
      fail('res_in is set but no residual is pending (no earlier layer set '
           'res_out since the last join)')
    layer.residual_shape = residual[0]
    _check_join(layer, residual, fail)
    residual = None
  if nl.maxpool:
    h, w = -(-h // 2), -(-w // 2)
  layer.pool_shape = (h, w, c)
  if nl.res_out is not None:
    if residual is not None:
      fail(f'res_out={nl.res_out} but the residual from layer {residual[1]} '
           'is still pending (only one residual buffer exists; join it with '
           'res_in first)')
    residual = (in_shape if nl.res_out == 1 else layer.pool_shape, index)
  if nl.avpool:
    h, w = 1, 1
  if pad == 'VALID' and (ksz > h or ksz > w):
    fail(f'VALID {ksz}x{ksz} convolution on a {h}x{w} input has no output')
  layer.out_shape = (_conv_size(h, ksz, stride, pad),
                     _conv_size(w, ksz, stride, pad), out_ch)
  return layer, residual


def _check_join(layer, residual, fail):
  """Checks that the residual buffer can be added to the layer's input."""
  (bh, bw, bc), src = residual
  h, w, c = layer.in_shape
  what = (f'residual from layer {src} has shape {bh}x{bw}x{bc} but the input '
          f'is {h}x{w}x{c}')
  if bh % h or bw % w or bh // h != bw // w:
    fail(f'{what}: the join can only shrink height and width by the same '
         'integer factor (average pooling r x r, stride r)')
  if bc > c or (c - bc) % 2:
    fail(f'{what}: the join can only zero-pad channels equally on both sides '
         '(input channels must be >= residual channels, difference even)')


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------


def join_residual(layer, buf):
  """The residual buffer resized to the layer's input (pool, then pad)."""
  r = layer.residual_ratio
  if r > 1:
    buf = tf.nn.avg_pool2d(buf, r, r, 'VALID')
  p = layer.residual_pad
  if p:
    buf = tf.pad(buf, [[0, 0], [0, 0], [0, 0], [p, p]])
  return buf


def join_residual_grad(layer, grad):
  """Gradient w.r.t. the residual buffer from the gradient at the join."""
  p = layer.residual_pad
  if p:
    grad = grad[..., p:layer.in_ch - p]
  r = layer.residual_ratio
  if r > 1:
    n, h, w, c = tf.unstack(tf.shape(grad))
    grad = tf.broadcast_to(grad[:, :, None, :, None, :] / float(r * r),
                           [n, h, r, w, r, c])
    grad = tf.reshape(grad, [n, h * r, w * r, c])
  return grad


def clamped_scale(scale):
  """The scale used in the network: ``max(s, 1e-8)``."""
  return tf.maximum(scale, SCALE_MIN)


def nonlinearity(layer, h):
  """ReLU and max pool of the pre-activation ``h``.

  Returns:
    ``(r, p)``: post-ReLU value and post-pool value (``p is r`` without a
    max pool).
  """
  r = tf.nn.relu(h) if layer.nl.relu else h
  return r, max_pool(layer, r)


def max_pool(layer, r):
  """The layer's 3x3 stride-2 SAME max pool of ``r`` (``r`` without one)."""
  return tf.nn.max_pool2d(r, 3, 2, 'SAME') if layer.nl.maxpool else r


def conv_input(layer, p):
  """The convolution's input: ``p``, globally averaged if avpool."""
  if layer.nl.avpool:
    return tf.reduce_mean(p, axis=[1, 2], keepdims=True)
  return p


def forward(layer, params, x, buf, bn_stats=None, save=True):
  """Runs one layer exactly.

  The batch moments, then BN, scale, bias and ReLU with the saved copy, run
  as fused ops (:mod:`blpa.fused`), with the float32 results of the
  unfused formulas.

  Args:
    layer: the :class:`Layer`.
    params: dict of the layer's weights (``'scale'``, ``'bias'``,
      ``'kernel'``) as tensors.
    x: the layer's input ``[N, H, W, C]``.
    buf: the residual buffer (None if none is pending).
    bn_stats: ``None`` for batch statistics, else ``(mean, var)`` to use.
    save: whether to return what the backward pass needs.

  Returns:
    ``(out, buf, saved, moments)``: convolution output, residual buffer after
    the layer, the dict of tensors to keep (None unless ``save``), and the
    batch ``(mean, var)`` (None without BN or with ``bn_stats``).
  """
  z = x + join_residual(layer, buf) if layer.nl.res_in else x
  saved, moments = {}, None
  if layer.has_scale:
    if bn_stats is None:
      mean, var = fused.bn_moments(z)
      moments = (mean, var)
    else:
      mean, var = bn_stats
    sigma = tf.sqrt(var + BN_EPSILON)
    cs = clamped_scale(params['scale'])
    bias = _bias(layer, params, cs)
    bits = layer.bits if save else 0
    r, saved['act'] = fused.bn_relu_forward(z, mean, sigma, cs, bias, bits,
                                            layer.nl.relu)
    saved['sigma'] = sigma
    if bits:
      saved['offset'] = bias / cs
    p = max_pool(layer, r)
  else:
    h = z + params['bias'] if layer.has_bias else z
    _, p = nonlinearity(layer, h)
    saved['act'] = z
  if layer.nl.res_out == 1:
    buf = z
  elif layer.nl.res_out == 2:
    buf = p
  out = tf.nn.conv2d(conv_input(layer, p), params['kernel'], layer.stride,
                     layer.pad)
  return out, buf, (saved if save else None), moments


def _bias(layer, params, cs):
  """The layer's bias, zeros without one."""
  return params['bias'] if layer.has_bias else tf.zeros_like(cs)


# ----------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------


def _restore(layer, params, saved):
  """The (approximate) post-ReLU value ``r`` rebuilt from ``saved``.

  From K-bit codes ``ã`` (BN layers): ``relu(ã·cs)``, the mask exact since
  zero lies on a bin edge. From a full copy: recomputed exactly as in the
  forward pass.
  """
  if layer.has_scale:
    cs = clamped_scale(params['scale'])
    center = _center(layer, params, saved, cs)
    return fused.bn_relu_restore(saved['act'], cs, center, layer.bits,
                                 layer.nl.relu)
  h = saved['act'] + params['bias'] if layer.has_bias else saved['act']
  return nonlinearity(layer, h)[0]


def _center(layer, params, saved, cs):
  """What the fused ops need besides the copy: the offset or the bias."""
  return saved['offset'] if layer.bits else _bias(layer, params, cs)


def _bn_relu_grad(layer, params, saved, g, grads):
  """ReLU mask and BN backward (bias and scale gradients into ``grads``)."""
  cs = clamped_scale(params['scale'])
  g, dbias, dscale = fused.bn_relu_grad(
      g, saved['act'], cs, _center(layer, params, saved, cs), saved['sigma'],
      layer.bits, layer.nl.relu)
  if layer.has_bias:
    grads['bias'] = dbias
  grads['scale'] = dscale
  return g


def backward(layer, params, saved, grad, rgrad, weight_decay):
  """The hand-written backward pass of one layer.

  Args:
    layer: the :class:`Layer`.
    params: dict of the layer's weights as tensors (read before update).
    saved: what :func:`forward` saved for this layer.
    grad: gradient w.r.t. the layer's convolution output.
    rgrad: gradient w.r.t. the residual buffer after this layer (None if no
      residual is pending there).
    weight_decay: added to the kernel gradient as ``weight_decay * kernel``.

  Returns:
    ``(grads, grad_in, rgrad)``: dict of weight gradients, gradient w.r.t.
    the layer's input (None for the first layer) and w.r.t. the residual
    buffer before the layer.
  """
  r = _restore(layer, params, saved)
  p = max_pool(layer, r)
  act = conv_input(layer, p)
  kernel = params['kernel']
  grads = {'kernel': tf.raw_ops.Conv2DBackpropFilter(
      input=act, filter_sizes=tf.shape(kernel), out_backprop=grad,
      strides=[1, layer.stride, layer.stride, 1], padding=layer.pad)
           + weight_decay * kernel}
  if layer.index == 0 and not (layer.has_scale or layer.has_bias):
    return grads, None, rgrad
  # A BN layer's restored activation is dead once the kernel gradient is
  # computed (the BN backward reads the copy): free it before the input
  # gradient is allocated, so one full-size tensor is alive, not two.
  frees_act = layer.has_scale and not layer.nl.maxpool
  with tf.control_dependencies([grads['kernel']] if frees_act else []):
    g = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=tf.shape(act), filter=kernel, out_backprop=grad,
        strides=[1, layer.stride, layer.stride, 1], padding=layer.pad)
  if layer.nl.avpool:
    ph, pw, _ = layer.pool_shape
    g = tf.broadcast_to(g, tf.shape(p)) / float(ph * pw)
  if layer.nl.res_out == 2:
    g = g + rgrad
  if layer.nl.maxpool:
    g = tf.raw_ops.MaxPoolGrad(orig_input=r, orig_output=p, grad=g,
                               ksize=[1, 3, 3, 1], strides=[1, 2, 2, 1],
                               padding='SAME')
  if layer.has_scale:
    g = _bn_relu_grad(layer, params, saved, g, grads)
  else:
    if layer.nl.relu:
      g = tf.where(r > 0, g, 0.0)
    if layer.has_bias:
      grads['bias'] = tf.reduce_sum(g, axis=[0, 1, 2])
  if layer.nl.res_out == 1:
    g = g + rgrad
  if layer.nl.res_in:
    rgrad = join_residual_grad(layer, g)
  elif layer.nl.res_out is not None:
    rgrad = None
  return grads, (g if layer.index > 0 else None), rgrad


# ----------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------


def loss_forward(out, bias, labels):
  """Softmax cross-entropy of the last convolution output.

  Args:
    out: last convolution output ``[B, 1, 1, classes]``.
    bias: loss-layer bias ``[classes]``.
    labels: int32 ``[B]``.

  Returns:
    ``(acc, loss, grad)``: accuracy, mean loss, and the gradient of the loss
    w.r.t. ``out``, ``(softmax − onehot)/B``.
  """
  logits = tf.reshape(out, [-1, out.shape[-1]]) + bias
  loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=labels, logits=logits))
  pred = tf.argmax(logits, axis=1, output_type=tf.int32)
  acc = tf.reduce_mean(tf.cast(tf.equal(pred, labels), tf.float32))
  batch = tf.cast(tf.shape(logits)[0], tf.float32)
  grad = (tf.nn.softmax(logits) - tf.one_hot(labels, out.shape[-1])) / batch
  return acc, loss, tf.reshape(grad, tf.shape(out))


def predictions(out, bias):
  """Softmax probabilities ``[B, classes]`` of the last convolution output."""
  return tf.nn.softmax(tf.reshape(out, [-1, out.shape[-1]]) + bias)

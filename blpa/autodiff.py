"""The same networks written with ordinary TF ops, for ``tf.GradientTape``.

This is what users would write without blpa: every activation is kept by
autodiff.  It serves as the exact reference for blpa's hand-written
gradients (tests) and as the baseline of the benchmarks, optionally with
``tf.recompute_grad`` around each residual stage (TensorFlow's own memory
saver).  It is written independently of :mod:`blpa.layers` on purpose.

``naive_bits`` (4 or 8) gives the paper's "naive" baseline: the output of
each BN+ReLU layer that blpa would store at K bits is replaced, as the input
of the next convolution, by its K-bit quantize→restore value (the quantizer
of :mod:`blpa.quant`), with a straight-through gradient.  The quantization
error then accumulates through the forward pass, unlike blpa's. Other naive
baselines (fixed-point rounding, :mod:`blpa.fixedpoint`) pass their own
``naive_fn`` for the same layers.
"""

import functools

import tensorflow as tf

from blpa import layers as layers_lib
from blpa import quant


def _unflatten(layers, weights):
  """Splits a checkpoint-ordered weight list into per-layer dicts."""
  params, i = [], 0
  for layer in layers:
    names = [name for name, _ in layer.param_shapes()]
    params.append(dict(zip(names, weights[i:i + len(names)])))
    i += len(names)
  return params, weights[i]


def naive_quantized(layer, p, pre, out, bits):
  """``out`` = relu(``pre``) forward-replaced by its K-bit approximation.

  The value quantized is ``pre/cs`` with offset ``bias/cs``, as blpa stores
  it; the gradient passes straight through to ``out``.
  """
  cs = tf.maximum(p['scale'], layers_lib.SCALE_MIN)
  offset = p['bias'] / cs if 'bias' in p else tf.zeros_like(cs)
  approx, _ = quant.restore_act(quant.save_act(pre / cs, offset, bits),
                                offset, bits)
  return out + tf.stop_gradient(tf.nn.relu(approx * cs) - out)


def _naive_eligible(layer, last_index):
  """Whether blpa would keep a K-bit copy of this layer's activation."""
  return (layer.nl.bn and layer.nl.relu and not layer.nl.maxpool and
          layer.index != last_index)


def _layer(layer, p, x, buf, naive_fn=None):
  """One layer with ordinary ops; returns (conv output, residual buffer).

  With ``naive_fn``, the convolution's input is ``naive_fn(layer, p, pre,
  relu(pre))`` (e.g. the K-bit approximation of the post-ReLU value with a
  straight-through gradient); the residual buffer keeps the exact value.
  """
  z = x
  if layer.nl.res_in:
    r = layer.residual_ratio
    if r > 1:
      buf = tf.nn.avg_pool2d(buf, r, r, 'VALID')
    pad = layer.residual_pad
    z = z + tf.pad(buf, [[0, 0], [0, 0], [0, 0], [pad, pad]])
  h = z
  if layer.nl.bn:
    mean, var = tf.nn.moments(z, axes=[0, 1, 2])
    h = (z - mean) / tf.sqrt(var + layers_lib.BN_EPSILON)
    h = h * tf.maximum(p['scale'], layers_lib.SCALE_MIN)
  if 'bias' in p:
    h = h + p['bias']
  conv_in = None
  if layer.nl.relu:
    pre, h = h, tf.nn.relu(h)
    if naive_fn is not None:
      conv_in = naive_fn(layer, p, pre, h)
  if layer.nl.maxpool:
    h = tf.nn.max_pool2d(h, 3, 2, 'SAME')
  if layer.nl.res_out == 1:
    buf = z
  elif layer.nl.res_out == 2:
    buf = h
  if conv_in is not None:
    h = conv_in
  if layer.nl.avpool:
    h = tf.reduce_mean(h, axis=[1, 2], keepdims=True)
  return tf.nn.conv2d(h, p['kernel'], layer.stride, layer.pad), buf


def _stages(layers):
  """Splits the chain at layers that start a new residual (res_out set).

  Each stage (a run of layers between two residual starts) can be wrapped
  in ``tf.recompute_grad``: its inputs are the chain value and the buffer.
  """
  stages, current = [], []
  for layer in layers:
    if layer.nl.res_out is not None and current:
      stages.append(current)
      current = []
    current.append(layer)
  return stages + [current]


def logits(layers, weights, x, recompute=False, naive_bits=0, naive_fn=None):
  """Logits ``[B, classes]`` of the network.

  Args:
    layers: the :class:`blpa.layers.Layer` list of a closed graph.
    weights: tensors in checkpoint order (as ``Graph.weights``).
    x: input batch.
    recompute: wrap each residual stage in ``tf.recompute_grad``.
    naive_bits: 0 (exact), or 4 / 8 for naive K-bit activations (see the
      module docstring).
    naive_fn: instead of ``naive_bits``, a function ``(layer, params, pre,
      out)`` → the next convolution's input, applied at the layers where
      blpa keeps K-bit copies (``pre``: the pre-ReLU value, ``out =
      relu(pre)``); for other naive baselines.

  Returns:
    The logits.
  """
  if naive_bits not in layers_lib.QTYPES:
    raise ValueError(f'naive_bits must be 0, 4 or 8, got {naive_bits!r}')
  if naive_bits and naive_fn is not None:
    raise ValueError('give naive_bits or naive_fn, not both')
  if naive_bits:
    naive_fn = functools.partial(naive_quantized, bits=naive_bits)
  params, loss_bias = _unflatten(layers, list(weights))
  last_index = layers[-1].index
  by_index = dict(zip((l.index for l in layers), params))
  buf = tf.zeros([1, 1, 1, 1])  # placeholder until the first res_out
  for stage in _stages(layers):
    names = [(l, n) for l in stage for n in by_index[l.index]]

    def run(h, b, *stage_weights, stage=stage, names=names):
      p = {l.index: {} for l in stage}
      for (l, n), w in zip(names, stage_weights):
        p[l.index][n] = w
      for layer in stage:
        naive = naive_fn if _naive_eligible(layer, last_index) else None
        h, b = _layer(layer, p[layer.index], h, b, naive)
      return h, b

    fn = tf.recompute_grad(run) if recompute else run
    x, buf = fn(x, buf, *[by_index[l.index][n] for l, n in names])
  return tf.reshape(x, [-1, layers[-1].out_ch]) + loss_bias


def loss(layers, weights, x, y, weight_decay, recompute=False,
         naive_bits=0, naive_fn=None):
  """Mean cross-entropy plus ``weight_decay/2·Σ‖kernel‖²``.

  Returns:
    ``(objective, accuracy, cross_entropy)``.
  """
  out = logits(layers, weights, x, recompute, naive_bits, naive_fn)
  xent = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=y, logits=out))
  kernels = [w for w in weights if w.shape.rank == 4]
  decay = 0.5 * weight_decay * tf.add_n([tf.reduce_sum(k * k)
                                         for k in kernels])
  acc = tf.reduce_mean(tf.cast(
      tf.equal(tf.argmax(out, axis=1, output_type=tf.int32), y), tf.float32))
  return xent + decay, acc, xent


def gradients(layers, weights, x, y, weight_decay, recompute=False,
              naive_bits=0, naive_fn=None):
  """Gradients of :func:`loss` w.r.t. ``weights`` by GradientTape.

  Exact unless ``naive_bits`` or ``naive_fn`` is set (then: a naive
  baseline, see :func:`logits`).

  Returns:
    List of gradient tensors in checkpoint order.
  """
  with tf.GradientTape() as tape:
    tape.watch(weights)
    objective, _, _ = loss(layers, weights, x, y, weight_decay, recompute,
                           naive_bits, naive_fn)
  return tape.gradient(objective, weights)

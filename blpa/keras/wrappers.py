"""The wrappers that run one node (or a BN+ReLU pair) with its own backward.

Each wrapper runs the layer's own forward pass (the same ops as Keras, so
outputs and BN moving statistics are those of the original model) with the
outer tape paused, keeps only compact copies, and returns a backward
function. Every backward function first waits for its incoming gradient
(a control dependency) before it restores anything, so that inside
``tf.function`` the restores run one layer at a time, last to first; and a
layer with weights hands its input gradient on only once its weight
gradients are computed, so that its incoming gradient and restored input
are freed before the layers below start (without this, TF's executor may
run the input-gradient chain ahead and leave many layers' gradients alive
at once: ResNet50V2's peak at batch 768 varied from 876 to 1762 MiB run to
run, 906 to 998 MiB with it).
"""

import numpy as np
import tensorflow as tf
from keras import ops

from blpa import masks as masks_lib, quant

try:  # one-pass BN+ReLU kernels, when the package has them
  from blpa import fused
except ImportError:  # pragma: no cover
  fused = None
from blpa.keras import activations as activations_lib, backward, codecs, \
    einsum, plan as plan_lib
from blpa.keras.gradient import custom_op, logits_of, raw_variable, \
    trainable_of

_SCALE_MIN = np.float32(1e-8)


def _after(grads, fn):
  """Runs ``fn()`` once every tensor of ``grads`` is computed."""
  deps = [g for g in grads if g is not None]
  with tf.control_dependencies(deps):
    return fn()


def _handed_on(input_grads, weight_grads):
  """``input_grads``, made available only once the layer's weight gradients
  are computed (unchanged when it has none): the layers below then wait
  for them, which frees the layer's incoming gradient and restored input
  before they start."""
  if all(g is None for g in weight_grads):
    return input_grads
  return _after(weight_grads, lambda: [tf.identity(d) for d in input_grads])


# ---------------------------------------------------------------------------
# BatchNormalization (+ ReLU / ReLU6): the BLPA case.


def autocast_input(layer, x):
  """``x`` as ``layer.__call__`` hands it to ``call``: float inputs cast to
  the layer's input dtype when it autocasts (under mixed precision, the
  compute dtype)."""
  return layer.dtype_policy.convert_input(x, layer.autocast, layer.input_dtype)


def bn_forward(layer, z, batch_stats):
  """The forward pass of ``keras.layers.BatchNormalization.call``.

  The same ops in the same order (no mask, no renorm), so outputs and
  moving statistics are bit-identical to the layer's. Half-precision
  inputs are computed in float32, as Keras does.

  Returns:
    ``(out, mean, variance, gamma, beta)``; gamma/beta None when absent;
    all but ``out`` (the layer's compute dtype) float32.
  """
  z = ops.cast(z, 'float32')
  moving_mean = ops.cast(layer.moving_mean, z.dtype)
  moving_variance = ops.cast(layer.moving_variance, z.dtype)
  gamma = ops.cast(layer.gamma, z.dtype) if layer.scale else None
  beta = ops.cast(layer.beta, z.dtype) if layer.center else None
  if batch_stats:
    mean, variance = layer._moments(z, None)  # pylint: disable=protected-access
    layer.moving_mean.assign(moving_mean * layer.momentum +
                             mean * (1.0 - layer.momentum))
    layer.moving_variance.assign(moving_variance * layer.momentum +
                                 variance * (1.0 - layer.momentum))
  else:
    mean, variance = moving_mean, moving_variance
  out = ops.batch_normalization(x=z, mean=mean, variance=variance,
                                axis=layer.axis, offset=beta, scale=gamma,
                                epsilon=layer.epsilon)
  return ops.cast(out, layer.compute_dtype), mean, variance, gamma, beta


#: Bits at which BN codes span the batch's values (:func:`code_widening`).
WIDENED_BITS = (8,)
#: Normalized half-range the codes cover for any offset (docs/algorithm.md's
#: quantizer spans about ±3, less up to two bins at the edges).
_CODE_HALF_RANGE = 3.0


def code_widening(h, beta, scale, bits):
  """Per-channel factor (>= 1) on ``scale`` so that codes do not clip.

  BLPA's codes span about ±3 in normalized units: at 8 bits, clipping the
  batch's larger values (a heavy-tailed channel reaches 12 in a deep
  ResNet) is most of the error of the gradients, while the bins are fine
  enough to afford a wider span. At 4 bits the coarser bins of a wider span
  cost more than the clipping, so the range stays BLPA's.

  Args:
    h: the BN output (before any activation).
    beta: the offset ``[C]``.
    scale: ``max(|gamma|, 1e-8)`` ``[C]``.
    bits: 4 or 8.

  Returns:
    float32 ``[C]`` (None when the range is not widened at these bits).
  """
  if bits not in WIDENED_BITS:
    return None
  axes = list(range(h.shape.rank - 1))
  # max |h - beta| from the extremes: no full-size temporary.
  reach = tf.maximum(tf.reduce_max(h, axis=axes) - beta,
                     beta - tf.reduce_min(h, axis=axes)) / scale
  span = _CODE_HALF_RANGE - 2.0 * 6.0 / 2**bits
  return tf.maximum(reach / span, 1.0)


class BatchNormCopy:
  """What a BN (+ ReLU) keeps: K-bit codes of its output, or its input.

  At ``bits`` 4 or 8, the codes of ``a = h / cs`` with offset ``c = beta /
  cs`` and ``cs = max(|gamma|, 1e-8)`` (docs/algorithm.md, "What each layer
  saves"): the ReLU mask ``h > 0`` is exact; ReLU6 adds a packed mask of
  ``h < 6``. The codes span about ±3 in normalized units; at 8 bits
  ``cs`` is widened per channel (:func:`code_widening`) so that they span
  the batch's largest normalized value instead of clipping it. At
  ``bits=0``, the exact input ``z`` (one copy) and the statistics, from
  which the output is recomputed with the same op. The object is also the
  codec of the activation's output for the layers that take it
  (:meth:`restore`).
  """

  def __init__(self, layer, act, bits, z, h, mean, variance, gamma, beta,
               batch_stats):
    self.act, self.bits, self.batch_stats = act, bits, batch_stats
    self.epsilon = layer.epsilon
    self.out_dtype = tf.as_dtype(layer.compute_dtype)
    self.shape = tf.shape(z)
    self.static_shape = z.shape
    channels = z.shape[-1]
    self.gamma = gamma if gamma is not None else tf.ones([channels])
    self.beta = beta if beta is not None else tf.zeros([channels])
    self.mean, self.variance = mean, variance
    self.inv_sigma = tf.math.rsqrt(variance + self.epsilon)
    if bits:
      self.scale = scale = tf.maximum(tf.abs(self.gamma), _SCALE_MIN)
      self.widen = code_widening(h, self.beta, scale, bits)
      self.cs = scale if self.widen is None else scale * self.widen
      self.sign = tf.where(self.gamma < 0, -1.0, 1.0)
      self.offset = self.beta / self.cs
      self.codes = quant.save_scaled_act(codecs.as_4d(h), self.cs,
                                            self.offset, bits)
      self.upper = masks_lib.pack(h < 6.0) if act == 'relu6' else None
      # blpa.fused's one-pass kernels fit 4-D BN (+ ReLU) on batch stats.
      self.fused = fused is not None and z.shape.rank == 4 and batch_stats
    else:
      self.fused = False
      self.z = z

  def normalized(self, rows=None):
    """``(y_norm, h, masks)``: normalized input, BN output, ReLU masks.

    Args:
      rows: ``(start, stop)`` to compute only those rows of the batch
        (from those rows of the copy), None for all.
    """
    shape, static_shape = self.shape, self.static_shape
    if rows is not None:
      shape = codecs.rows_shape(self.shape, *rows)
      static_shape = tf.TensorShape([None]).concatenate(static_shape[1:])
    if self.bits:
      approx, lower = quant.restore_act(_rows_of(self.codes, rows),
                                        self.offset, self.bits)
      approx = tf.reshape(approx, shape)
      y_norm = self.sign * (approx - self.offset)
      if self.widen is not None:
        y_norm = y_norm * self.widen
      h = approx * self.cs
      masks = [tf.reshape(lower, shape)] if self.act else []
      if self.upper is not None:
        masks.append(_rows_of(masks_lib.unpack(*self.upper), rows))
    else:
      z = tf.cast(_rows_of(self.z, rows), tf.float32)
      y_norm = (z - self.mean) * self.inv_sigma
      h = ops.batch_normalization(x=z, mean=self.mean,
                                  variance=self.variance, axis=-1,
                                  offset=self.beta, scale=self.gamma,
                                  epsilon=self.epsilon)
      masks = [h > 0] if self.act else []
      if self.act == 'relu6':
        masks.append(h < 6.0)
    for t in (y_norm, h, *masks):
      t.set_shape(static_shape)
    return y_norm, h, masks

  def tensors(self):
    """The tensors made for the copy."""
    if not self.bits:
      return []
    return [self.codes] + ([self.upper[0]] if self.upper is not None else [])

  def grad(self, dout):
    """``(dz, dgamma, dbeta)`` (float32) from the gradient of the output."""
    dout = tf.cast(dout, tf.float32)
    if self.fused:
      if self.upper is not None:  # ReLU6: the upper mask, then as ReLU
        dout = masks_lib.select(dout, self.upper[0])
      # y = widen * (approx - offset) = sign * u; the gradient is scaled
      # by |gamma| (the unwidened scale), hence the signs.
      dz, dbeta, dscale = fused.bn_relu_grad(
          dout, self.codes, self.scale, self.offset, 1.0 / self.inv_sigma,
          self.bits, relu=bool(self.act), widen=self.widen)
      return self.sign * dz, self.sign * dscale, dbeta
    y_norm, _, masks = self.normalized()
    for mask in masks:
      dout = tf.where(mask, dout, 0.0)
    return backward.batch_norm(dout, y_norm, self.gamma, self.inv_sigma,
                               self.batch_stats)

  def restore(self):
    """The (approximate) output of the activation (or of the BN), in the
    layer's compute dtype."""
    return tf.cast(self._restore(act=self.act), self.out_dtype)

  def restore_rows(self, start, stop, act=None):
    """Rows ``start:stop`` of :meth:`restore`, from those rows of the
    copy only (no full-size tensor).

    Args:
      start, stop: int32 scalars, ``0 <= start <= stop <= N``.
      act: ``'relu'`` or ``'relu6'`` to apply that activation to the
        output of a BN kept without one (the copy of the ReLU layer that
        follows it, ``blpa.keras.leaves.ActOf``); None: the copy's own.
    """
    if act is not None and self.act and act != self.act:
      raise ValueError(f'restore_rows(act={act!r}) of the copy of a BN '
                       f'already followed by {self.act!r}')
    return tf.cast(self._restore((start, stop), act or self.act),
                   self.out_dtype)

  def _restore(self, rows=None, act=None):
    """float32 output of ``act`` (None: of the BN) for ``rows``."""
    if self.fused:
      out = fused.bn_relu_restore(_rows_of(self.codes, rows), self.cs,
                                  self.offset, self.bits, relu=bool(act))
      return tf.minimum(out, 6.0) if act == 'relu6' else out
    _, h, masks = self.normalized(rows)
    if not act:
      return h
    out = tf.where(masks[0], h, 0.0) if self.act else tf.nn.relu(h)
    return tf.minimum(out, 6.0) if act == 'relu6' else out


def _rows_of(tensor, rows):
  """``tensor[start:stop]`` for ``rows = (start, stop)``; all if None."""
  return tensor if rows is None else tensor[rows[0]:rows[1]]


def run_bn_act(layer, act_layer, act, z, bits, batch_stats):
  """BatchNormalization, then optionally its ReLU, as one custom gradient.

  ``z`` is the BN's input as its ``__call__`` gets it (it is autocast here,
  as Keras does); the statistics and the codes are computed in float32.

  Returns:
    ``(out, copy)``: the activation's output and its :class:`BatchNormCopy`.
  """
  kept = {}
  weights = trainable_of([layer.gamma if layer.scale else None,
                          layer.beta if layer.center else None])

  def forward(xs):
    z = autocast_input(layer, xs[0])
    h, mean, variance, gamma, beta = bn_forward(layer, z, batch_stats)
    out = act_layer(h) if act_layer is not None else h
    kept['copy'] = copy = BatchNormCopy(layer, act, bits, z,
                                        tf.cast(h, tf.float32), mean,
                                        variance, gamma, beta, batch_stats)
    out = codecs.after(out, copy.tensors())

    def grad(douts):
      dz, dgamma, dbeta = _after(douts, lambda: copy.grad(douts[0]))
      by_var = {id(layer.gamma if layer.scale else None): dgamma,
                id(layer.beta if layer.center else None): dbeta}
      return [dz], [by_var[id(v)] for v in weights]

    return out, grad

  out = custom_op(forward, [z], weights)
  return out, kept['copy']


# ---------------------------------------------------------------------------
# Layers with weights whose gradients need their input.


def _linear_backward(kind, layer, x_shape, x, kernels, dy):
  """``(dx, kernel gradients)`` of a layer of ``plan.LINEAR_KINDS``."""
  if kind == 'separable':
    return backward.separable_conv2d(layer, x_shape, x, kernels, dy)
  if kind == 'einsum_dense':
    dx, dk = einsum.grads(layer.equation, x, kernels[0], dy)
  elif kind == 'dense':
    dx, dk = backward.dense(x_shape, x, kernels[0], dy)
  else:
    dx, dk = _CONV_BACKWARD[kind](layer, x_shape, x, kernels[0], dy)
  return dx, [dk]


_CONV_BACKWARD = {'conv2d': backward.conv2d,
                  'depthwise': backward.depthwise_conv2d,
                  'conv1d': backward.conv1d, 'conv3d': backward.conv3d,
                  'conv2d_transpose': backward.conv2d_transpose}


def _pre_activation(kind, layer, x, dtype):
  """A Dense/EinsumDense output before its activation: the ops of its
  ``call`` (``ops.matmul``/``ops.einsum``, then ``ops.add`` of the bias,
  variables cast to the compute dtype as autocasting does), so that
  ``layer.activation(z)`` is its output bit for bit."""
  x = autocast_input(layer, x)
  kernel = tf.cast(tf.convert_to_tensor(raw_variable(layer.kernel)), dtype)
  if kind == 'einsum_dense':
    z = ops.einsum(layer.equation, x, kernel)
  else:
    z = ops.matmul(x, kernel)
  if layer.bias is not None:
    z = ops.add(z, tf.cast(tf.convert_to_tensor(raw_variable(layer.bias)),
                           dtype))
  return z


def conv_chunk_rows(kind, layer, codec, input_shape, dtype):
  """Examples per chunk of the kernel gradient of a Conv2D
  (:func:`blpa.keras.backward.conv2d_chunk_rows`), None when it is
  computed in one pass (another kind, frozen kernels, a codec that cannot
  restore slices of the batch, or a small working set)."""
  if kind != 'conv2d' or codec is None or not codecs.restores_rows(codec):
    return None
  return backward.conv2d_chunk_rows(layer, input_shape, dtype)


def run_linear(kind, layer, x, codec, call=None, act=None, bits=0):
  """A layer of ``plan.LINEAR_KINDS`` (convolutions, Dense) with an
  analytic backward, computed in the layer's compute dtype.

  Args:
    kind: one of ``plan.LINEAR_KINDS``.
    layer: the Keras layer.
    x: its input.
    codec: the compact copy of ``x`` (None if the kernels are frozen).
    call: ``call(x)`` running the layer (default ``layer(x)``).
    act: ``'relu'`` or ``'relu6'`` when the layer's own ``activation`` is
      one (its output's mask is kept, 1 bit per value); for Dense and
      EinsumDense, the name of a smooth one
      (:func:`blpa.keras.activations.name_of`: the layer's output before
      the activation is computed here, its derivative kept as
      ``bits``-bit codes); else None.
    bits: bits of a smooth activation's derivative codes (0: exact).
  """
  has_bias = getattr(layer, 'bias', None) is not None
  smooth = act is not None and act not in plan_lib.MASK_ACTS
  variables = plan_lib.kernels_of(kind, layer)
  weights = trainable_of(variables + [layer.bias if has_bias else None])
  call = call or layer
  dtype = tf.as_dtype(layer.compute_dtype)

  def forward(xs):
    deriv = None
    if smooth:
      z = _pre_activation(kind, layer, xs[0], dtype)
      out = layer.activation(z)
      deriv = activations_lib.Derivative(layer.activation, act, z, bits)
    else:
      out = call(xs[0])
    packed = masks_lib.pack(relu_keep(act)(out))[0] if act and \
        not smooth else None
    kept = (codec.tensors() if codec is not None else []) + [packed] + (
        deriv.tensors() if deriv is not None else [])
    out = codecs.after(out, kept)
    kernels = [tf.cast(tf.convert_to_tensor(raw_variable(v)), dtype)
               for v in variables]
    x_shape = tf.shape(xs[0])
    rows = conv_chunk_rows(kind, layer, codec, xs[0].shape, dtype)

    def restore():
      return tf.cast(codec.restore(), dtype)

    def restore_rows(start, stop):
      return tf.cast(codec.restore_rows(start, stop), dtype)

    def grad(douts):
      dout = tf.cast(douts[0], dtype)
      if packed is not None:
        dout = _after(douts, lambda: masks_lib.select(dout, packed))
      elif deriv is not None:
        dlogits = douts[1] if len(douts) > 1 else None
        dout = _after(douts, lambda: deriv.grad(dout, dlogits))
      if rows is not None:  # the input restored chunk by chunk, never whole
        dx, dk = backward.conv2d_chunked(layer, x_shape, restore_rows,
                                         kernels[0], dout, rows)
        dks = [dk]
      else:
        x_kept = _after(douts, restore) if codec is not None else None
        dx, dks = _linear_backward(kind, layer, x_shape, x_kept, kernels,
                                   dout)
      by_var = {id(v): dk for v, dk in zip(variables, dks)}
      if has_bias:
        by_var[id(layer.bias)] = einsum.bias_grad(
            dout, layer.bias.shape) if kind == 'einsum_dense' else \
            backward.bias(dout)
      weight_grads = [by_var[id(v)] for v in weights]
      return _handed_on([dx], weight_grads), weight_grads

    return out, grad

  return custom_op(forward, [x], weights,
                   logits=smooth and act in activations_lib.LOGIT_ACTS)


# ---------------------------------------------------------------------------
# Layers without weights.


def run_masked(layer, x, keep_fn, scale=1.0, call=None, **kwargs):
  """A layer whose gradient is ``dout * scale`` where ``keep_fn(out)``.

  Used for ReLU / ReLU6 (mask of ``0 < out < 6``) and Dropout (mask of
  ``out != 0``); the mask is kept packed, 1 bit per value. ``call(x,
  **kwargs)`` runs the layer (default ``layer``).
  """
  call = call or layer

  def forward(xs):
    out = call(xs[0], **kwargs)
    packed, _ = masks_lib.pack(keep_fn(out))
    out = codecs.after(out, [packed])

    def grad(douts):
      return [_after(douts, lambda: masks_lib.select(douts[0], packed,
                                                     scale))], []

    return out, grad

  return custom_op(forward, [x])


def run_max_pool_mask(layer, x, call=None):
  """MaxPooling2D with non-overlapping VALID windows: keeps a 1-bit mask of
  the position that gets each window's gradient (the first equal to its
  maximum, as TF's ``MaxPoolGrad`` chooses)."""
  ph, pw = layer.pool_size
  call = call or layer

  def forward(xs):
    out = call(xs[0])
    x = autocast_input(layer, xs[0])
    x_shape = tf.shape(x)
    size = tf.shape(out) * [1, ph, pw, 1]
    packed, _ = masks_lib.pack(backward.first_max_mask(
        x[:, :size[1], :size[2]], out, ph, pw))
    out = codecs.after(out, [packed])

    def grad(douts):
      g = _after(douts, lambda: masks_lib.select(
          backward.repeat2d(douts[0], ph, pw), packed))
      pad = x_shape[1:3] - size[1:3]
      return [tf.pad(g, [[0, 0], [0, pad[0]], [0, pad[1]], [0, 0]])], []

    return out, grad

  return custom_op(forward, [x])


def run_max_pool_offsets(layer, x, call=None):
  """MaxPooling2D with overlapping windows: keeps, per output value, the
  offset of its window's maximum (one byte, exact at any bits: the argmax
  is never taken from an approximate input)."""
  call = call or layer

  def forward(xs):
    out = call(xs[0])
    x = autocast_input(layer, xs[0])
    x_shape = tf.shape(x)
    offsets = backward.max_pool_offsets(layer, x)
    out = codecs.after(out, [offsets])

    def grad(douts):
      dout = douts[0]
      return [_after(douts, lambda: backward.max_pool_from_offsets(
          layer, x_shape, offsets, dout))], []

    return out, grad

  return custom_op(forward, [x])


def run_global_max_pool(layer, x, call=None):
  """GlobalMaxPooling1D/2D: keeps a 1-bit mask of the positions equal to
  their (sample, channel) maximum; ties share the gradient equally, as
  TensorFlow's ``reduce_max`` gradient does."""
  call = call or layer

  def forward(xs):
    out = call(xs[0])
    mask = backward.global_max_pool_mask(layer, autocast_input(layer, xs[0]))
    packed, shape = masks_lib.pack(mask)
    out = codecs.after(out, [packed])

    def grad(douts):
      dout = douts[0]
      return [_after(douts, lambda: backward.global_max_pool(
          layer, masks_lib.unpack(packed, shape), dout))], []

    return out, grad

  return custom_op(forward, [x])


def relu_keep(act):
  """The mask function of a ReLU (``act='relu'``) or ReLU6 output."""
  if act == 'relu6':
    return lambda out: (out > 0) & (out < 6.0)
  return lambda out: out > 0


def run_shape_op(kind, layer, xs, codec=None, call=None):
  """Add, Concatenate, padding, cropping, reshapes and pooling.

  Only shapes are kept (MaxPooling2D also keeps ``codec``, the compact copy
  of its input).

  Args:
    kind: the step kind (see :mod:`blpa.keras.plan`).
    layer: the Keras layer.
    xs: list of input tensors.
    codec: for ``'maxpool'``: the copy of the input.
    call: ``call(x_or_list)`` running the layer (default ``layer``).

  Returns:
    The layer's output.
  """
  multi = kind in ('add', 'concat')
  call = call or layer

  def forward(xs):
    out = call(list(xs) if multi else xs[0])
    if codec is not None:
      out = codecs.after(out, codec.tensors())
    shapes = [tf.shape(x) for x in xs]
    if kind == 'add' and not _same_static_shapes(xs + [out]):
      shapes = [('broadcast', shape) for shape in shapes]
    sizes = [x.shape[layer.axis] for x in xs] if kind == 'concat' else None

    def grad(douts):
      return _shape_grad(kind, layer, shapes, sizes, codec, douts), []

    return out, grad

  return custom_op(forward, xs)


def _same_static_shapes(tensors):
  """Whether tensors have one fully known static shape."""
  first = tensors[0].shape
  return first.is_fully_defined() and all(t.shape == first for t in tensors)


def _shape_grad(kind, layer, shapes, sizes, codec, douts):
  """Input gradients (a list) of a shape-only layer."""
  dout = douts[0]
  if kind == 'add':
    return [backward.unbroadcast(dout, shape[1]) if isinstance(shape, tuple)
            else dout for shape in shapes]
  if kind == 'concat':
    return backward.concatenate(layer.axis, sizes, dout)
  return [_single_shape_grad(kind, layer, shapes, codec, douts)]


def _single_shape_grad(kind, layer, shapes, codec, douts):
  dout = douts[0]
  if kind == 'zeropad':
    return backward.zero_padding2d(layer, shapes[0], dout)
  if kind == 'crop':
    return backward.cropping2d(layer, dout)
  if kind == 'reshape':
    return tf.reshape(dout, shapes[0])
  if kind == 'gap':
    return backward.global_avg_pool2d(layer, shapes[0], dout)
  if kind == 'avgpool':
    return backward.avg_pool2d(layer, shapes[0], dout)
  if kind == 'upsampling':
    return backward.upsampling(layer, shapes[0], dout)
  if kind == 'gap1d':
    return backward.global_avg_pool1d(layer, shapes[0], dout)
  if kind == 'avgpool1d':
    return backward.avg_pool1d(layer, shapes[0], dout)
  if kind in plan_lib.COPY_POOL_KINDS:
    x = _after(douts, lambda: tf.cast(codec.restore(), dout.dtype))
    fn = backward.max_pool2d if kind == 'maxpool' else backward.max_pool1d
    return fn(layer, x, dout)
  raise ValueError(f'unknown shape-op kind {kind!r}')


# ---------------------------------------------------------------------------
# Any other layer: recompute from compact copies of its inputs.


def seed_states(layer):
  """The state variables of the Keras ``SeedGenerator``s a layer (and its
  sublayers) draws random numbers from."""
  found = []
  if not hasattr(layer, '_flatten_layers'):  # a Keras op, not a layer
    return found
  for sub in layer._flatten_layers(include_self=True, recursive=True):  # pylint: disable=protected-access
    found.extend(sg.state for sg in getattr(sub, '_seed_generators', []))
  return found


def run_generic(call, xs, kept, trainable, seeds=()):
  """A node recomputed, in backward, from compact copies of its inputs.

  A random layer's draws are replayed: the state of its seed generators is
  read before the forward pass, set back for the recompute (which so draws
  the same numbers, as PyTorch's checkpointing restores its RNG state) and
  then set to what the forward pass left, so that the recompute does not
  advance it a second time.

  Args:
    call: ``call(list_of_input_tensors) -> outputs`` running the node.
    xs: the node's float input tensors.
    kept: their codecs (same order).
    trainable: the Keras variables the node trains.
    seeds: the Keras seed-generator state variables the node draws from
      (:func:`seed_states`).

  Returns:
    The node's outputs (same structure as ``call``'s).
  """
  weights = trainable_of(trainable)
  seeds = [raw_variable(v) for v in seeds]

  def forward(xs):
    before = [tf.identity(v.read_value()) for v in seeds]
    outs = codecs.after(call(xs), [t for c in kept for t in c.tensors()])
    after = [tf.identity(v.read_value()) for v in seeds]
    specs = [(tf.shape(x), x.dtype) for x in xs]

    def grad(douts):
      restored = _after(douts, lambda: [
          tf.cast(c.restore(), x.dtype) for c, x in zip(kept, xs)])
      values = [raw_variable(v) for v in weights]
      with tf.control_dependencies(restored):
        for v, state in zip(seeds, before):
          v.assign(state)
      with tf.GradientTape() as tape:
        tape.watch(restored)
        outs_again = call(restored)
        again = tf.nest.flatten(outs_again)
        again += [t for t in logits_of(outs_again) if t is not None]
      with tf.control_dependencies(again):
        for v, state in zip(seeds, after):
          v.assign(state)
      douts = [tf.zeros_like(a) if d is None else tf.cast(d, a.dtype)
               for a, d in zip(again, douts)]
      grads = tape.gradient(again, restored + values, output_gradients=douts)
      dxs = [tf.zeros(shape, dtype) if g is None else g
             for (shape, dtype), g in zip(specs, grads[:len(kept)])]
      return _handed_on(dxs, grads[len(kept):]), grads[len(kept):]

    return outs, grad

  return custom_op(forward, xs, weights, logits=True)

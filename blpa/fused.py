"""Fused BN-ReLU-quantize ops: one layer's elementwise work in one pass.

Per channel: mean ``m``, standard deviation ``sigma`` (``sqrt(var + eps)``),
clamped scale ``cs`` and bias ``b``. The saved copy is the normalized value
``u`` (``nbits`` 0) or the ``nbits``-bit codes of ``a = h/cs`` with offset
``c = b/cs`` (``nbits`` 4 or 8, the codes of :func:`blpa.quant.save_act`).

* :func:`bn_moments`: the batch mean and variance, equal to
  ``tf.nn.moments(z, [0, 1, 2])`` (same float32 sums in TF's CPU order), in
  two reads of ``z`` and without the squared differences.
* :func:`bn_relu_forward`: ``u = (z - m)/sigma``, ``h = u*cs + b``,
  ``out = relu(h)``, and the saved copy.
* :func:`bn_relu_restore`: the post-ReLU activation rebuilt from the copy,
  ``relu(u*cs + b)`` or ``relu(approx*cs)`` (the convolution's input for its
  filter gradient).
* :func:`bn_relu_grad`: from the gradient ``g`` w.r.t. ``out``: ReLU mask,
  bias and scale gradients and the BN backward to the gradient w.r.t. ``z``
  (optionally with codes whose range was widened per channel).

The native kernels (``ops/fused_*.cc``, loaded through :mod:`blpa.native`)
make one pass over the activation per op (two for the gradient). Without
them, or with ``BLPA_PY_OPS=1``, the pure-TF fallback computes the unfused
formulas of the layers. The CPU kernels agree with it bit for bit, sums
included (the same float32 terms summed in TF's CPU reduction order); the
CUDA kernels sum in double, so their gradients agree to float rounding.
"""

import tensorflow as tf

from blpa import native
from blpa import quant

__all__ = ['bn_moments', 'bn_relu_forward', 'bn_relu_restore', 'bn_relu_grad']

_NBITS = (0, 4, 8)

for _op in ('BlpaBnMoments', 'BlpaBnReluForward', 'BlpaBnReluRestore', 'BlpaBnReluGrad'):
  try:
    tf.no_gradient(_op)
  except KeyError:  # already registered (module reloaded)
    pass


def _lib():
  """The native library if it has the fused ops, else None."""
  return native.library_with('blpa_bn_relu_grad')


def _check_nbits(nbits):
  if isinstance(nbits, bool) or nbits not in _NBITS:
    raise ValueError(f'nbits must be 0, 4 or 8, got {nbits!r}')
  return int(nbits)


def _activation(x, name, dtype=tf.float32):
  x = tf.convert_to_tensor(x, dtype=dtype)
  if x.shape.rank is not None and x.shape.rank != 4:
    raise ValueError(f'{name} must have rank 4 [N,H,W,C], got shape '
                     f'{x.shape}')
  return x


def _vectors(channels, **vectors):
  """The per-channel inputs as float32 tensors, checked to be ``[C]``."""
  out = []
  for name, v in vectors.items():
    v = tf.convert_to_tensor(v, dtype=tf.float32)
    if v.shape.rank is not None and v.shape.rank != 1:
      raise ValueError(f'{name} must have rank 1 [C], got shape {v.shape}')
    if (channels is not None and v.shape.rank == 1 and v.shape[0] is not None
        and v.shape[0] != channels):
      raise ValueError(f'{name} has length {v.shape[0]} but the activation '
                       f'has C = {channels} channels')
    out.append(v)
  return out


def _saved(saved, nbits, act_shape, channels):
  """The saved copy as a tensor, checked against the activation's shape."""
  saved = _activation(saved, 'saved', tf.uint8 if nbits else tf.float32)
  if channels is not None and saved.shape.rank == 4:
    want = quant.packed_channels(channels, nbits) if nbits else channels
    got = saved.shape[3]
    if got is not None and got != want:
      raise ValueError(f'saved must have {want} values per pixel for C = '
                       f'{channels}, nbits = {nbits}; got shape {saved.shape}')
  if act_shape is not None and saved.shape.rank == 4:
    if not act_shape[:3].is_compatible_with(saved.shape[:3]):
      raise ValueError(f'saved has shape {saved.shape} but the gradient has '
                       f'shape {act_shape}')
  return saved


def _relu(h, relu):
  return tf.nn.relu(h) if relu else h


def bn_moments(z):
  """Batch mean and variance over N, H and W.

  Args:
    z: float32 ``[N, H, W, C]`` with N*H*W >= 1.

  Returns:
    ``(mean, variance)``, float32 ``[C]`` each, equal to
    ``tf.nn.moments(z, axes=[0, 1, 2])``. Not differentiable.

  Raises:
    ValueError: for a statically known shape that is not ``[N, H, W, C]``.
  """
  z = _activation(z, 'z')
  lib = _lib()
  # CPU kernel only: with a GPU, TF's reductions stay on the device.
  if lib is not None and not tf.config.list_logical_devices('GPU'):
    return tuple(lib.blpa_bn_moments(z))
  return tf.nn.moments(z, axes=[0, 1, 2])


def bn_relu_forward(z, mean, sigma, scale, bias, nbits, relu=True):
  """BN with given statistics, scale, bias and ReLU, and the saved copy.

  Args:
    z: float32 ``[N, H, W, C]``, the layer's input sum.
    mean, sigma: float32 ``[C]``: batch mean and ``sqrt(var + eps)``.
    scale: float32 ``[C]``, the clamped scale ``cs``.
    bias: float32 ``[C]`` (zeros for a layer without bias).
    nbits: 0 to save ``u`` (float32 ``[N,H,W,C]``), 4 or 8 to save the
      packed codes of ``h/cs`` (uint8 ``[N,H,W,ceil(C*nbits/8)]``).
    relu: apply the ReLU to ``out``.

  Returns:
    ``(out, saved)``. Not differentiable.

  Raises:
    ValueError: bad nbits, or statically known shapes that do not fit.
  """
  nbits = _check_nbits(nbits)
  z = _activation(z, 'z')
  c = z.shape[3] if z.shape.rank == 4 else None
  if c == 0:
    raise ValueError(f'z must have at least one channel, got shape {z.shape}')
  mean, sigma, scale, bias = _vectors(c, mean=mean, sigma=sigma, scale=scale,
                                      bias=bias)
  lib = _lib()
  if lib is not None:
    return tuple(lib.blpa_bn_relu_forward(
        z, mean, sigma, scale, bias, T=tf.uint8 if nbits else tf.float32,
        nbits=nbits, relu=bool(relu)))
  u = (z - mean) / sigma
  h = u * scale
  h = h + bias
  if nbits:
    return _relu(h, relu), quant.save_act(h / scale, bias / scale, nbits)
  return _relu(h, relu), u


def _restored(saved, scale, center, nbits):
  """Fallback: ``(y, h, mask)`` of the saved copy (mask of ``h > 0``)."""
  if nbits:
    approx, mask = quant.restore_act(saved, center, nbits)
    return approx - center, approx * scale, mask
  h = saved * scale
  h = h + center
  return saved, h, h > 0


def bn_relu_restore(saved, scale, center, nbits, relu=True):
  """The (approximate) post-ReLU activation from the saved copy.

  Args:
    saved: what :func:`bn_relu_forward` saved.
    scale: float32 ``[C]``, the clamped scale.
    center: float32 ``[C]``: the bias for ``nbits`` 0, the offset
      ``bias/scale`` for codes.
    nbits: 0, 4 or 8, as saved.
    relu: apply the ReLU.

  Returns:
    float32 ``[N, H, W, C]``. Not differentiable.

  Raises:
    ValueError: bad nbits, or statically known shapes that do not fit.
  """
  nbits = _check_nbits(nbits)
  scale, center = _vectors(None, scale=scale, center=center)
  c = scale.shape[0] if scale.shape.rank == 1 else None
  _vectors(c, center=center)
  saved = _saved(saved, nbits, None, c)
  lib = _lib()
  if lib is not None:
    return lib.blpa_bn_relu_restore(saved, scale, center, nbits=nbits,
                                    relu=bool(relu))
  return _relu(_restored(saved, scale, center, nbits)[1], relu)


def bn_relu_grad(grad, saved, scale, center, sigma, nbits, relu=True,
                 widen=None):
  """ReLU mask, bias/scale gradients and BN backward of one layer.

  Args:
    grad: float32 ``[N, H, W, C]``, the gradient w.r.t. ``out``.
    saved: what :func:`bn_relu_forward` saved.
    scale: float32 ``[C]``, the clamped scale.
    center: float32 ``[C]``: the bias for ``nbits`` 0, the offset for codes.
    sigma: float32 ``[C]``, the forward pass's ``sqrt(var + eps)``.
    nbits: 0, 4 or 8, as saved.
    relu: mask the gradient with the ReLU.
    widen: float32 ``[C]`` or None (ones): the normalized value is
      ``y = widen * (approx - center)`` (``widen * u`` for a full copy),
      for codes of ``h / (cs * widen)`` whose range was widened so as not to
      clip. ``scale`` stays the clamped scale ``cs``, which multiplies the
      gradient.

  Returns:
    ``(grad_in, dbias, dscale)``: gradient w.r.t. ``z`` ``[N,H,W,C]``, and
    the bias and scale gradients ``[C]`` (``dscale = sum(g_masked * y)``).
    Not differentiable.

  Raises:
    ValueError: bad nbits, or statically known shapes that do not fit.
  """
  nbits = _check_nbits(nbits)
  grad = _activation(grad, 'grad')
  c = grad.shape[3] if grad.shape.rank == 4 else None
  scale, center, sigma = _vectors(c, scale=scale, center=center, sigma=sigma)
  widen = tf.ones_like(sigma) if widen is None else widen
  (widen,) = _vectors(c, widen=widen)
  saved = _saved(saved, nbits, grad.shape, c)
  lib = _lib()
  if lib is not None:
    return tuple(lib.blpa_bn_relu_grad(grad, saved, scale, center, sigma,
                                       widen, nbits=nbits, relu=bool(relu)))
  y, _, mask = _restored(saved, scale, center, nbits)
  y = y * widen
  g = tf.where(mask, grad, 0.0) if relu else grad
  axes = [0, 1, 2]
  dbias = tf.reduce_sum(g, axis=axes)
  dscale = tf.reduce_sum(g * y, axis=axes)
  g = g * scale
  g = g - tf.reduce_mean(g, axis=axes)
  g = g - y * tf.reduce_mean(g * y, axis=axes)
  return g / sigma, dbias, dscale

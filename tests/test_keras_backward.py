"""The analytic backward passes of blpa.keras.backward (Conv1D, Conv3D,
Conv2DTranspose, UpSampling1D/2D, global max pooling,
GlobalAveragePooling1D, AveragePooling1D, MaxPooling1D) against TensorFlow
autodiff of the Keras layers, given the exact input.

float32: relative error <= 1e-5; 16-bit policies: cosine >= 0.999.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from blpa.keras import backward as bw


def _randn(*shape):
  return tf.constant(np.random.randn(*shape).astype(np.float32))


def _autodiff(layer, x, weights=True):
  """``(y, dy, dx, dkernel)``: output of ``layer`` on ``x``, a random
  output gradient, and autodiff's gradients of ``sum(y * dy)``."""
  if not layer.built:
    layer.build(x.shape)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x)
    dy = tf.cast(_randn(*y.shape), y.dtype)
    loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cast(dy, tf.float32))
  sources = [x] + ([layer.kernel] if weights else [])
  grads = tape.gradient(loss, sources)
  return y, dy, grads[0], (grads[1] if weights else None)


def _close(actual, expected):
  actual = np.asarray(tf.cast(actual, tf.float64))
  expected = np.asarray(tf.cast(expected, tf.float64))
  assert actual.shape == expected.shape
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
  scale = max(np.max(np.abs(expected)), 1e-30)
  assert np.max(np.abs(actual - expected)) <= 1e-5 * scale


def _cosine(a, b):
  a = np.asarray(tf.cast(a, tf.float64)).ravel()
  b = np.asarray(tf.cast(b, tf.float64)).ravel()
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _check_conv(fn, layer, x):
  """``fn`` against autodiff, with and without the input (kernel frozen)."""
  assert not bw.__dict__['supports_' + fn.__name__](layer)
  _, dy, dx0, dk0 = _autodiff(layer, x)
  kernel = tf.convert_to_tensor(layer.kernel)
  dx, dk = fn(layer, tf.shape(x), x, kernel, dy)
  _close(dk, dk0)
  _close(dx, dx0)
  dx_frozen, dk_frozen = fn(layer, tf.shape(x), None, kernel, dy)
  assert dk_frozen is None
  _close(dx_frozen, dx0)


# --- Conv1D ---------------------------------------------------------------

@pytest.mark.parametrize('kernel_size,strides,padding,dilation', [
    (3, 1, 'valid', 1), (3, 2, 'same', 1), (4, 3, 'valid', 1),
    (5, 2, 'same', 1), (3, 1, 'same', 2), (2, 1, 'valid', 3),
    (4, 1, 'causal', 1), (3, 1, 'causal', 2), (2, 3, 'causal', 1)])
def test_conv1d(kernel_size, strides, padding, dilation):
  layer = keras.layers.Conv1D(4, kernel_size, strides=strides,
                              padding=padding, dilation_rate=dilation,
                              use_bias=False)
  _check_conv(bw.conv1d, layer, _randn(2, 13, 3))


# --- Conv3D ---------------------------------------------------------------

@pytest.mark.parametrize('kernel_size,strides,padding,dilation', [
    ((2, 3, 2), 1, 'valid', 1), (3, (2, 1, 2), 'same', 1),
    (2, 2, 'valid', 1), (2, 1, 'same', (2, 1, 2)), (3, 1, 'valid', 2)])
def test_conv3d(kernel_size, strides, padding, dilation):
  layer = keras.layers.Conv3D(3, kernel_size, strides=strides,
                              padding=padding, dilation_rate=dilation,
                              use_bias=False)
  _check_conv(bw.conv3d, layer, _randn(2, 6, 7, 5, 2))


# --- Conv2DTranspose ------------------------------------------------------

@pytest.mark.parametrize('kernel_size,strides,padding,output_padding', [
    (3, 2, 'valid', None), (3, 2, 'same', None), (3, 2, 'same', 1),
    (4, 3, 'valid', 2), (2, 1, 'same', None), (3, (2, 3), 'valid', (1, 0)),
    ((2, 3), 2, 'same', (1, 1))])
def test_conv2d_transpose(kernel_size, strides, padding, output_padding):
  layer = keras.layers.Conv2DTranspose(4, kernel_size, strides=strides,
                                       padding=padding,
                                       output_padding=output_padding,
                                       use_bias=False)
  _check_conv(bw.conv2d_transpose, layer, _randn(2, 5, 4, 3))


def test_conv2d_transpose_dilated():
  """Dilated transposed convolutions: TF's CPU kernels reject them (the
  forward pass too), so this runs only where they run (GPU)."""
  layer = keras.layers.Conv2DTranspose(4, 3, dilation_rate=2, padding='same',
                                       use_bias=False)
  x = _randn(2, 6, 5, 3)
  try:
    layer(x)
  except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
    pytest.skip('dilated Conv2DTranspose does not run on this device')
  _check_conv(bw.conv2d_transpose, layer, x)


# --- UpSampling -----------------------------------------------------------

@pytest.mark.parametrize('layer', [
    lambda: keras.layers.UpSampling1D(1), lambda: keras.layers.UpSampling1D(3),
    lambda: keras.layers.UpSampling2D((2, 2)),
    lambda: keras.layers.UpSampling2D((3, 1)),
    lambda: keras.layers.UpSampling2D((1, 2))],
    ids=['1d-1', '1d-3', '2d-2x2', '2d-3x1', '2d-1x2'])
def test_upsampling(layer):
  layer = layer()
  assert not bw.supports_upsampling(layer)
  x = _randn(2, 5, 3) if isinstance(layer, keras.layers.UpSampling1D) else \
      _randn(2, 4, 5, 3)
  _, dy, dx0, _ = _autodiff(layer, x, weights=False)
  _close(bw.upsampling(layer, tf.shape(x), dy), dx0)


# --- Global max pooling ---------------------------------------------------

def _global_max(rank, keepdims):
  cls = (keras.layers.GlobalMaxPooling1D if rank == 1 else
         keras.layers.GlobalMaxPooling2D)
  return cls(keepdims=keepdims)


def _check_global_max(layer, x):
  assert not bw.supports_global_max_pool(layer)
  _, dy, dx0, _ = _autodiff(layer, x, weights=False)
  mask = bw.global_max_pool_mask(layer, x)
  assert mask.dtype == tf.bool and mask.shape == x.shape
  dx = bw.global_max_pool(layer, mask, dy)
  _close(dx, dx0)
  return dx, dx0


@pytest.mark.parametrize('rank', [1, 2])
@pytest.mark.parametrize('keepdims', [False, True])
def test_global_max_pool(rank, keepdims):
  shape = (2, 7, 4) if rank == 1 else (2, 4, 5, 4)
  _check_global_max(_global_max(rank, keepdims), _randn(*shape))


@pytest.mark.parametrize('rank', [1, 2])
@pytest.mark.parametrize('keepdims', [False, True])
def test_global_max_pool_ties(rank, keepdims):
  """An all-zero channel (as after a ReLU) and a channel with two equal
  maxima: autodiff splits the gradient equally among them."""
  shape = (2, 6, 4) if rank == 1 else (2, 3, 4, 4)
  x = np.random.randn(*shape).astype(np.float32)
  x[0, ..., 1] = 0.0
  flat = x.reshape(2, -1, 4)
  flat[1, :, 2] = np.minimum(flat[1, :, 2], 1.0)
  flat[1, 1, 2] = flat[1, 4, 2] = 2.5
  x = tf.constant(flat.reshape(shape))
  dx, dx0 = _check_global_max(_global_max(rank, keepdims), x)
  dx, dx0 = np.asarray(dx), np.asarray(dx0)
  np.testing.assert_array_equal(dx, dx0)
  positions = int(np.prod(shape[1:-1]))
  zero_channel = dx[0, ..., 1].ravel()
  assert np.allclose(zero_channel, zero_channel[0])  # split over all
  assert zero_channel[0] != 0
  tied = dx[1].reshape(positions, 4)[:, 2]
  assert tied[1] == tied[4] != 0
  assert np.count_nonzero(tied) == 2


# --- GlobalAveragePooling1D -----------------------------------------------

@pytest.mark.parametrize('keepdims', [False, True])
def test_global_avg_pool1d(keepdims):
  layer = keras.layers.GlobalAveragePooling1D(keepdims=keepdims)
  assert not bw.supports_global_avg_pool1d(layer)
  assert bw.supports_global_avg_pool1d(layer, masked=True)
  x = _randn(3, 7, 4)
  _, dy, dx0, _ = _autodiff(layer, x, weights=False)
  _close(bw.global_avg_pool1d(layer, tf.shape(x), dy), dx0)


# --- AveragePooling1D / MaxPooling1D --------------------------------------

POOLS = [(2, None, 'valid'), (3, 2, 'same'), (3, 1, 'same'),
         (4, 3, 'valid'), (2, 3, 'same'), (3, 3, 'valid')]


@pytest.mark.parametrize('pool_size,strides,padding', POOLS)
def test_avg_pool1d(pool_size, strides, padding):
  layer = keras.layers.AveragePooling1D(pool_size, strides, padding)
  assert not bw.supports_avg_pool1d(layer)
  x = _randn(2, 11, 3)
  _, dy, dx0, _ = _autodiff(layer, x, weights=False)
  _close(bw.avg_pool1d(layer, tf.shape(x), dy), dx0)


@pytest.mark.parametrize('pool_size,strides,padding', POOLS)
def test_max_pool1d(pool_size, strides, padding):
  layer = keras.layers.MaxPooling1D(pool_size, strides, padding)
  assert not bw.supports_max_pool1d(layer)
  x = _randn(2, 11, 3)
  _, dy, dx0, _ = _autodiff(layer, x, weights=False)
  _close(bw.max_pool1d(layer, x, dy), dx0)


# --- 16-bit policies ------------------------------------------------------

def _conv1d_16(policy):
  return bw.conv1d, keras.layers.Conv1D(
      4, 3, dilation_rate=2, padding='causal', use_bias=False,
      dtype=policy), (2, 13, 3)


def _conv1d_strided_16(policy):
  return bw.conv1d, keras.layers.Conv1D(
      4, 3, strides=2, padding='same', use_bias=False, dtype=policy), (2, 13, 3)


def _conv2d_transpose_16(policy):
  return bw.conv2d_transpose, keras.layers.Conv2DTranspose(
      4, 3, strides=2, padding='same', output_padding=1, use_bias=False,
      dtype=policy), (2, 5, 4, 3)


def _conv3d_16(policy):
  return bw.conv3d, keras.layers.Conv3D(
      3, 2, padding='same', use_bias=False, dtype=policy), (2, 4, 5, 3, 2)


@pytest.mark.parametrize('policy', ['mixed_bfloat16', 'mixed_float16'])
@pytest.mark.parametrize('case', [_conv1d_16, _conv1d_strided_16,
                                  _conv2d_transpose_16, _conv3d_16],
                         ids=lambda c: c.__name__[1:-3])
def test_convs_16bit(policy, case):
  fn, layer, shape = case(policy)
  x = _randn(*shape)
  _, dy, dx0, dk0 = _autodiff(layer, x)
  dtype = layer.compute_dtype
  assert dy.dtype == dtype
  kernel = tf.cast(layer.kernel, dtype)
  dx, dk = fn(layer, tf.shape(x), tf.cast(x, dtype), kernel, dy)
  assert dx.dtype == dtype and dk.dtype == dtype
  assert _cosine(dx, dx0) >= 0.999
  assert _cosine(dk, dk0) >= 0.999
  np.testing.assert_allclose(np.asarray(tf.cast(dx, tf.float32)),
                             np.asarray(dx0), rtol=0.05,
                             atol=0.05 * np.max(np.abs(dx0)))


@pytest.mark.parametrize('policy', ['mixed_bfloat16', 'mixed_float16'])
def test_others_16bit(policy):
  """Pooling and upsampling in the layer's compute dtype."""
  def run(layer, x, fn):
    _, dy, dx0, _ = _autodiff(layer, x, weights=False)
    dx = fn(layer, tf.cast(x, layer.compute_dtype), dy)
    assert dx.dtype == layer.compute_dtype
    assert _cosine(dx, dx0) >= 0.999
    return dx, dx0

  x3, x4 = _randn(2, 9, 3), _randn(2, 4, 6, 3)
  run(keras.layers.UpSampling2D((2, 3), dtype=policy), x4,
      lambda lay, x, dy: bw.upsampling(lay, tf.shape(x), dy))
  run(keras.layers.GlobalAveragePooling1D(dtype=policy), x3,
      lambda lay, x, dy: bw.global_avg_pool1d(lay, tf.shape(x), dy))
  run(keras.layers.AveragePooling1D(3, 2, 'same', dtype=policy), x3,
      lambda lay, x, dy: bw.avg_pool1d(lay, tf.shape(x), dy))
  run(keras.layers.MaxPooling1D(3, 2, 'same', dtype=policy), x3,
      bw.max_pool1d)
  # Ties in 16 bits: an all-zero channel; the split matches exactly.
  xt = np.random.randn(2, 4, 6, 3).astype(np.float32)
  xt[1, ..., 0] = 0.0
  dx, dx0 = run(keras.layers.GlobalMaxPooling2D(dtype=policy),
                tf.constant(xt),
                lambda lay, x, dy: bw.global_max_pool(
                    lay, bw.global_max_pool_mask(lay, x), dy))
  np.testing.assert_array_equal(np.asarray(tf.cast(dx, tf.float32)),
                                np.asarray(dx0))


# --- Graph mode with unknown dimensions -----------------------------------

def test_unknown_shapes_in_tf_function():
  """The functions trace with unknown batch and length (as in a model's
  ``tf.function``) and give the eager results."""
  conv = keras.layers.Conv1D(4, 3, dilation_rate=2, padding='same',
                             use_bias=False)
  causal = keras.layers.Conv1D(4, 2, padding='causal', use_bias=False)
  up = keras.layers.UpSampling1D(2)
  up2 = keras.layers.UpSampling2D((2, 3))
  avg = keras.layers.AveragePooling1D(3, 2, 'same')
  mx = keras.layers.MaxPooling1D(2)
  gap = keras.layers.GlobalAveragePooling1D()
  x = _randn(2, 10, 3)
  x4 = _randn(2, 3, 4, 3)
  for layer in (conv, causal):
    layer.build(x.shape)

  spec3 = tf.TensorSpec([None, None, 3], tf.float32)
  spec4 = tf.TensorSpec([None, None, None, 3], tf.float32)

  def run(fn, x, dy_shape, spec):
    dy = _randn(*dy_shape)
    traced = tf.function(fn, input_signature=[spec, tf.TensorSpec(
        [None] * len(dy_shape), tf.float32)])
    for a, b in zip(tf.nest.flatten(traced(x, dy)),
                    tf.nest.flatten(fn(x, dy))):
      _close(a, b)

  kernel = tf.convert_to_tensor(conv.kernel)
  run(lambda x, dy: bw.conv1d(conv, tf.shape(x), x, kernel, dy), x,
      (2, 10, 4), spec3)
  kc = tf.convert_to_tensor(causal.kernel)
  run(lambda x, dy: bw.conv1d(causal, tf.shape(x), x, kc, dy), x,
      (2, 10, 4), spec3)
  run(lambda x, dy: bw.upsampling(up, tf.shape(x), dy), x, (2, 20, 3), spec3)
  run(lambda x, dy: bw.upsampling(up2, tf.shape(x), dy), x4, (2, 6, 12, 3),
      spec4)
  run(lambda x, dy: bw.avg_pool1d(avg, tf.shape(x), dy), x, (2, 5, 3), spec3)
  run(lambda x, dy: bw.max_pool1d(mx, x, dy), x, (2, 5, 3), spec3)
  run(lambda x, dy: bw.global_avg_pool1d(gap, tf.shape(x), dy), x, (2, 3),
      spec3)


# --- Predicates -----------------------------------------------------------

def test_predicates():
  L = keras.layers  # pylint: disable=invalid-name
  assert not bw.supports_conv1d(L.Conv1D(4, 3, padding='causal'))
  assert 'groups' in bw.supports_conv1d(L.Conv1D(4, 3, groups=2))
  assert 'channels_first' in bw.supports_conv1d(
      L.Conv1D(4, 3, data_format='channels_first'))
  assert not bw.supports_conv3d(L.Conv3D(4, 3, dilation_rate=2))
  assert 'groups' in bw.supports_conv3d(L.Conv3D(4, 3, groups=2))
  assert bw.supports_conv3d(L.Conv3D(4, 3, data_format='channels_first'))
  assert bw.supports_conv3d(L.Conv2D(4, 3))
  assert bw.supports_conv1d(L.Dense(3))
  assert bw.supports_upsampling(L.Dense(3))
  assert not bw.supports_conv2d_transpose(
      L.Conv2DTranspose(4, 3, output_padding=1, strides=2))
  assert bw.supports_conv2d_transpose(
      L.Conv2DTranspose(4, 3, data_format='channels_first'))
  assert bw.supports_conv2d_transpose(L.Conv3DTranspose(4, 3))
  assert not bw.supports_upsampling(L.UpSampling1D(2))
  assert not bw.supports_upsampling(L.UpSampling2D(2))
  assert 'interpolation' in bw.supports_upsampling(
      L.UpSampling2D(2, interpolation='bilinear'))
  assert bw.supports_upsampling(L.UpSampling2D(2, data_format='channels_first'))
  assert not bw.supports_global_max_pool(L.GlobalMaxPooling1D())
  assert bw.supports_global_max_pool(
      L.GlobalMaxPooling2D(data_format='channels_first'))
  assert not bw.supports_global_avg_pool1d(L.GlobalAveragePooling1D())
  assert 'mask' in bw.supports_global_avg_pool1d(
      L.GlobalAveragePooling1D(), masked=True)
  assert bw.supports_global_avg_pool1d(
      L.GlobalAveragePooling1D(data_format='channels_first'))
  assert not bw.supports_avg_pool1d(L.AveragePooling1D(2))
  assert bw.supports_avg_pool1d(
      L.AveragePooling1D(2, data_format='channels_first'))
  assert not bw.supports_max_pool1d(L.MaxPooling1D(2, padding='same'))
  assert bw.supports_max_pool1d(L.MaxPooling1D(2, data_format='channels_first'))

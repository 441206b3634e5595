"""Tests of blpa.fused: native kernels, pure-TF fallback, unfused formulas."""

import numpy as np
import pytest
import tensorflow as tf

from blpa import fused, native, quant
from tests.test_quant import use_backend

# (shape, nbits): odd channel counts, C = 1, C across the packet size 8,
# fewer and more than 16 pixels.
CASES = [
    ((1, 1, 1, 1), 0), ((2, 3, 3, 5), 4), ((2, 3, 3, 5), 8),
    ((4, 8, 8, 16), 0), ((4, 8, 8, 16), 4), ((3, 4, 4, 33), 8),
    ((2, 5, 3, 13), 4), ((1, 2, 2, 3), 8), ((2, 4, 4, 24), 0),
]
EPSILON = 1e-3


def _inputs(shape, seed):
  rng = np.random.default_rng(seed)
  c = shape[3]
  z = tf.constant(rng.standard_normal(shape).astype(np.float32) * 2 + 0.5)
  mean, var = tf.nn.moments(z, axes=[0, 1, 2])
  scale = tf.constant(rng.uniform(0.5, 2.0, c).astype(np.float32))
  bias = tf.constant(rng.standard_normal(c).astype(np.float32))
  grad = tf.constant(rng.standard_normal(shape).astype(np.float32))
  return z, mean, tf.sqrt(var + EPSILON), scale, bias, grad


def _run(shape, nbits, relu=True, seed=0):
  """All three ops on random inputs; numpy outputs."""
  z, mean, sigma, scale, bias, grad = _inputs(shape, seed)
  center = bias / scale if nbits else bias
  out, saved = fused.bn_relu_forward(z, mean, sigma, scale, bias, nbits, relu)
  act = fused.bn_relu_restore(saved, scale, center, nbits, relu)
  grads = fused.bn_relu_grad(grad, saved, scale, center, sigma, nbits, relu)
  return [t.numpy() for t in (out, saved, act) + tuple(grads)]


@pytest.mark.parametrize('shape,nbits', CASES)
@pytest.mark.parametrize('relu', [True, False])
def test_native_matches_fallback(shape, nbits, relu):
  with use_backend('native'):
    got = _run(shape, nbits, relu)
  with use_backend('python'):
    want = _run(shape, nbits, relu)
  # Same float32 operations in the same order (sums in TF's order): equal.
  for name, g, w in zip(('out', 'saved', 'act', 'grad_in', 'dbias',
                         'dscale'), got, want):
    np.testing.assert_array_equal(g, w, err_msg=name)


@pytest.mark.parametrize('shape,nbits', CASES[:6])
def test_forward_matches_unfused_formulas(shape, nbits):
  z, mean, sigma, scale, bias, _ = _inputs(shape, 1)
  out, saved = fused.bn_relu_forward(z, mean, sigma, scale, bias, nbits)
  h = (z - mean) / sigma * scale + bias
  np.testing.assert_array_equal(out.numpy(), tf.nn.relu(h).numpy())
  if nbits:
    codes = quant.save_act(h / scale, bias / scale, nbits)
    np.testing.assert_array_equal(saved.numpy(), codes.numpy())
  else:
    np.testing.assert_array_equal(saved.numpy(), ((z - mean) / sigma).numpy())


# Tolerances (largest error / largest |gradient|) of grad_in, dbias, dscale.
# Measured (seed 2): 0 bits ~1e-7; 8 bits at most 6e-4, 0, 9e-3; 4 bits at
# most 2.5e-2, 0, 0.13 (few channels: clipping at ±3 costs most). The mask
# is exact at every bit width, so dbias is exact.
GRAD_TOLERANCES = {0: (1e-5, 1e-5, 1e-5), 8: (3e-3, 1e-5, 3e-2),
                   4: (6e-2, 1e-5, 0.25)}


@pytest.mark.parametrize('nbits', [0, 8, 4])
@pytest.mark.parametrize('relu', [True, False])
def test_grad_matches_gradient_tape(nbits, relu):
  """BN(+ReLU) backward from a full copy, 8- or 4-bit codes vs autodiff of
  the same BN(+ReLU): the formulas checked against an independent
  derivation, with and without the ReLU."""
  shape = (4, 5, 5, 6)
  z, _, _, scale, bias, grad = _inputs(shape, 2)
  with tf.GradientTape() as tape:
    tape.watch([z, scale, bias])
    mean, var = tf.nn.moments(z, axes=[0, 1, 2])
    out = (z - mean) / tf.sqrt(var + EPSILON) * scale + bias
    if relu:
      out = tf.nn.relu(out)
  want = tape.gradient(out, [z, bias, scale], output_gradients=grad)
  mean, var = tf.nn.moments(z, axes=[0, 1, 2])
  sigma = tf.sqrt(var + EPSILON)
  _, saved = fused.bn_relu_forward(z, mean, sigma, scale, bias, nbits, relu)
  center = bias / scale if nbits else bias
  got = fused.bn_relu_grad(grad, saved, scale, center, sigma, nbits, relu)
  # A full copy is exact (float rounding); codes approximate y.
  for name, g, w, tol in zip(('grad_in', 'dbias', 'dscale'), got, want,
                             GRAD_TOLERANCES[nbits]):
    scale_of = np.abs(w.numpy()).max()
    np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0,
                               atol=tol * scale_of, err_msg=name)


def _widened(shape, nbits, seed, relu=True):
  """bn_relu_grad from codes of ``h / (scale * widen)`` (numpy outputs)
  and the inputs; widen 1 on even channels, up to 3 on odd ones."""
  z, mean, sigma, scale, bias, grad = _inputs(shape, seed)
  c = shape[3]
  rng = np.random.default_rng(seed + 100)
  widen = np.where(np.arange(c) % 2 == 1, rng.uniform(1.0, 3.0, c), 1.0)
  widen = tf.constant(widen.astype(np.float32))
  u = (z - mean) / sigma
  h = u * scale + bias
  if nbits:
    wide = scale * widen
    saved, center = quant.save_act(h / wide, bias / wide, nbits), bias / wide
  else:
    saved, center = u / widen, bias
  got = fused.bn_relu_grad(grad, saved, scale, center, sigma, nbits, relu,
                           widen=widen)
  return [t.numpy() for t in got], (z, scale, bias, grad)


@pytest.mark.parametrize('shape,nbits', CASES)
def test_widened_grad_native_matches_fallback(shape, nbits):
  with use_backend('native'):
    got, _ = _widened(shape, nbits, 5)
  with use_backend('python'):
    want, _ = _widened(shape, nbits, 5)
  for name, g, w in zip(('grad_in', 'dbias', 'dscale'), got, want):
    np.testing.assert_array_equal(g, w, err_msg=name)


def test_widened_grad_matches_gradient_tape():
  """Codes over a widened range (8 bits, nothing clipped): the gradients of
  BN+ReLU w.r.t. z, bias and scale, as from autodiff."""
  got, (z, scale, bias, grad) = _widened((4, 5, 5, 6), 8, 6)
  with tf.GradientTape() as tape:
    tape.watch([z, scale, bias])
    mean, var = tf.nn.moments(z, axes=[0, 1, 2])
    out = tf.nn.relu((z - mean) / tf.sqrt(var + EPSILON) * scale + bias)
  want = tape.gradient(out, [z, bias, scale], output_gradients=grad)
  for name, g, w in zip(('grad_in', 'dbias', 'dscale'), got, want):
    np.testing.assert_allclose(g, w.numpy(), atol=5e-2 * np.abs(w).max(),
                               err_msg=name)


def test_restore_matches_codes():
  z, mean, sigma, scale, bias, _ = _inputs((2, 4, 4, 7), 3)
  _, codes = fused.bn_relu_forward(z, mean, sigma, scale, bias, 4)
  approx, _ = quant.restore_act(codes, bias / scale, 4)
  act = fused.bn_relu_restore(codes, scale, bias / scale, 4)
  np.testing.assert_array_equal(act.numpy(), tf.nn.relu(approx * scale))


def _native_lib():
  with use_backend('native'):
    return native.library()


def test_kernels_reject_bad_inputs():
  lib = _native_lib()
  z = tf.zeros([2, 2, 2, 3])
  c3, c4 = tf.ones([3]), tf.ones([4])
  with pytest.raises(tf.errors.InvalidArgumentError, match='bias must have'):
    lib.blpa_bn_relu_forward(z, c3, c3, c3, c4, T=tf.float32, nbits=0)
  with pytest.raises(tf.errors.InvalidArgumentError, match='nbits must be 4'):
    lib.blpa_bn_relu_forward(z, c3, c3, c3, c3, T=tf.uint8, nbits=0)
  with pytest.raises(tf.errors.InvalidArgumentError, match='nbits must be 0'):
    lib.blpa_bn_relu_restore(z, c3, c3, nbits=4)
  with pytest.raises(tf.errors.InvalidArgumentError, match='saved must have'):
    lib.blpa_bn_relu_grad(z, tf.zeros([2, 2, 2, 3], tf.uint8), c3, c3, c3,
                          c3, nbits=4)
  with pytest.raises(tf.errors.InvalidArgumentError, match='widen must have'):
    lib.blpa_bn_relu_grad(z, z, c3, c3, c3, c4, nbits=0)
  with pytest.raises(tf.errors.InvalidArgumentError, match='rank 4'):
    lib.blpa_bn_relu_restore(tf.zeros([2, 3]), c3, c3, nbits=0)


def test_kernels_reject_bad_shapes_at_run_time():
  lib = _native_lib()
  fn = tf.function(lambda z, v: lib.blpa_bn_relu_forward(
      z, v, v, v, v, T=tf.float32, nbits=0), input_signature=[
          tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.float32)])
  with pytest.raises(tf.errors.InvalidArgumentError, match='mean must have'):
    fn(tf.zeros([1, 2, 2, 3]), tf.ones([5]))
  with pytest.raises(tf.errors.InvalidArgumentError, match='channels C must'):
    fn(tf.zeros([1, 2, 2, 0]), tf.ones([0]))


@pytest.mark.parametrize('backend', ['native', 'python'])
def test_wrappers_reject_bad_inputs(backend):
  with use_backend(backend):
    z, c3 = tf.zeros([2, 2, 2, 3]), tf.ones([3])
    with pytest.raises(ValueError, match='nbits must be 0, 4 or 8'):
      fused.bn_relu_forward(z, c3, c3, c3, c3, 2)
    with pytest.raises(ValueError, match='z must have rank 4'):
      fused.bn_relu_forward(tf.zeros([2, 3]), c3, c3, c3, c3, 0)
    with pytest.raises(ValueError, match='bias has length 4'):
      fused.bn_relu_forward(z, c3, c3, c3, tf.ones([4]), 0)
    with pytest.raises(ValueError, match='saved must have 2 values'):
      fused.bn_relu_grad(z, tf.zeros([2, 2, 2, 3], tf.uint8), c3, c3, c3, 4)
    with pytest.raises(ValueError, match='saved has shape'):
      fused.bn_relu_grad(z, tf.zeros([2, 2, 1, 3]), c3, c3, c3, 0)
    with pytest.raises(ValueError, match='widen has length 4'):
      fused.bn_relu_grad(z, z, c3, c3, c3, 0, widen=tf.ones([4]))


@pytest.mark.parametrize('shape', [(1, 1, 1, 1), (2, 5, 3, 13), (3, 4, 4, 33),
                                   (8, 6, 6, 24)])
def test_moments_match_tf(shape):
  z = tf.constant(np.random.default_rng(4).standard_normal(shape).astype(
      np.float32) * 3 + 1)
  want = tf.nn.moments(z, axes=[0, 1, 2])
  with use_backend('native'):
    got = fused.bn_moments(z)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g.numpy(), w.numpy())


def test_moments_reject_bad_inputs():
  lib = _native_lib()
  with pytest.raises(tf.errors.InvalidArgumentError, match='at least one'):
    lib.blpa_bn_moments(tf.zeros([0, 2, 2, 3]))
  with pytest.raises(ValueError, match='z must have rank 4'):
    fused.bn_moments(tf.zeros([2, 3]))

"""Tests of blpa.masks: native pack/select against the TF fallback."""

import numpy as np
import pytest
import tensorflow as tf

from blpa import masks
from tests.test_quant import native_lib, use_backend

SHAPES = [(0,), (1,), (7,), (8,), (13,), (3, 5), (2, 3, 4, 5), (4, 9, 9, 3)]


def _mask(shape, seed=0):
  return tf.constant(np.random.default_rng(seed).random(shape) < 0.4)


def _run(shape, scale):
  mask = _mask(shape)
  x = tf.constant(np.random.default_rng(1).standard_normal(shape),
                  tf.float32)
  packed, size = masks.pack(mask)
  return (packed.numpy(), masks.unpack(packed, size).numpy(),
          masks.select(x, packed, scale).numpy())


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('scale', [1.0, 2.5])
def test_native_matches_fallback(shape, scale):
  with use_backend('native'):
    assert masks.backend() == 'native'
    got = _run(shape, scale)
  with use_backend('python'):
    assert masks.backend() == 'python'
    want = _run(shape, scale)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize('backend', ['native', 'python'])
def test_round_trip_and_select(backend):
  with use_backend(backend):
    mask = _mask((3, 7, 5), 2)
    packed, shape = masks.pack(mask)
    assert packed.shape == (-(-105 // 8),) and packed.dtype == tf.uint8
    np.testing.assert_array_equal(masks.unpack(packed, shape), mask)
    x = tf.constant(np.random.default_rng(3).standard_normal((3, 7, 5)),
                    tf.float32)
    want = np.where(mask.numpy(), x.numpy() * np.float32(3.0), 0.0)
    np.testing.assert_array_equal(masks.select(x, packed, 3.0), want)
    # Bit j of byte i is element 8i + j.
    first = masks.pack(tf.constant([True, False, False, True] + [False] * 5
                                   + [True]))[0]
    np.testing.assert_array_equal(first, [9, 2])


@pytest.mark.parametrize('backend', ['native', 'python'])
def test_select_zeroes_nan_outside_the_mask(backend):
  with use_backend(backend):
    x = tf.constant([np.nan, np.inf, -1.0, np.nan], tf.float32)
    packed, _ = masks.pack(tf.constant([False, False, True, True]))
    got = masks.select(x, packed).numpy()
    np.testing.assert_array_equal(got[:3], [0.0, 0.0, -1.0])
    assert np.isnan(got[3]) and not np.signbit(got[0])


@pytest.mark.parametrize('backend', ['native', 'python'])
def test_select_in_function_and_gradient_dtypes(backend):
  with use_backend(backend):
    x64 = tf.constant([1.0, -2.0, 3.0], tf.float64)
    packed, _ = masks.pack(tf.constant([True, False, True]))
    fn = tf.function(lambda x: masks.select(x, packed, 2.0))
    np.testing.assert_array_equal(fn(x64), [2.0, 0.0, 6.0])


@pytest.mark.parametrize('backend', ['native', 'python'])
def test_bad_inputs(backend):
  with use_backend(backend):
    with pytest.raises(ValueError, match='needs a boolean tensor'):
      masks.pack(tf.zeros([3]))
    with pytest.raises(ValueError, match='uint8 vector'):
      masks.select(tf.zeros([3]), tf.zeros([1], tf.int32))
    with pytest.raises(ValueError, match=r'needs ceil\(17/8\) = 3'):
      masks.select(tf.zeros([17]), tf.zeros([2], tf.uint8))


def test_native_select_checks_length_at_run_time():
  lib = native_lib()
  fn = tf.function(lambda x, p: lib.blpa_masked_select(x, p),
                   input_signature=[tf.TensorSpec(None, tf.float32),
                                    tf.TensorSpec([None], tf.uint8)])
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'packed must have shape \[ceil\(n/8\)\] = \[3\]'):
    fn(tf.zeros([17]), tf.zeros([2], tf.uint8))

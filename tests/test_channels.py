"""Tests of blpa.channels: native kernels, pure-TF fallback, NumPy reference."""

import numpy as np
import pytest
import tensorflow as tf

from blpa import channels
from tests.test_quant import native_lib, run_both, use_backend

BACKENDS = ["native", "python"]
SHAPES = [(5,), (3, 7), (2, 3, 4, 6), (1, 2, 2, 2, 9), (4, 1)]
DTYPES = [np.float32, np.float64, np.float16, tf.bfloat16.as_numpy_dtype]


def _case(shape, dtype, seed=0, axis=-1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32).astype(dtype)
  c = shape[axis]
  k = max(1, c // 2)
  indices = np.sort(rng.choice(c, k, replace=False)).astype(np.int32)
  return x, indices


def _ref_scatter(y, indices, c, axis=-1):
  y = np.moveaxis(y.astype(np.float64), axis, -1)
  out = np.zeros(y.shape[:-1] + (c,), np.float64)
  for j, i in enumerate(indices):
    out[..., i] += y[..., j]
  return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", [(s, a) for s in SHAPES
                                        for a in (-1, 0, 1) if a < len(s)])
def test_gather_scatter_match_numpy_on_both_backends(shape, axis, dtype):
  x, indices = _case(shape, dtype, axis=axis)
  y = np.take(x, np.arange(len(indices)), axis=axis)
  both = run_both(lambda: (
      channels.gather_channels(x, indices, axis).numpy(),
      channels.scatter_channels(y, indices, shape[axis], axis).numpy()))
  want = _ref_scatter(y, indices, shape[axis], axis)
  for gathered, scattered in both:
    np.testing.assert_array_equal(gathered, np.take(x, indices, axis=axis))
    assert scattered.dtype == x.dtype and scattered.shape == want.shape
    np.testing.assert_array_equal(scattered.astype(np.float64), want)


@pytest.mark.parametrize("shape", SHAPES)
def test_square_sums_match_numpy_on_both_backends(shape):
  x, _ = _case(shape, np.float32, seed=1)
  native, python = run_both(lambda: channels.channel_square_sums(x).numpy())
  want = (x.astype(np.float64)**2).reshape(-1, shape[-1]).sum(0)
  for got in (native, python):
    assert got.dtype == np.float32 and got.shape == (shape[-1],)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_square_sums_are_deterministic(backend):
  """Many rows over the threads: the same bits every call."""
  x = np.random.default_rng(3).normal(size=(64, 33, 17, 24)).astype(
      np.float32)
  with use_backend(backend):
    first = channels.channel_square_sums(x).numpy()
    for _ in range(5):
      np.testing.assert_array_equal(channels.channel_square_sums(x), first)
  want = (x.astype(np.float64)**2).reshape(-1, 24).sum(0)
  np.testing.assert_allclose(first, want, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_indices_add_up(backend):
  """crs draws with replacement: the scatter (the gather's gradient) sums."""
  y = np.arange(12, dtype=np.float32).reshape(2, 6)
  indices = np.array([3, 0, 3, 3, 1, 0], np.int32)
  with use_backend(backend):
    got = channels.scatter_channels(y, indices, 5).numpy()
  np.testing.assert_array_equal(got, _ref_scatter(y, indices, 5))


@pytest.mark.parametrize("axis", [-1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_each_others_transposes(backend, axis):
  x, _ = _case((2, 3, 8, 8), np.float64, seed=2)
  indices = np.array([6, 1, 1, 4], np.int32)
  with use_backend(backend):
    for fn, arg in [(lambda t: channels.gather_channels(t, indices, axis), x),
                    (lambda t: channels.scatter_channels(t, indices, 8, axis),
                     np.take(x, np.arange(4), axis=axis))]:
      theory, numeric = tf.test.compute_gradient(fn, [arg])
      np.testing.assert_allclose(theory[0], numeric[0], atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_function_with_unknown_dims(backend):
  x, indices = _case((3, 4, 6), np.float32)
  with use_backend(backend):

    @tf.function(input_signature=[tf.TensorSpec([None, None, 6]),
                                  tf.TensorSpec([None], tf.int32)])
    def step(x, indices):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = channels.gather_channels(x, indices)
        loss = tf.reduce_sum(y * y)
      return y, tape.gradient(loss, x), channels.channel_square_sums(x)

    y, grad, sums = step(x, indices)
  np.testing.assert_array_equal(y, np.take(x, indices, -1))
  want = np.zeros_like(x)
  want[..., indices] = 2 * np.take(x, indices, -1)
  np.testing.assert_array_equal(grad, want)
  np.testing.assert_allclose(sums, (x**2).sum((0, 1)), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
  with use_backend(backend):
    x = np.zeros((0, 4), np.float32)
    assert channels.gather_channels(x, [1, 2]).shape == (0, 2)
    assert channels.scatter_channels(x[:, :2], [1, 2], 4).shape == (0, 4)
    np.testing.assert_array_equal(channels.channel_square_sums(x),
                                  np.zeros(4))


def test_native_ops_are_used():
  x, indices = _case((2, 4, 6), np.float32)
  with use_backend("python"):
    assert channels.backend() == "python"
  with use_backend("native"):
    assert channels.backend() == "native"
    graph = tf.function(lambda x: tf.gradients(
        channels.gather_channels(x, indices), x)[0] +
                        channels.channel_square_sums(x)).get_concrete_function(
                            tf.TensorSpec(x.shape)).graph
  ops = {op.type for op in graph.get_operations()}
  assert {"BlpaGatherChannels", "BlpaScatterChannels",
          "BlpaChannelSquareSums"} <= ops
  assert not ops & {"GatherV2", "UnsortedSegmentSum", "Transpose", "Square"}


BAD = [
    (lambda: channels.gather_channels(np.zeros(3, np.int32), [0]),
     r"needs a float tensor, got dtype int32"),
    (lambda: channels.gather_channels(np.float32(1), [0]),
     r"rank >= 1, got a scalar"),
    (lambda: channels.gather_channels(np.zeros((2, 3), np.float32), [[0]]),
     r"indices must be a vector"),
    (lambda: channels.gather_channels(np.zeros((2, 3), np.float32), [0.5]),
     r"indices must be integers"),
    (lambda: channels.gather_channels(np.zeros((2, 3), np.float32), [3]),
     r"index 3 is not in \[0, 3\)"),
    (lambda: channels.scatter_channels(np.zeros((2, 2), np.float32), [0, 4],
                                       4), r"index 4 is not in \[0, 4\)"),
    (lambda: channels.scatter_channels(np.zeros((2, 2), np.float32), [0], 4),
     r"dimension 1 \(2\) must equal the number of indices \(1\)"),
    (lambda: channels.scatter_channels(np.zeros((2, 1), np.float32), [0], 0),
     r"channels must be >= 1"),
    (lambda: channels.gather_channels(np.zeros((2, 3), np.float32), [0], 2),
     r"axis must be an int in \[-2, 2\) for rank 2, got 2"),
    (lambda: channels.scatter_channels(np.zeros((2, 3), np.float32), [0], 4,
                                       axis=0),
     r"dimension 0 \(2\) must equal the number of indices \(1\)"),
    (lambda: channels.channel_square_sums(np.zeros(3, np.int64)),
     r"needs a float tensor"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,message", BAD)
def test_wrappers_reject_bad_input(backend, call, message):
  with use_backend(backend):
    with pytest.raises(ValueError, match=message):
      call()


def test_kernels_reject_bad_indices():
  """The raw ops: only the kernels' checks run (indices known at run time)."""
  lib = native_lib()
  x = np.zeros((2, 3), np.float32)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"indices\[1\] = -1 is not in \[0, 3\)"):
    lib.blpa_gather_channels(x, np.array([0, -1], np.int32))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"indices\[0\] = 7 is not in \[0, 5\)"):
    lib.blpa_scatter_channels(x[:, :1], np.array([7], np.int32), channels=5)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"dimension 1 \(3\) must equal the number of "
                     r"indices \(2\)"):
    lib.blpa_scatter_channels(x, np.array([0, 1], np.int32), channels=5)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"rank >= 1"):
    lib.blpa_channel_square_sums(np.float32(2))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"axis -3 is out of range for rank 2"):
    lib.blpa_gather_channels(x, np.array([0], np.int32), axis=-3)


def test_shape_functions():
  lib = native_lib()

  def shape(fn, *specs):
    return tf.function(fn, input_signature=list(specs)).get_concrete_function(
    ).structured_outputs.shape.as_list()

  idx = tf.TensorSpec([3], tf.int32)
  assert shape(lambda x, i: lib.blpa_gather_channels(x, i),
               tf.TensorSpec([None, 4, 8]), idx) == [None, 4, 3]
  assert shape(lambda y, i: lib.blpa_scatter_channels(y, i, channels=8),
               tf.TensorSpec([2, None, 3]), idx) == [2, None, 8]
  assert shape(lambda x, i: lib.blpa_gather_channels(x, i, axis=1),
               tf.TensorSpec([None, 4, 8]), idx) == [None, 3, 8]
  assert shape(lambda y, i: lib.blpa_scatter_channels(y, i, channels=6,
                                                      axis=0),
               tf.TensorSpec([None, 4]), idx) == [6, 4]
  assert shape(lib.blpa_channel_square_sums,
               tf.TensorSpec([None, 5])) == [5]
  with pytest.raises(ValueError, match="must be equal rank|Dimensions must"):
    shape(lambda y, i: lib.blpa_scatter_channels(y, i, channels=8),
          tf.TensorSpec([2, 4]), idx)

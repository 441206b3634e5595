"""Tests of blpa.fixedpoint.round_fixed: native op, pure-TF fallback, NumPy."""

import numpy as np
import pytest
import tensorflow as tf

from blpa import native
from blpa.fixedpoint import rounding
from blpa.fixedpoint import round_fixed
from tests.test_quant import use_backend  # forces native / fallback

BACKENDS = ("native", "python")
# Q1.15 ... Q16.0, and the extremes of the 24-bit word.
FORMATS = [(1, 15), (2, 14), (3, 13), (4, 12), (5, 11), (8, 8), (12, 4),
           (16, 0), (1, 0), (2, 2), (3, 2), (4, 4), (1, 23), (24, 0), (6, 10)]


def run(backend, *args, **kwargs):
  with use_backend(backend):
    return round_fixed(*args, **kwargs).numpy()


def bits(a):
  return np.asarray(a, np.float32).view(np.uint32)


# ---------------------------------------------------------------------------
# Independent NumPy reference (float64, straight from the definitions).


def ref_maxval(bd, ad):
  return 2.0**(bd - 1) - 2.0**-ad


def ref_deterministic(x, bd, ad):
  """sign(x)·floor(|x|·2^ad + 0.5)/2^ad, then saturation; NaN stays."""
  x = np.asarray(x, np.float64)
  with np.errstate(invalid="ignore", over="ignore"):
    q = np.sign(x) * np.floor(np.abs(x) * 2.0**ad + 0.5) / 2.0**ad
  m = ref_maxval(bd, ad)
  return np.where(np.isnan(x), np.nan, np.clip(q, -m, m))


def ref_fmix32(h):
  h = h.astype(np.uint32)
  with np.errstate(over="ignore"):
    h ^= h >> np.uint32(16)
    h = (h.astype(np.uint64) * 0x85EBCA6B % 2**32).astype(np.uint32)
    h ^= h >> np.uint32(13)
    h = (h.astype(np.uint64) * 0xC2B2AE35 % 2**32).astype(np.uint32)
    h ^= h >> np.uint32(16)
  return h


def ref_uniform(n, seed):
  """U of element 0..n-1 for an integer seed (the documented hash)."""
  s = seed % 2**64
  k1 = ref_fmix32(np.array([(s % 2**32) ^ 0x9E3779B9], np.uint64))[0]
  k2 = ref_fmix32(np.array([(s >> 32) ^ int(k1) ^ 0x7F4A7C15], np.uint64))[0]
  i = (np.arange(n, dtype=np.uint64) % 2**32).astype(np.uint32)
  h = ref_fmix32(ref_fmix32(i ^ k1) ^ k2)
  return (h >> np.uint32(8)).astype(np.float64) * 2.0**-24


def ref_stochastic(x, bd, ad, seed):
  """floor(x·2^ad + U)/2^ad, then saturation; NaN stays."""
  x = np.asarray(x, np.float64)
  u = ref_uniform(x.size, seed).reshape(x.shape)
  with np.errstate(invalid="ignore"):
    q = np.floor(x * 2.0**ad + u) / 2.0**ad
  m = ref_maxval(bd, ad)
  return np.where(np.isnan(x), np.nan, np.clip(q, -m, m))


def assert_same(got, want):
  """Equal values (+0 == -0), NaN at the same places."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  ok = ~np.isnan(want)
  np.testing.assert_array_equal(got[ok], want[ok])


def special_values(bd, ad, rng, n=2000):
  """Random values, grid points, ties, their neighbours, out of range,
  non-finite and subnormal values for Q(bd.ad)."""
  step = 2.0**-ad
  m = ref_maxval(bd, ad)
  k = rng.integers(-int(m / step) - 3, int(m / step) + 4, n)
  grid = (k * step).astype(np.float32)
  ties = ((k + 0.5) * step).astype(np.float32)
  parts = [
      (rng.standard_normal(n) * m / 2).astype(np.float32),
      grid, ties, np.nextafter(ties, np.float32(np.inf)),
      np.nextafter(ties, np.float32(-np.inf)),
      np.float32([m, -m, m + step / 4, -m - step / 4, m + step, -m - step,
                  2 * m + 1, -2 * m - 1, 1e30, -1e30, np.inf, -np.inf,
                  np.nan, 0.0, -0.0, 1e-40, -1e-40, 1e-45, -1e-45,
                  np.finfo(np.float32).tiny, 0.49999997 * step,
                  -0.49999997 * step, 0.5 * step, -0.5 * step,
                  1.5 * step, -1.5 * step]),
  ]
  return np.concatenate(parts).astype(np.float32)


# ---------------------------------------------------------------------------
# Deterministic rounding.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bd,ad", FORMATS)
def test_deterministic_matches_numpy(backend, bd, ad):
  x = special_values(bd, ad, np.random.default_rng(bd * 100 + ad))
  assert_same(run(backend, x, bd, ad), ref_deterministic(x, bd, ad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_away_from_zero(backend):
  x = np.float32([0.125, -0.125, 0.375, -0.375, 0.625, -0.625, 0.875])
  want = [0.25, -0.25, 0.5, -0.5, 0.75, -0.75, 1.0]
  np.testing.assert_array_equal(run(backend, x, 3, 2), want)
  # tf.round would send 0.125 to 0.0 (half to even): not this op.
  assert tf.round(0.125 * 4.0).numpy() / 4 == 0.0
  # The largest float below a half step rounds down (floor(t + 0.5) in
  # float32 would round it up).
  np.testing.assert_array_equal(
      run(backend, np.float32([0.49999997, -0.49999997]), 2, 0), [0.0, 0.0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rnd", rounding.ROUNDINGS)
def test_saturation_nonfinite_subnormal(backend, rnd):
  m = np.float32(ref_maxval(3, 2))  # 3.75
  x = np.float32([3.8, -3.8, 4.0, -4.0, 1e30, -1e30, np.inf, -np.inf, np.nan,
                  1e-40, -1e-40, -0.0])
  got = run(backend, x, 3, 2, rnd, seed=3)
  np.testing.assert_array_equal(got[:8], [m, -m] * 4)
  assert np.isnan(got[8])
  np.testing.assert_array_equal(bits(got[9:]), [0, 0, 0])  # +0.0, never -0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rnd", rounding.ROUNDINGS)
@pytest.mark.parametrize("bd,ad", [(3, 2), (1, 15), (8, 8), (16, 0)])
def test_grid_points_unchanged(backend, rnd, bd, ad):
  m = int(ref_maxval(bd, ad) * 2**ad)
  codes = np.arange(-m, m + 1) if m < 5000 else np.random.default_rng(
      0).integers(-m, m + 1, 5000)
  x = (codes * 2.0**-ad).astype(np.float32)
  np.testing.assert_array_equal(run(backend, x, bd, ad, rnd, seed=11), x)


def test_maxval():
  assert rounding.max_value(1, 15) == 1 - 2**-15
  assert rounding.max_value(3, 2) == 3.75
  assert rounding.max_value(8, 8) == 128 - 2**-8


# ---------------------------------------------------------------------------
# Stochastic rounding.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bd,ad", [(1, 15), (3, 2), (5, 11), (16, 0)])
@pytest.mark.parametrize("seed", [0, 12345, -7, 2**40 + 3])
def test_stochastic_matches_numpy(backend, bd, ad, seed):
  x = special_values(bd, ad, np.random.default_rng(seed % 1000), n=500)
  assert_same(run(backend, x, bd, ad, "stochastic", seed=seed),
              ref_stochastic(x, bd, ad, seed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_between_neighbours(backend):
  bd, ad = 4, 3
  x = (np.random.default_rng(1).uniform(-7, 7, 20000)).astype(np.float32)
  q = run(backend, x, bd, ad, "stochastic", seed=5)
  step = 2.0**-ad
  lo = np.floor(x / step) * step
  assert np.all((q == lo) | (q == lo + step))
  assert np.all(np.round(q / step) == q / step)
  assert 0.3 < np.mean(q == lo) < 0.7  # both neighbours occur


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_unbiased(backend):
  values = np.float32([0.3, -0.3, 0.05, -1.1, 2.6, 3.7])  # Q3.2, step 0.25
  reps = 100000
  x = np.repeat(values, reps)
  q = run(backend, x, 3, 2, "stochastic", seed=99).reshape(len(values), reps)
  step = 0.25
  frac = values / step - np.floor(values / step)
  sigma = step * np.sqrt(frac * (1 - frac) / reps)
  np.testing.assert_array_less(np.abs(q.mean(axis=1) - values), 5 * sigma)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_seeding(backend):
  x = tf.random.normal([4000])
  with use_backend(backend):
    a = round_fixed(x, 2, 6, "stochastic", seed=21).numpy()
    b = round_fixed(x, 2, 6, "stochastic", seed=21).numpy()
    c = round_fixed(x, 2, 6, "stochastic", seed=22).numpy()
    d = round_fixed(x, 2, 6, "stochastic").numpy()
    e = round_fixed(x, 2, 6, "stochastic").numpy()
    fn = tf.function(lambda v: round_fixed(v, 2, 6, "stochastic"))
    f, g = fn(x).numpy(), fn(x).numpy()
  np.testing.assert_array_equal(a, b)
  for one, other in ((a, c), (d, e), (f, g)):
    assert np.mean(one != other) > 0.05


def test_native_equals_fallback_bitwise():
  x = tf.concat([tf.reshape(tf.random.normal([64, 9, 7, 33]) * 3, [-1]),
                 tf.constant(special_values(5, 11, np.random.default_rng(3)))],
                0)
  for rnd in rounding.ROUNDINGS:
    for seed in (0, 1, -1, 2**33 + 5, tf.constant(17, tf.int64)):
      for bd, ad in ((5, 11), (1, 15), (12, 0), (2, 22)):
        got = [run(b, x, bd, ad, rnd, seed=seed) for b in BACKENDS]
        np.testing.assert_array_equal(bits(got[0]), bits(got[1]))


def test_uniform_is_the_documented_hash():
  u = rounding.uniform_tf(tf.constant([3, 1000]), tf.constant(42, tf.int64))
  np.testing.assert_array_equal(u.numpy().ravel(), ref_uniform(3000, 42))
  assert 0.45 < u.numpy().mean() < 0.55


# ---------------------------------------------------------------------------
# Gradient, dtypes, shapes, errors.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rnd", rounding.ROUNDINGS)
def test_gradient_straight_through(backend, rnd):
  x = tf.constant([0.3, -0.7, 9.0, -9.0, 0.01])  # 9.0 saturates in Q3.2
  dy = tf.constant([1.0, 2.0, 3.0, 4.0, 5.0])
  with use_backend(backend):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = round_fixed(x, 3, 2, rnd, seed=1)
    np.testing.assert_array_equal(tape.gradient(y, x, dy), dy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_and_shapes(backend):
  with use_backend(backend):
    x64 = tf.constant([[0.125, 5.0]], tf.float64)
    y = round_fixed(x64, 3, 2)
    assert y.dtype == tf.float64
    np.testing.assert_array_equal(y.numpy(), [[0.25, 3.75]])
    assert round_fixed(tf.constant([0.3], tf.float16), 3, 2).dtype == \
        tf.float16
    assert round_fixed(tf.zeros([0, 3]), 3, 2).shape == (0, 3)
    fn = tf.function(lambda v: round_fixed(v, 3, 2, "stochastic", seed=1),
                     input_signature=[tf.TensorSpec([None, 2])])
    assert fn(tf.ones([5, 2])).shape == (5, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_arguments(backend):
  x = tf.constant([1.0])
  with use_backend(backend):
    with pytest.raises(ValueError, match="bd .* must be >= 1, got 0"):
      round_fixed(x, 0, 8)
    with pytest.raises(ValueError, match="ad .* must be >= 0, got -1"):
      round_fixed(x, 4, -1)
    with pytest.raises(ValueError, match="must be <= 24.*Q20.5"):
      round_fixed(x, 20, 5)
    with pytest.raises(ValueError, match="integer bd and ad"):
      round_fixed(x, 2.0, 3)
    with pytest.raises(ValueError, match="integer bd and ad"):
      round_fixed(x, True, 3)
    with pytest.raises(ValueError, match="rounding must be one of"):
      round_fixed(x, 2, 3, "nearest")
    with pytest.raises(ValueError, match="float tensor, got dtype int32"):
      round_fixed(tf.constant([1, 2]), 2, 3)
    with pytest.raises(ValueError, match="seed must be a scalar"):
      round_fixed(x, 2, 3, "stochastic", seed=tf.constant([1, 2]))
    with pytest.raises(ValueError, match="seed must be an int"):
      round_fixed(x, 2, 3, "stochastic", seed=tf.constant(1.5))


def test_native_kernel_validates():
  """The op itself refuses bad formats (OP_REQUIRES / shape function)."""
  with use_backend("native"):
    lib = native.library()
    x, seed = tf.constant([1.0]), tf.constant(0, tf.int64)
    for bd, ad, msg in ((0, 8, "bd"), (4, -1, "ad"), (20, 5, "bd \\+ ad")):
      with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                         match=msg):
        lib.blpa_round_fixed(x, seed, bd=bd, ad=ad)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                       match="seed must be a scalar"):
      lib.blpa_round_fixed(x, tf.constant([0, 1], tf.int64), bd=2, ad=2)
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError,
                        ValueError)):
      lib.blpa_round_fixed(tf.constant([1], tf.int32), seed, bd=2, ad=2)


@pytest.mark.slow
def test_native_at_least_5x_faster():
  """[128,32,32,64]: median of interleaved calls, native vs fallback."""
  from blpa.fixedpoint import timing  # pylint: disable=import-outside-toplevel
  result = timing.measure(repeats=7)
  for rnd in rounding.ROUNDINGS:
    assert result[rnd]["speedup"] >= 5, result


def test_timing_tiny():
  """The timing code path of the slow speed check on a tiny tensor: every
  rounding mode timed natively and on the fallback (no speed asserted)."""
  from blpa.fixedpoint import timing  # pylint: disable=import-outside-toplevel
  with use_backend("native"):
    result = timing.measure(shape=(2, 4, 4, 8), repeats=1)
  assert set(result) == set(rounding.ROUNDINGS)
  for got in result.values():
    assert got["native_ms"] > 0 and got["fallback_ms"] > 0
    assert got["speedup"] == pytest.approx(got["fallback_ms"] /
                                           got["native_ms"])

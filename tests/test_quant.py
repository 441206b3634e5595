"""Tests of blpa.quant: native kernels, pure-TF fallback, NumPy reference."""

import contextlib
import os
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blpa import quant  # noqa: E402

NBITS = (4, 8)
SHAPES = [
    (1, 1, 1, 1),
    (1, 3, 3, 3),
    (2, 4, 5, 5),
    (3, 2, 2, 7),
    (1, 5, 3, 17),
    (2, 3, 3, 33),
    (2, 2, 2, 64),
    (1, 4, 4, 257),
    (2, 3, 4, 2),
]

# ---------------------------------------------------------------------------
# Backend selection.


@contextlib.contextmanager
def use_backend(name):
  """Runs the block with quant's backend forced to `name` (or skips)."""
  old = os.environ.get("BLPA_PY_OPS")
  os.environ["BLPA_PY_OPS"] = "1" if name == "python" else "0"
  quant._reset_for_tests()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      got = quant.backend()
    if got != name:
      pytest.skip(f"native library not loadable ({quant._so_path()}); "
                  "build it with `bash make.sh`")
    yield
  finally:
    if old is None:
      os.environ.pop("BLPA_PY_OPS", None)
    else:
      os.environ["BLPA_PY_OPS"] = old
    quant._reset_for_tests()


def native_lib():
  """The loaded op library, or skip."""
  with use_backend("native"):
    return quant._native_lib()


def run_both(fn):
  """fn() under the native backend and under the fallback."""
  with use_backend("native"):
    native = fn()
  with use_backend("python"):
    python = fn()
  return native, python


# ---------------------------------------------------------------------------
# Independent NumPy reference of the formulas (float32 throughout).


def ref_shift(offset, nbits):
  n = 2**nbits
  scale = np.float32(n / 6)
  offset = offset.astype(np.float32)
  offset = np.where(np.abs(offset) < np.finfo(np.float32).tiny, 0, offset)
  with np.errstate(invalid="ignore", over="ignore"):
    s = np.float32(n / 2) - np.floor(offset.astype(np.float32) * scale)
  s = np.where(np.isnan(s), np.float32(1), s)
  return np.clip(s, 1, n).astype(np.int64)


def ref_codes(act, offset, nbits):
  """Unpacked codes q [N,H,W,C], clip in float before the int conversion."""
  n = 2**nbits
  scale = np.float32(n / 6)
  with np.errstate(invalid="ignore", over="ignore"):
    t = (act.astype(np.float32) - np.float32(1e-6)) * scale
    v = np.floor(t) + ref_shift(offset, nbits).astype(np.float32)
  v = np.where(np.isnan(v), np.float32(0), v)
  return np.clip(v, 0, n - 1).astype(np.int64)


def ref_pack(q, nbits):
  if nbits == 8:
    return q.astype(np.uint8)
  if q.shape[-1] % 2:
    q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], -1)
  return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def ref_unpack(codes, channels, nbits):
  c = codes.astype(np.int64)
  if nbits == 8:
    return c
  q = np.stack([c & 15, c >> 4], -1).reshape(c.shape[:-1] + (-1,))
  return q[..., :channels]


def ref_restore(codes, offset, nbits):
  q = ref_unpack(codes, offset.shape[0], nbits)
  shift = ref_shift(offset, nbits)
  width = np.float32(6 / 2**nbits)
  approx = ((q - shift).astype(np.float32) + np.float32(0.5)) * width
  return approx, q >= shift


# ---------------------------------------------------------------------------
# Test data.


def activations(rng, shape, nbits):
  """Gaussian values mixed with bin edges, their neighbours and far values."""
  n = 2**nbits
  a = (rng.normal(size=shape) * 3).astype(np.float32)
  k = rng.integers(-n - 2, n + 3, size=shape)
  edges = (k * (6 / n)).astype(np.float32)
  eps = np.float32(1e-6)
  far = np.array([1e30, -1e30, 1e9, -1e9, 100, -100, 1e-40, -1e-40], np.float32)
  choice = rng.integers(0, 8, size=shape)
  a = np.where(choice == 0, edges, a)
  a = np.where(choice == 1, edges + eps, a)
  a = np.where(choice == 2, edges - eps, a)
  a = np.where(choice == 3, np.float32(0), a)
  a = np.where(choice == 4, far[rng.integers(0, len(far), size=shape)], a)
  return a.astype(np.float32)


def offsets(rng, channels):
  c = (rng.normal(size=channels) * 2).astype(np.float32)
  special = np.array([0, -0.5, 1e20, -1e20, 1e6, -1e6, 3.0, -1e-40], np.float32)
  pick = rng.random(channels) < 0.3
  c[pick] = special[rng.integers(0, len(special), size=pick.sum())]
  return c


def nonfinite_case(nbits):
  """Activations and offsets with NaN and +-inf."""
  del nbits
  inf, nan = np.float32(np.inf), np.float32(np.nan)
  act = np.array([nan, inf, -inf, 0, 1, -1, nan, 2], np.float32)
  act = np.tile(act, (2, 1, 3, 1))  # [2,1,3,8]
  offset = np.array([nan, inf, -inf, 0, nan, -inf, inf, 0.5], np.float32)
  return act, offset


def case(seed, shape, nbits):
  rng = np.random.default_rng(seed)
  return activations(rng, shape, nbits), offsets(rng, shape[-1])


def save_restore(act, offset, nbits):
  codes = quant.save_act(act, offset, nbits)
  approx, mask = quant.restore_act(codes, offset, nbits)
  return codes.numpy(), approx.numpy(), mask.numpy()


def check_reference(backend, act, offset, nbits):
  """save + restore under `backend` equal the NumPy reference bit for bit."""
  codes = ref_pack(ref_codes(act, offset, nbits), nbits)
  with use_backend(backend):
    got = save_restore(act, offset, nbits)
  for g, want in zip(got, (codes,) + ref_restore(codes, offset, nbits)):
    assert_bit_equal(g, want)


def assert_bit_equal(got, want):
  assert got.shape == want.shape and got.dtype == want.dtype
  if got.dtype == np.float32:
    got, want = got.view(np.uint32), want.view(np.uint32)
  bad = np.flatnonzero(got.ravel() != want.ravel())
  assert bad.size == 0, f"{bad.size} differ, first at {bad[:5]}"


# ---------------------------------------------------------------------------
# Native vs fallback vs reference.

BACKENDS = ["native", "python"]


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_native_matches_fallback(shape, nbits):
  act, offset = case(sum(shape) * nbits, shape, nbits)
  native, python = run_both(lambda: save_restore(act, offset, nbits))
  for got_n, got_p in zip(native, python):
    assert_bit_equal(got_n, got_p)


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, shape, nbits):
  act, offset = case(sum(shape) * nbits, shape, nbits)
  check_reference(backend, act, offset, nbits)


@pytest.mark.parametrize("nbits", NBITS)
def test_random_shapes(nbits):
  rng = np.random.default_rng(nbits)
  for _ in range(6):
    shape = tuple(int(x) for x in rng.integers(1, 6, size=3)) + (int(
        rng.integers(1, 80)),)
    act, offset = activations(rng, shape, nbits), offsets(rng, shape[-1])
    native, python = run_both(lambda: save_restore(act, offset, nbits))
    codes = ref_pack(ref_codes(act, offset, nbits), nbits)
    for got_n, got_p in zip(native, python):
      assert_bit_equal(got_n, got_p)
    assert_bit_equal(native[0], codes)


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_every_byte_value(backend, nbits):
  """Arbitrary bytes, including a set high nibble in the last byte (odd C)."""
  channels = 7
  rng = np.random.default_rng(3)
  codes = rng.integers(0,
                       256,
                       size=(4, 4, 5, quant.packed_channels(channels, nbits)))
  codes = codes.astype(np.uint8)
  codes.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
  offset = offsets(rng, channels)
  want = ref_restore(codes, offset, nbits)

  with use_backend(backend):
    got = quant.restore_act(codes, offset, nbits)
  for g, w in zip(got, want):
    assert_bit_equal(g.numpy(), w)


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite(backend, nbits):
  """NaN activation -> code 0; NaN/+inf offset -> shift 1, -inf -> shift n."""
  act, offset = nonfinite_case(nbits)
  n = 2**nbits
  np.testing.assert_array_equal(ref_shift(offset, nbits),
                                [1, 1, n, n // 2, 1, n, 1, n // 2 - (n // 12)])
  codes = ref_pack(ref_codes(act, offset, nbits), nbits)
  q = ref_unpack(codes, 8, nbits)
  assert (q[..., 0] == 0).all() and (q[..., 6] == 0).all()  # NaN activations
  assert (q[..., 1] == n - 1).all() and (q[..., 2] == 0).all()  # +-inf
  check_reference(backend, act, offset, nbits)


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_subnormal_offsets(backend, nbits):
  """Subnormal offsets count as 0 (TF's CPU threads flush them anyway)."""
  n = 2**nbits
  tiny = np.finfo(np.float32).tiny
  offset = np.array([-1e-40, 1e-40, -tiny / 2, tiny / 2, -tiny, tiny, -0.0, 0],
                    np.float32)
  np.testing.assert_array_equal(ref_shift(offset, nbits),
                                [n // 2] * 4 + [n // 2 + 1] + [n // 2] * 3)
  act = np.array([1e-40, -1e-40, 1e-6, -1e-6, 0, -0.0, tiny, -tiny], np.float32)
  act = np.broadcast_to(act[:, None], (8, 8)).reshape(1, 8, 1, 8).copy()
  check_reference(backend, act, offset, nbits)


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bin_edges_exact(backend, nbits):
  """Values on a bin edge k*6/n fall in bin k-1 (the 1e-6 shift), above it in k."""
  n = 2**nbits
  k = np.arange(-n // 2 + 1, n // 2)
  edge = (k * (6 / n)).astype(np.float32)
  act = np.stack([edge, edge + np.float32(1e-6) * 2, edge - np.float32(1e-6)],
                 -1)
  act = act.reshape(1, 1, -1, 3).repeat(2, axis=0)
  offset = np.zeros(3, np.float32)
  q = ref_unpack(ref_pack(ref_codes(act, offset, nbits), nbits), 3, nbits)
  np.testing.assert_array_equal(q[0, 0, :, 0], k - 1 + n // 2)
  np.testing.assert_array_equal(q[0, 0, :, 1], k + n // 2)
  np.testing.assert_array_equal(q[0, 0, :, 2], k - 1 + n // 2)
  with use_backend(backend):
    codes, _, _ = save_restore(act, offset, nbits)
  assert_bit_equal(ref_unpack(codes, 3, nbits), q)


# ---------------------------------------------------------------------------
# Properties.


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_properties(backend, nbits):
  n = 2**nbits
  rng = np.random.default_rng(11)
  shape = (2, 5, 5, 9)
  act = (rng.normal(size=shape) * 2).astype(np.float32)
  offset = (rng.normal(size=9) * 1.5).astype(np.float32)
  with use_backend(backend):
    codes, approx, mask = save_restore(act, offset, nbits)
    np.testing.assert_array_equal(mask, approx > 0)
    # In-range activations (code not clipped) are within half a bin.
    scale = np.float32(n / 6)
    raw = np.floor((act - np.float32(1e-6)) * scale) + ref_shift(offset, nbits)
    inside = (raw >= 0) & (raw <= n - 1)
    assert inside.mean() > 0.5
    err = np.abs(approx - act)[inside]
    assert err.max() <= 3 / n + 1e-5
    # Round trip: saving the restored values gives the same codes.
    again = quant.save_act(approx, offset, nbits).numpy()
    assert_bit_equal(again, codes)


# ---------------------------------------------------------------------------
# tf.function, empty batch, gradients.


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tf_function_unknown_dims(backend, nbits):
  act, offset = case(5, (3, 4, 2, 5), nbits)
  bytes_ = quant.packed_channels(5, nbits)
  specs = [
      # unknown batch only, then every dimension unknown
      (tf.TensorSpec([None, 4, 2, 5]), tf.TensorSpec([5])),
      (tf.TensorSpec([None, None, None, None]), tf.TensorSpec([None])),
  ]
  with use_backend(backend):
    want = save_restore(act, offset, nbits)
    for act_spec, off_spec in specs:

      @tf.function(input_signature=[act_spec, off_spec])
      def fn(a, c):
        codes = quant.save_act(a, c, nbits)
        approx, mask = quant.restore_act(codes, c, nbits)
        return codes, approx, mask

      out = fn(act, offset)
      if act_spec.shape[3] is not None:
        graph_out = fn.get_concrete_function().structured_outputs
        assert graph_out[0].shape.as_list() == [None, 4, 2, bytes_]
        assert graph_out[1].shape.as_list() == [None, 4, 2, 5]
        assert graph_out[2].shape.as_list() == [None, 4, 2, 5]
      for got, w in zip(out, want):
        assert_bit_equal(got.numpy(), w)


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, nbits):
  act = np.zeros((0, 3, 2, 5), np.float32)
  offset = np.ones(5, np.float32)
  with use_backend(backend):
    codes, approx, mask = save_restore(act, offset, nbits)
  assert codes.shape == (0, 3, 2, quant.packed_channels(5, nbits))
  assert codes.dtype == np.uint8
  assert approx.shape == (0, 3, 2, 5) and approx.dtype == np.float32
  assert mask.shape == (0, 3, 2, 5) and mask.dtype == bool


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_differentiable(backend):
  act = tf.constant(np.ones((1, 2, 2, 3), np.float32))
  offset = tf.constant(np.zeros(3, np.float32))
  with use_backend(backend):
    with tf.GradientTape() as tape:
      tape.watch([act, offset])
      approx, _ = quant.restore_act(quant.save_act(act, offset, 8), offset, 8)
      loss = tf.reduce_sum(approx)
    assert tape.gradient(loss, [act, offset]) == [None, None]


def test_packed_channels_and_compact_bytes():
  assert [quant.packed_channels(c, 4) for c in (1, 2, 3, 8, 257)
         ] == [1, 1, 2, 4, 129]
  assert [quant.packed_channels(c, 8) for c in (1, 2, 3, 257)] == [1, 2, 3, 257]
  assert quant.compact_bytes([128, 32, 32, 64], 4) == 128 * 32 * 32 * 32
  assert quant.compact_bytes(tf.TensorShape([2, 3, 3, 5]), 8) == 2 * 3 * 3 * 5
  with pytest.raises(ValueError, match="nbits must be 4 or 8"):
    quant.packed_channels(3, 2)
  with pytest.raises(ValueError, match="fully known"):
    quant.compact_bytes([None, 3, 3, 5], 4)


# ---------------------------------------------------------------------------
# Validation: Python wrapper, kernels (raw ops, eager) and shape functions.

ACT = np.zeros((2, 3, 3, 5), np.float32)
OFF = np.zeros(5, np.float32)
CODES4 = np.zeros((2, 3, 3, 3), np.uint8)

# (op, args, nbits, message regex) for each problem.
BAD_CALLS = [
    ("save", (np.zeros((3, 3, 5),
                       np.float32), OFF), 4, r"act must have rank 4"),
    ("save", (ACT, np.zeros((1, 5),
                            np.float32)), 4, r"offset must have rank 1"),
    ("save", (ACT, np.zeros(3, np.float32)), 4,
     r"offset length \(3\) must equal the number of channels C of act \(5\)"),
    ("save", (ACT, OFF), 5, r"nbits must be 4 or 8, got 5"),
    ("save", (np.zeros(
        (2, 3, 3, 0),
        np.float32), np.zeros(0, np.float32)), 4, r"C.* must be >= 1"),
    ("restore", (np.zeros((3, 3, 3),
                          np.uint8), OFF), 4, r"codes must have rank 4"),
    ("restore", (CODES4, np.zeros((5, 1),
                                  np.float32)), 4, r"offset must have rank 1"),
    ("restore", (CODES4, OFF), 8,
     r"codes last dimension must be ceil\(C\*nbits/8\) = 5 for C = 5.*got 3"),
    ("restore", (np.zeros((2, 3, 3, 4), np.uint8), OFF), 4,
     r"codes last dimension must be ceil\(C\*nbits/8\) = 3 for C = 5.*got 4"),
    ("restore", (CODES4, OFF), 3, r"nbits must be 4 or 8, got 3"),
    ("restore", (CODES4, np.zeros(0, np.float32)), 4, r"C.* must be >= 1"),
]
BAD_IDS = [f"{op}-{i}" for i, (op, *_rest) in enumerate(BAD_CALLS)]


@pytest.mark.parametrize("op,args,nbits,message", BAD_CALLS, ids=BAD_IDS)
def test_wrapper_rejects(op, args, nbits, message):
  fn = quant.save_act if op == "save" else quant.restore_act
  with pytest.raises(ValueError, match=message):
    fn(*args, nbits)


@pytest.mark.parametrize("op,args,nbits,message", BAD_CALLS, ids=BAD_IDS)
def test_kernel_rejects(op, args, nbits, message):
  """The raw op in eager mode: only the kernel's checks run."""
  lib = native_lib()
  fn = lib.blpa_save_act if op == "save" else lib.blpa_restore_act
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    fn(*args, nbits=nbits)


@pytest.mark.parametrize("op,args,nbits,message", BAD_CALLS, ids=BAD_IDS)
def test_shape_fn_rejects(op, args, nbits, message):
  """The raw op traced with static shapes: the shape function's checks."""
  lib = native_lib()
  fn = lib.blpa_save_act if op == "save" else lib.blpa_restore_act
  specs = [tf.TensorSpec(a.shape, tf.as_dtype(a.dtype)) for a in args]
  traced = tf.function(lambda x, c: fn(x, c, nbits=nbits),
                       input_signature=specs)
  with pytest.raises(ValueError, match=message):
    traced.get_concrete_function()


@pytest.mark.parametrize("nbits", NBITS)
def test_fallback_checks_dynamic_shapes(nbits):
  """Mismatches hidden from static shapes fail at run time in the fallback."""
  spec = [tf.TensorSpec([None, None, None, None]), tf.TensorSpec([None])]
  save = tf.function(lambda a, c: quant.save_act(a, c, nbits),
                     input_signature=spec)
  spec_u8 = [
      tf.TensorSpec([None, None, None, None], tf.uint8),
      tf.TensorSpec([None])
  ]
  restore = tf.function(lambda q, c: quant.restore_act(q, c, nbits),
                        input_signature=spec_u8)
  with use_backend("python"):
    with pytest.raises(tf.errors.InvalidArgumentError, match="offset length"):
      save(np.zeros((1, 2, 2, 3), np.float32), np.zeros(1, np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="codes last dim"):
      restore(np.zeros((1, 2, 2, 9), np.uint8), np.zeros(3, np.float32))


# ---------------------------------------------------------------------------
# Loading.


def test_py_ops_env_forces_fallback(monkeypatch):
  monkeypatch.setenv("BLPA_PY_OPS", "1")
  quant._reset_for_tests()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # no warning for a chosen fallback
      assert quant.backend() == "python"
      codes = quant.save_act(ACT, OFF, 4)
    assert codes.shape == (2, 3, 3, 3)
  finally:
    quant._reset_for_tests()


def test_missing_library_warns_once(monkeypatch, tmp_path):
  path = str(tmp_path / "missing_quant_ops.so")
  monkeypatch.delenv("BLPA_PY_OPS", raising=False)
  monkeypatch.setenv("BLPA_QUANT_SO", path)
  quant._reset_for_tests()
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      assert quant.backend() == "python"
      quant.save_act(ACT, OFF, 8)
      quant.backend()
    msgs = [str(w.message) for w in caught if "blpa.quant" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert path in msgs[0] and "make.sh" in msgs[0]
  finally:
    quant._reset_for_tests()


def test_native_required():
  """With BLPA_REQUIRE_NATIVE=1 (as in CI) the native library must load."""
  quant._reset_for_tests()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = quant.backend()
  if os.environ.get("BLPA_REQUIRE_NATIVE") == "1":
    assert got == "native", (
        f"BLPA_REQUIRE_NATIVE=1 but {quant._so_path()} did not load: "
        f"{[str(w.message) for w in caught]}")
  elif got != "native":
    pytest.skip(f"native library not built ({quant._so_path()})")


# ---------------------------------------------------------------------------
# save_scaled_act: the codes of act / scale without the quotient tensor.


def scales(rng, channels):
  """Positive per-channel divisors, with tiny and large ones."""
  s = np.exp(rng.normal(size=channels)).astype(np.float32)
  special = np.array([1e-8, 1.0, 3e5, 0.5], np.float32)
  pick = rng.random(channels) < 0.3
  s[pick] = special[rng.integers(0, len(special), size=pick.sum())]
  return s


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_save_scaled_matches_save_of_quotient(shape, nbits):
  rng = np.random.default_rng(sum(shape) + nbits)
  act, offset = activations(rng, shape, nbits), offsets(rng, shape[-1])
  scale = scales(rng, shape[-1])
  want = ref_pack(ref_codes(act / scale, offset, nbits), nbits)
  native, python = run_both(
      lambda: quant.save_scaled_act(act, scale, offset, nbits).numpy())
  assert_bit_equal(native, want)
  assert_bit_equal(python, want)


def test_save_scaled_makes_no_quotient_tensor():
  """Natively, one op and no full-size division in the graph."""
  with use_backend("native"):
    graph = tf.function(lambda a, s, c: quant.save_scaled_act(a, s, c, 4)
                        ).get_concrete_function(
                            tf.TensorSpec([8, 4, 4, 6]), tf.TensorSpec([6]),
                            tf.TensorSpec([6])).graph
  types = [op.type for op in graph.get_operations()]
  assert "BlpaSaveScaledAct" in types and "RealDiv" not in types, types


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_scaled_rejects_bad_scale(backend):
  with use_backend(backend):
    with pytest.raises(ValueError, match=r"scale length \(3\) must equal"):
      quant.save_scaled_act(ACT, np.ones(3, np.float32), OFF, 4)
    with pytest.raises(ValueError, match=r"scale must have rank 1"):
      quant.save_scaled_act(ACT, np.ones((5, 1), np.float32), OFF, 4)


def test_save_scaled_kernel_rejects_bad_scale():
  lib = native_lib()
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"scale must have shape \[C\] with C = 5"):
    lib.blpa_save_scaled_act(ACT, OFF, np.ones(4, np.float32), nbits=4)
  traced = tf.function(
      lambda a, c, s: lib.blpa_save_scaled_act(a, c, s, nbits=8),
      input_signature=[tf.TensorSpec(ACT.shape), tf.TensorSpec([5]),
                       tf.TensorSpec([4])])
  with pytest.raises(ValueError, match=r"scale length \(4\) must equal"):
    traced.get_concrete_function()

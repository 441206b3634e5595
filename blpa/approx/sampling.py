"""Column-row sampling of a matrix product (Adelman et al., NeurIPS 2021).

A product ``C = A·B`` (``A`` m×n, ``B`` n×p) is the sum of n outer products
``A[:, i] ⊗ B[i, :]``. A sampler scores each pair, keeps a subset ``S`` and
gives each kept pair a scale ``c_i``; the estimate is
``(A[:, S]·diag(c_S))·B[S, :]``. Scores, indices and scales carry no gradient.

Samplers (stated in full in ``docs/approx.md``):

- ``topk``: the k largest scores ``‖A[:, i]‖·‖B[i, :]‖``, scale 1 (biased).
- ``weight_topk``: the k largest weight-side norms ``‖B[i, :]‖``, scale 1
  (every data-parallel replica picks the same pairs).
- ``crs``: k draws with replacement from ``p = 0.9·s/Σs + 0.1/n``, each scaled
  by ``1/(k·p_i)`` (unbiased).
- ``bernoulli``: keep pair i with probability ``p_i = 0.9·clip(k·s_i/Σs, 0,
  1) + 0.1/n``, scaled by ``1/p_i``. When no pair is drawn (or every score is
  zero) the product is computed exactly; to stay unbiased, a non-empty draw is
  further scaled by ``1 − P(empty)`` (``P(empty) = Π(1 − p_i)``), so that
  ``E[Ĉ] = (1 − P(empty))·C + P(empty)·C = C``.

The random samplers take their randomness as an explicit tensor of uniform
draws (:func:`uniform_shape`), so that a layer can draw it in the forward pass
and use it in a custom gradient.
"""

import tensorflow as tf

from blpa import channels

__all__ = [
    "SAMPLERS", "RANDOM_SAMPLERS", "UNBIASED_SAMPLERS", "num_samples",
    "uniform_shape", "draw", "sampled_matmul", "column_norms"
]

SAMPLERS = ("topk", "crs", "bernoulli", "weight_topk")
RANDOM_SAMPLERS = ("crs", "bernoulli")
UNBIASED_SAMPLERS = ("crs", "bernoulli")
_UNIFORM_MIX = 0.1  # the reference's hard-coded uniform mixing ε


def num_samples(n, sample_ratio, minimal_k=1):
  """Number of column-row pairs to keep out of n.

  Args:
    n: number of pairs (a Python int).
    sample_ratio: fraction of pairs to keep, in (0, 1].
    minimal_k: keep at least this many pairs.

  Returns:
    ``min(max(int(n * sample_ratio), minimal_k), n)``; ``n`` means exact.
  """
  check_ratio(sample_ratio, minimal_k)
  return min(max(int(float(n) * sample_ratio), int(minimal_k)), int(n))


def check_ratio(sample_ratio, minimal_k):
  """Raises ValueError unless 0 < sample_ratio <= 1 and minimal_k >= 1."""
  if isinstance(sample_ratio, bool) or not isinstance(sample_ratio,
                                                      (int, float)):
    raise ValueError(f"sample_ratio must be a number in (0, 1], got "
                     f"{sample_ratio!r}")
  if not 0.0 < float(sample_ratio) <= 1.0:
    raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
  if isinstance(minimal_k, bool) or not isinstance(minimal_k, int) or \
      minimal_k < 1:
    raise ValueError(f"minimal_k must be an int >= 1, got {minimal_k!r}")


def check_sampler(sampler):
  """Raises ValueError unless sampler is one of :data:`SAMPLERS`."""
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def uniform_shape(sampler, n, k):
  """Shape of the uniform draws that ``draw(sampler, ...)`` needs.

  Args:
    sampler: one of :data:`SAMPLERS`.
    n: number of pairs (int or scalar tensor).
    k: number of pairs to keep (int or scalar tensor).

  Returns:
    A shape list, or None for the deterministic samplers.
  """
  check_sampler(sampler)
  if sampler == "crs":
    return [k]
  if sampler == "bernoulli":
    return [n]
  return None


def column_norms(x, axis):
  """L2 norms of the slices of x along ``axis`` (over every other axis).

  Args:
    x: a tensor.
    axis: the axis whose entries are the pairs.

  Returns:
    A float32 vector with one norm per entry of ``axis``.
  """
  axis = axis % len(x.shape)
  if axis == len(x.shape) - 1:
    return tf.sqrt(channels.channel_square_sums(x))
  others = [a for a in range(len(x.shape)) if a != axis]
  squares = tf.square(tf.cast(tf.stop_gradient(x), tf.float32))
  return tf.sqrt(tf.reduce_sum(squares, axis=others))


def draw(sampler, scores, k, uniform=None):
  """Draws a sample of pairs.

  Args:
    sampler: one of :data:`SAMPLERS`.
    scores: float vector [n] of pair scores (``‖A[:, i]‖·‖B[i, :]‖``; for
      ``weight_topk`` the weight-side norms).
    k: number of pairs to keep, ``1 <= k < n`` (int or scalar tensor; the
      deterministic samplers need an int).
    uniform: uniform [0, 1) draws of shape ``uniform_shape(sampler, n, k)``.

  Returns:
    ``(indices, scales)``: int32 indices [k'] and float32 scales [k'], or
    None for scales when every scale is 1.
  """
  check_sampler(sampler)
  scores = tf.stop_gradient(tf.cast(scores, tf.float32))
  if sampler in ("topk", "weight_topk"):
    indices = tf.sort(tf.math.top_k(scores, k, sorted=False).indices)
    return indices, None
  if uniform is None:
    raise ValueError(f"sampler {sampler!r} needs uniform draws")
  uniform = tf.stop_gradient(tf.cast(uniform, tf.float32))
  if sampler == "crs":
    return _draw_crs(scores, k, uniform)
  return _draw_bernoulli(scores, k, uniform)


def _mix(p, n):
  """The reference's ε-uniform mixing of probabilities p over n pairs."""
  return (1.0 - _UNIFORM_MIX) * p + _UNIFORM_MIX / tf.cast(n, tf.float32)


def _draw_crs(scores, k, uniform):
  """k i.i.d. draws from the mixed score distribution, scaled 1/(k·p)."""
  n = tf.size(scores)
  total = tf.reduce_sum(scores)
  uniform_q = tf.fill([n], 1.0 / tf.cast(n, tf.float32))
  q = tf.where(total > 0, scores / tf.maximum(total, 1e-30), uniform_q)
  p = _mix(q, n)
  cdf = tf.cumsum(p)
  indices = tf.searchsorted(cdf, uniform * cdf[-1], side="right")
  indices = tf.minimum(tf.cast(indices, tf.int32), n - 1)
  scales = 1.0 / (tf.cast(k, tf.float32) * tf.gather(p, indices))
  return indices, scales


def _draw_bernoulli(scores, k, uniform):
  """Independent draws with p_i = mix(clip(k·s/Σs)); empty draw → exact."""
  n = tf.size(scores)
  nnz = tf.math.count_nonzero(scores, dtype=tf.int32)
  k = tf.minimum(tf.cast(k, tf.int32), nnz)
  total = tf.maximum(tf.reduce_sum(scores), 1e-30)
  p = tf.clip_by_value(tf.cast(k, tf.float32) * scores / total, 0.0, 1.0)
  p = _mix(p, n)
  keep = uniform < p
  exact = tf.logical_or(nnz == 0, tf.logical_not(tf.reduce_any(keep)))
  p_empty = tf.exp(tf.reduce_sum(tf.math.log1p(-p)))
  keep = tf.logical_or(keep, exact)
  indices = tf.cast(tf.where(keep)[:, 0], tf.int32)
  scales = tf.where(exact, tf.ones_like(indices, tf.float32),
                    (1.0 - p_empty) / tf.gather(p, indices))
  return indices, scales


def sampled_matmul(a, b, k, sampler="topk", seed=None):
  """Column-row sampled estimate of ``a @ b``.

  Args:
    a: [m, n] tensor.
    b: [n, p] tensor.
    k: number of column-row pairs to keep (Python int); ``k >= n`` computes
      ``a @ b`` exactly.
    sampler: one of :data:`SAMPLERS` (``weight_topk`` scores by ``b``).
    seed: optional int seed for the random samplers (stateless draws).

  Returns:
    The estimate of ``a @ b``, [m, p]; gradients flow through the kept
    pairs.
  """
  check_sampler(sampler)
  if len(a.shape) != 2 or len(b.shape) != 2:
    raise ValueError(f"sampled_matmul needs 2-D a and b, got shapes "
                     f"{a.shape} and {b.shape}")
  n = a.shape[1]
  if n is None or b.shape[0] != n:
    raise ValueError(f"inner dimensions differ or are unknown: a {a.shape}, "
                     f"b {b.shape}")
  if int(k) < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if int(k) >= n:
    return tf.matmul(a, b)
  shape = uniform_shape(sampler, n, int(k))
  uniform = None
  if shape is not None:
    uniform = (tf.random.uniform(shape) if seed is None else
               tf.random.stateless_uniform(shape, seed=[int(seed), 0]))
  return matmul_with(a, b, int(k), sampler, uniform)


def matmul_with(a, b, k, sampler, uniform):
  """``sampled_matmul`` with given uniform draws (``k < n``)."""
  b_norms = column_norms(b, 0)
  scores = b_norms if sampler == "weight_topk" else column_norms(a, 1) * b_norms
  indices, scales = draw(sampler, scores, k, uniform)
  b_kept = channels.gather_channels(b, indices, 0)
  if scales is not None:
    b_kept = b_kept * tf.cast(scales, b.dtype)[:, None]
  return tf.matmul(channels.gather_channels(a, indices), b_kept)

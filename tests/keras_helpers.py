"""Shared pieces of the blpa.keras tests: small models and gradient checks."""

import numpy as np
import tensorflow as tf
import keras

L = keras.layers


def batch(shape, seed=0, classes=10):
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.standard_normal(shape), tf.float32)
  y = tf.constant(rng.integers(0, classes, size=[shape[0]]), tf.int32)
  return x, y


def loss_and_grads(model, x, y, function=True, from_logits=True):
  """Outputs and gradients of mean cross-entropy (+ model.losses)."""
  def step(x, y):
    with tf.GradientTape() as tape:
      out = model(x, training=True)
      loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
          y, out, from_logits=from_logits))
      if model.losses:
        loss = loss + tf.add_n(model.losses)
    return out, tape.gradient(loss, model.trainable_variables)
  if function:
    step = tf.function(step)
  out, grads = step(x, y)
  return out.numpy(), [g.numpy() for g in grads]


def compare(model, compressed, x, y, function=True, from_logits=True):
  """Runs both from the same weights; returns (outputs, grads, weights
  after) of each."""
  start = [v.numpy() for v in model.weights]
  results = []
  for m in (model, compressed):
    for v, w in zip(model.weights, start):
      v.assign(w)
    out, grads = loss_and_grads(m, x, y, function, from_logits)
    results.append((out, grads, [v.numpy() for v in model.weights]))
  for v, w in zip(model.weights, start):
    v.assign(w)
  return results


def _global_norm(grads):
  return float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64))
                           for g in grads)))


def global_rel_error(ref, got):
  """``|g - g_ref| / |g_ref|`` over all variables together."""
  diff = [a.astype(np.float64) - b for a, b in zip(ref, got)]
  return _global_norm(diff) / _global_norm(ref)


def rel_errors(ref, got):
  """Per-variable relative error, over variables whose gradient is not
  negligible (above 1e-3 of the whole gradient's norm: a conv bias before a
  BatchNormalization has a gradient that is zero in exact arithmetic and
  float noise in both)."""
  floor = 1e-3 * _global_norm(ref)
  return [float(np.linalg.norm(a - b) / np.linalg.norm(a))
          for a, b in zip(ref, got) if np.linalg.norm(a) > floor]


def assert_same_gradients(ref, got):
  """Whole gradient within 1e-5 relative, each variable within 1e-4."""
  assert global_rel_error(ref, got) <= 1e-5
  assert max(rel_errors(ref, got)) <= 1e-4


def weighted_cosine(ref, got):
  """Norm-weighted per-variable cosine: each variable's cosine (float64)
  weighted by its share of the sum of the reference gradients' norms, so
  that a near-zero-norm variable does not decide alone."""
  norms = np.array([np.linalg.norm(np.asarray(a, np.float64)) for a in ref])
  total = 0.0
  for a, b, n in zip(ref, got, norms):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    total += n * (float(a @ b) / denom if denom else float(n == 0))
  return total / norms.sum()


def cosines(ref, got):
  """Per-variable cosine, over variables with a non-negligible gradient."""
  floor = 1e-3 * _global_norm(ref)
  return [float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
          for a, b in zip(ref, got) if np.linalg.norm(a) > floor]


def mixed_model():
  """A model using every analytic layer kind, the generic path, a nested
  model and a layer called twice."""
  inner_in = keras.Input((8, 8, 12))
  t = L.DepthwiseConv2D(3, padding='same')(inner_in)
  t = L.BatchNormalization()(t)
  t = L.ReLU(6.0)(t)
  inner = keras.Model(inner_in, t, name='inner')
  shared = L.Conv2D(12, 1, name='shared')
  inp = keras.Input((10, 10, 3))
  x = L.ZeroPadding2D(1)(inp)
  x = L.Conv2D(12, 3, strides=2, padding='same', name='stem')(x)  # 6x6
  x = L.ZeroPadding2D(((1, 1), (1, 1)))(x)                  # 8x8
  x = L.BatchNormalization()(x)
  x = L.Activation('relu')(x)
  a = shared(x)
  b = inner(a)
  c = shared(b)
  x = L.Add()([a, c])
  x = L.Concatenate()([x, L.ReLU()(b)])
  x = L.Activation('swish')(x)                              # generic
  x = L.SeparableConv2D(16, 3, padding='same', depth_multiplier=2)(x)
  x = L.MaxPooling2D(2)(x)
  x = L.Cropping2D(((0, 1), (1, 0)))(x)
  x = L.LayerNormalization()(x)                             # generic
  x = L.AveragePooling2D(1)(x)
  x = L.Reshape((9, 16))(x)
  x = L.Dense(16)(x)                                        # rank-3 Dense
  x = L.BatchNormalization()(x)
  x = L.ReLU()(x)
  x = L.Flatten()(x)
  x = L.Dropout(0.0)(x)
  out = L.Dense(10)(x)
  return keras.Model(inp, out, name='mixed')

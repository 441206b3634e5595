"""Tests of blpa.approx.selection: which channels topk sampling selects."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from blpa import approx
from blpa.approx import selection
from blpa.approx.layers import APPROX_LAYERS


def test_gini_and_entropy_known_values():
  """Even counts: Gini 0, entropy 1; the same k of n always: 1 − k/n and
  log k / log n."""
  assert selection.gini([5, 5, 5, 5]) == pytest.approx(0.0, abs=1e-12)
  assert selection.normalized_entropy([5, 5, 5, 5]) == pytest.approx(1.0)
  fixed = [7, 7, 0, 0, 0, 0, 0, 0]
  assert selection.gini(fixed) == pytest.approx(1 - 2 / 8)
  assert selection.normalized_entropy(fixed) == pytest.approx(
      np.log(2) / np.log(8))
  assert selection.gini([1, 2, 3, 4]) == pytest.approx(0.25)
  for bad in ([], [0, 0], [1, -1]):
    with pytest.raises(ValueError, match="non-negative"):
      selection.gini(bad)
  with pytest.raises(ValueError, match=">= 2"):
    selection.normalized_entropy([3])


def _model():
  """conv → BN → ReLU → conv → BN → ReLU → pool → dense, sampled at 0.5."""
  inp = keras.Input((6, 6, 3))
  x = keras.layers.Conv2D(8, 3, padding="same")(inp)
  x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
  x = keras.layers.Conv2D(6, 3, padding="same")(x)
  x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
  x = keras.layers.GlobalAveragePooling2D()(x)
  out = keras.layers.Dense(4)(keras.layers.Dense(10)(x))
  keras.utils.set_random_seed(1)
  return approx.approximate(keras.Model(inp, out), 0.5)


def test_recorder_matches_training_selection():
  """The recorded channels are exactly those with a kernel gradient in the
  training step on the same batch; BN statistics are left untouched."""
  model = _model()
  recorder = selection.SelectionRecorder(model)
  assert [l.name for l in recorder.layers] == [
      l.name for l in model.layers
      if isinstance(l, APPROX_LAYERS) and l.sample_ratio < 1]
  x = tf.constant(np.random.default_rng(0).normal(size=(5, 6, 6, 3)),
                  tf.float32)
  before = [v.numpy() for v in model.non_trainable_variables]
  recorder.record(x)
  for want, got in zip(before, model.non_trainable_variables):
    np.testing.assert_array_equal(want, got.numpy())
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(tf.square(model(x, training=True)))
  kernels = [l.kernel for l in recorder.layers]
  for layer, grad, count in zip(recorder.layers, tape.gradient(loss, kernels),
                                recorder.counts):
    grad = tf.convert_to_tensor(grad)
    axis = layer.kernel_in_axis
    others = tuple(a for a in range(grad.ndim) if a != axis)
    used = np.any(grad.numpy() != 0, axis=others)
    np.testing.assert_array_equal(used, count == 1)
    assert count.sum() == layer.num_kept()
  summary = recorder.summary()
  assert summary["steps"] == 1
  assert summary["mean"]["top_k_share"] == pytest.approx(1.0)
  assert summary["mean"]["norm_growth_often"] == pytest.approx(1.0)
  assert summary["mean"]["change_rare"] == 0.0


def test_recorder_needs_deterministic_sampler():
  inp = keras.Input((6,))
  model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Dense(8)(inp)))
  with pytest.raises(ValueError, match="no sampled layer"):
    selection.SelectionRecorder(model)
  with pytest.raises(ValueError, match="topk or weight_topk"):
    selection.SelectionRecorder(
        approx.approximate(model, 0.5, sampler="bernoulli", skip=None))
  layer = approx.ApproxDense(3, sample_ratio=0.5, sampler="crs")
  layer.build((2, 6))
  with pytest.raises(ValueError, match="deterministic sampler"):
    layer.selected_indices(tf.ones((2, 6)))

"""Tests of blpa.approx.phases: an exact final phase of sampled training."""

import numpy as np
import pytest
import keras

from blpa import approx
from blpa.approx import nets, phases
from blpa.approx.layers import APPROX_LAYERS


def test_exact_steps():
  assert phases.exact_steps(132, 0.1) == 13
  assert phases.exact_steps(10, 0) == 0
  assert phases.exact_steps(10, 1) == 10
  for bad in (-1, 2.5, True):
    with pytest.raises(ValueError, match="total_steps"):
      phases.exact_steps(bad, 0.1)
  for bad in (-0.1, 1.5, "0.1"):
    with pytest.raises(ValueError, match="exact_fraction"):
      phases.exact_steps(10, bad)
  with pytest.raises(ValueError, match="epochs"):
    phases.ExactFinalEpochs(-1)


def _fit(model, callbacks, epochs):
  """Plain SGD on a fixed batch order; returns the weights after fit."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(48, 12)).astype(np.float32)
  y = (x[:, :4].sum(1) > 0).astype(np.int32)
  model.compile(keras.optimizers.SGD(0.1),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x, y, epochs=epochs, batch_size=16, shuffle=False, verbose=0,
            callbacks=callbacks)
  return model.get_weights()


def test_exact_final_epochs_trains_like_the_exact_model():
  """All epochs exact through the callback == the exact model's fit; no
  exact epoch differs; the layers sample again after fit."""
  keras.utils.set_random_seed(0)
  base = nets.mlp(12, (16,), classes=2)
  weights = base.get_weights()
  sampled = approx.approximate(base, 0.5, skip=None)
  plain = approx.approximate(base, 0.5, skip=None)
  want = _fit(base, [], 2)
  got = _fit(sampled, [phases.ExactFinalEpochs(2)], 2)
  for a, b in zip(want, got):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert all(l.sample_ratio == 0.5 for l in sampled.layers
             if isinstance(l, APPROX_LAYERS))
  assert not all(np.allclose(a, b) for a, b in zip(want,
                                                   _fit(plain, [], 2)))
  assert any(not np.allclose(a, b) for a, b in zip(weights, want))

"""Exact evaluation after sampled training: BN statistics from exact passes.

A network trained with sampled layers accumulates its BatchNormalization
moving statistics from sampled forward passes, while evaluation is exact:
the statistics do not fit the exact activations (the exact sums also hold
the channels topk left out, docs/approx.md). :func:`recalibrate_batch_norm`
recomputes them from a few exact forward passes over training batches, the
"precise BN" of Wu & Johnson (2021), before evaluation.
"""

import contextlib

import keras

from blpa.approx import convert

__all__ = ["exact_layers", "recalibrate_batch_norm"]


@contextlib.contextmanager
def exact_layers(model):
  """Within the block, the model's sampled layers compute exactly.

  Takes effect for calls traced inside the block (eager calls, or a new
  ``tf.function``).
  """
  layers = convert.approximated_layers(model)
  ratios = [l.sample_ratio for l in layers]
  for layer in layers:
    layer.sample_ratio = 1.0
  try:
    yield model
  finally:
    for layer, ratio in zip(layers, ratios):
      layer.sample_ratio = ratio


def recalibrate_batch_norm(model, batches):
  """Sets the BN moving statistics to their averages over exact passes.

  Args:
    model: a Keras model.
    batches: an iterable of input batches (training data).

  Returns:
    The number of batches used.
  """
  norms = [l for l in model.layers
           if isinstance(l, keras.layers.BatchNormalization)]
  momenta = [l.momentum for l in norms]
  count = 0
  with exact_layers(model):
    try:
      for count, batch in enumerate(batches, 1):
        for layer in norms:
          layer.momentum = (count - 1) / count   # running average
        model(batch, training=True)
    finally:
      for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum
  return count

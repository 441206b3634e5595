"""Multiply-adds that a training step runs in each Dense and Conv2D layer.

Counted analytically from the layer shapes and the number of input features
each product actually keeps: a Conv2D with output [N, Ho, Wo, Co], kernel
[kh, kw, Ci, Co] of which k input channels are kept runs
``N·Ho·Wo·Co·kh·kw·k`` multiply-adds in its forward product, as many in
grad-input and in grad-kernel (forward mode). Blackbox mode runs the sampled
forward and the exact backward; backward mode the exact forward and the two
products sampled over output features and over the batch. The first layer
computes no grad-input. Random samplers count their nominal k (bernoulli
draws ≤ 0.9k + 0.1 pairs on average).
"""

import math

import keras

from blpa.approx import layers as layers_lib
from blpa.approx import sampling

__all__ = ["layer_macs", "training_macs"]


def _is_counted(layer):
  return isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))


def _full_macs(layer, batch):
  """Multiply-adds of the layer's exact forward product for a batch."""
  kernel = layer.kernel.shape
  out = layer.output.shape
  return batch * math.prod(out[1:]) * math.prod(kernel[:-1])


def layer_macs(layer, batch, grad_input=True):
  """Multiply-adds of one layer's products in a training step.

  Args:
    layer: a built Dense/Conv2D (or approximate) layer of a functional model.
    batch: the batch size.
    grad_input: whether the step computes the gradient of the layer's input.

  Returns:
    dict with ``forward``, ``grad_input`` and ``grad_kernel`` counts.
  """
  full = _full_macs(layer, batch)
  f = {"forward": 1.0, "grad_input": 1.0, "grad_kernel": 1.0}
  if isinstance(layer, layers_lib.APPROX_LAYERS) and layer.sample_ratio < 1:
    n_in = layer.kernel.shape[layer.kernel_in_axis]
    r_in = layer.num_kept() / n_in
    if layer.mode == "forward":
      f = dict.fromkeys(f, r_in)
    elif layer.mode == "blackbox":
      f["forward"] = r_in
    else:
      n_out = layer.kernel.shape[-1]
      f["grad_input"] = sampling.num_samples(
          n_out, layer.sample_ratio, layer.minimal_k) / n_out
      f["grad_kernel"] = sampling.num_samples(
          batch, layer.sample_ratio, layer.minimal_k) / batch
  if not grad_input:
    f["grad_input"] = 0.0
  return {key: int(round(full * value)) for key, value in f.items()}


def training_macs(model, batch):
  """Multiply-adds of every Dense/Conv2D product in one training step.

  Args:
    model: a functional or Sequential Keras model (built).
    batch: the batch size.

  Returns:
    dict: ``total`` and per-layer ``layers`` ({name: layer_macs}).
  """
  inputs = {id(t) for t in model.inputs}
  per_layer = {}
  for layer in model.layers:
    if _is_counted(layer):
      first = id(layer.input) in inputs
      per_layer[layer.name] = layer_macs(layer, batch, grad_input=not first)
  total = sum(sum(v.values()) for v in per_layer.values())
  return {"total": total, "layers": per_layer}

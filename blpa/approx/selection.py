"""Which input channels forward sampling selects over training.

With ``topk`` (or ``weight_topk``) forward sampling a channel is kept when
its score ``‖x_c‖·‖W_c‖`` is among the k largest; only kept channels get a
gradient, so their weights grow and they are kept again ("rich get richer",
``docs/approx.md``). :class:`SelectionRecorder` counts, per approximated
layer, how often each input channel is selected, by recomputing the
deterministic selection of a training step on the same batch and weights;
:func:`concentration` summarises the counts (Gini coefficient, normalised
entropy, channels never selected) and the kernel norms of the often and
the rarely selected channels against their initial values.
"""

import keras
import numpy as np
import tensorflow as tf

from blpa.approx import convert

__all__ = ["SelectionRecorder", "gini", "normalized_entropy",
           "concentration"]


def gini(counts):
  """Gini coefficient of non-negative counts (0: even, → 1: one holds all).

  Args:
    counts: 1-D array of non-negative numbers, not all zero.

  Returns:
    A float in [0, 1).
  """
  x = np.sort(np.asarray(counts, np.float64))
  if x.ndim != 1 or x.size == 0 or np.any(x < 0) or x.sum() <= 0:
    raise ValueError("gini needs a non-empty 1-D array of non-negative "
                     "counts with a positive sum")
  n = x.size
  ranks = np.arange(1, n + 1)
  return float(2.0 * np.sum(ranks * x) / (n * x.sum()) - (n + 1.0) / n)


def normalized_entropy(counts):
  """Entropy of ``counts / sum(counts)`` divided by ``log(n)`` (1: even).

  Args:
    counts: 1-D array of non-negative numbers, not all zero, n >= 2.

  Returns:
    A float in [0, 1].
  """
  x = np.asarray(counts, np.float64)
  if x.ndim != 1 or x.size < 2 or np.any(x < 0) or x.sum() <= 0:
    raise ValueError("normalized_entropy needs a 1-D array of >= 2 "
                     "non-negative counts with a positive sum")
  p = x[x > 0] / x.sum()
  return float(-np.sum(p * np.log(p)) / np.log(x.size))


def _slice_norms(kernel, axis):
  """Norm of each slice of a kernel array along ``axis``."""
  others = tuple(a for a in range(kernel.ndim) if a != axis)
  return np.sqrt(np.sum(np.square(kernel), axis=others))


class SelectionRecorder:
  """Counts the channels each sampled layer of a model selects.

  Call :meth:`record` with a training batch just before the training step
  on it: it runs the model's forward pass in training mode (BN with batch
  statistics, as the step does) up to each sampled layer, recomputes that
  layer's selection, and restores every non-trainable variable (the BN
  moving statistics), so that training is unaffected.

  Args:
    model: a functional or Sequential Keras model whose sampled layers use
      ``topk`` or ``weight_topk`` in forward or blackbox mode.
  """

  def __init__(self, model):
    self.layers = convert.approximated_layers(model)
    if not self.layers:
      raise ValueError("SelectionRecorder: the model has no sampled layer")
    for layer in self.layers:
      if layer.mode == "backward" or layer.sampler not in ("topk",
                                                           "weight_topk"):
        raise ValueError(
            f"SelectionRecorder needs topk or weight_topk in forward or "
            f"blackbox mode; layer {layer.name} has mode={layer.mode!r}, "
            f"sampler={layer.sampler!r}")
    self.model = model
    self.counts = [np.zeros(l.kernel.shape[l.kernel_in_axis], np.int64)
                   for l in self.layers]
    self.steps = 0
    self.initial_kernels = [l.kernel.numpy() for l in self.layers]
    probe = keras.Model(model.inputs, [l.input for l in self.layers])

    @tf.function
    def selections(x):
      inputs = probe(x, training=True)
      if len(self.layers) == 1:
        inputs = [inputs]
      return [l.selected_indices(a) for l, a in zip(self.layers, inputs)]

    self._selections = selections

  def record(self, x):
    """Adds the selections of a training step on batch x to the counts."""
    state = [v.numpy() for v in self.model.non_trainable_variables]
    try:
      chosen = self._selections(tf.convert_to_tensor(x))
    finally:
      for variable, value in zip(self.model.non_trainable_variables, state):
        variable.assign(value)
    for count, indices in zip(self.counts, chosen):
      count[indices.numpy()] += 1
    self.steps += 1

  def summary(self):
    """:func:`concentration` of the counts so far, per layer and mean."""
    return concentration(self.layers, self.counts, self.steps,
                         self.initial_kernels)


def concentration(layers, counts, steps, initial_kernels):
  """How concentrated the selections are, and what it did to the kernels.

  Args:
    layers: the sampled layers.
    counts: per layer, how often each input channel was selected.
    steps: the number of recorded steps.
    initial_kernels: per layer, the kernel when recording began.

  Returns:
    dict with ``steps``, ``layers`` (per layer: name, n, k, gini, the Gini
    of always picking the same k (``1 − k/n``), normalised entropy and its
    value for the same k always (``log k / log n``), the
    shares never and always selected, the share of all selections that went
    to the k most selected channels, and the mean kernel-slice norm growth
    (now / initial) and relative change (‖now − initial‖ / ‖initial‖) of
    the k most selected and of the other channels) and
    ``mean`` (the per-layer values averaged).
  """
  rows = []
  for layer, count, before in zip(layers, counts, initial_kernels):
    k = layer.num_kept()
    order = np.argsort(-count, kind="stable")
    often, rare = order[:k], order[k:]
    axis = layer.kernel_in_axis
    kernel = layer.kernel.numpy()
    initial = np.maximum(_slice_norms(before, axis), 1e-30)
    growth = _slice_norms(kernel, axis) / initial
    change = _slice_norms(kernel - before, axis) / initial
    rows.append(dict(
        name=layer.name, n=int(count.size), k=int(k), gini=gini(count),
        gini_fixed_set=1.0 - k / count.size,
        entropy=normalized_entropy(count),
        entropy_fixed_set=float(np.log(k) / np.log(count.size)),
        never=float(np.mean(count == 0)),
        always=float(np.mean(count == steps)),
        top_k_share=float(count[often].sum() / count.sum()),
        norm_growth_often=float(np.mean(growth[often])),
        norm_growth_rare=float(np.mean(growth[rare])),
        change_often=float(np.mean(change[often])),
        change_rare=float(np.mean(change[rare]))))
  keys = [key for key in rows[0] if key not in ("name", "n", "k")]
  mean = {key: float(np.mean([r[key] for r in rows])) for key in keys}
  return dict(steps=int(steps), layers=rows, mean=mean)

"""Approximate tensor operations: sampled Dense and Conv2D layers.

Adelman, Levy, Hakimi, Silberstein, *Faster Neural Network Training with
Approximate Tensor Operations*, NeurIPS 2021: each matrix product (or
convolution, a sum over input channels) keeps only k of its n column-row
pairs in training; evaluation is exact. See ``docs/approx.md`` and
the README section "Approximate tensor operations".

- :class:`ApproxDense`, :class:`ApproxConv2D`: drop-in Keras layers.
- :func:`approximate`: a copy of a model with its layers replaced.
- :func:`num_samples`, :func:`sampled_matmul`: building blocks.
- :mod:`blpa.approx.distributed`: compressed all-reduce for ``weight_topk``.
- :mod:`blpa.approx.calibrate`: BN statistics from exact passes, for the
  exact evaluation of a network trained with sampling.
- :mod:`blpa.approx.phases`: train the final steps exactly (the remedy
  for topk's exact-evaluation gap, ``docs/approx.md``).
- :mod:`blpa.approx.selection`: which channels sampling selects ("rich get
  richer").
- :mod:`blpa.approx.macs`: multiply-adds a training step computes.
- ``python -m blpa.approx.experiments``: the experiments beside exact
  training (``bench/results/approx.md``).
"""

from blpa.approx.convert import approximate
from blpa.approx.layers import ApproxConv2D, ApproxDense
from blpa.approx.phases import ExactFinalEpochs
from blpa.approx.sampling import num_samples, sampled_matmul

__all__ = ["ApproxDense", "ApproxConv2D", "approximate", "ExactFinalEpochs",
           "num_samples", "sampled_matmul"]

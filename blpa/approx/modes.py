"""The three ways of sampling a linear op ``y = f(x, w)``: forward, blackbox,
backward.

A :class:`LinearOp` describes a product that is a sum over input features
(Dense: ``x @ w``; Conv2D: a sum over input channels) and over the batch:

- ``forward``: sample input features in the forward pass and let autodiff
  run through the sample (unselected features get exactly zero gradient);
  every product (forward, grad-input, grad-kernel) shrinks by k/n.
- ``blackbox``: the same sampled forward, but the gradients are those of the
  exact op (``tf.custom_gradient``).
- ``backward``: exact forward; grad-input sampled over output features
  (score ``‖w[..., o]‖·‖g[..., o]‖``) and grad-kernel sampled over batch
  examples (score ``‖x[b]‖·‖g[b]‖``), with an unbiased sampler.

Forward sampling copies the kept input channels once and the kept kernel
slices (scaled, if the sampler scales), and runs one product on them; the
gradients of the copies are scattered back to all channels. Copies and
scatters are :func:`blpa.channels.gather_channels` and its gradient: with
``tf.gather`` on the channel axis, whose gradient transposes the whole input
twice around an ``UnsortedSegmentSum``, a sampled WRN-16-4 training step
gains less over the exact step than with the native gather and scatter
(``bench/approx_step.py``; figures in ``bench/results/approx_step.md``). Selecting the channels with a one-hot matmul adds
``C·k`` multiply-adds per position and is not used.

Exact gradients are vector-Jacobian products of ``op.apply`` taken with a
nested ``tf.GradientTape``: the same kernels as autodiff of the exact layer.
Inside ``tf.function`` the unused forward of that tape is pruned.
"""

from typing import Callable, NamedTuple

import tensorflow as tf

from blpa import channels
from blpa.approx import sampling

__all__ = ["MODES", "LinearOp", "forward_sample", "forward_sampled",
           "blackbox", "backward_sampled", "batch_num_samples"]

MODES = ("forward", "backward", "blackbox")


class LinearOp(NamedTuple):
  """A product that is linear in x and in w, summed over input features.

  Attributes:
    apply: ``(x, w) -> y``.
    x_axis: the input-feature axis of x.
    w_in_axis: the input-feature axis of w.
    w_out_axis: the output-feature axis of w.
    y_out_axis: the output-feature axis of y.
  """
  apply: Callable
  x_axis: int
  w_in_axis: int
  w_out_axis: int
  y_out_axis: int


def _scale_along(t, scales, axis):
  """t multiplied by ``scales`` broadcast along ``axis`` (None: t)."""
  if scales is None:
    return t
  shape = [1] * len(t.shape)
  shape[axis] = -1
  return t * tf.reshape(tf.cast(scales, t.dtype), shape)


def _vjp(op, x, w, g, wrt):
  """Gradient of ``<op.apply(x, w), g>`` with respect to x or w."""
  with tf.GradientTape() as tape:
    tape.watch([x, w])
    y = op.apply(x, w)
  return tape.gradient(y, x if wrt == "x" else w, output_gradients=g)


def forward_sample(op, x, w, k, sampler, uniform=None):
  """The input features that forward sampling keeps, and their scales.

  Args:
    op, x, w, k, sampler, uniform: as :func:`forward_sampled`.

  Returns:
    ``(indices, scales)`` as :func:`blpa.approx.sampling.draw` returns them.
  """
  w_norms = sampling.column_norms(w, op.w_in_axis)
  if sampler == "weight_topk":
    scores = w_norms
  else:
    scores = sampling.column_norms(x, op.x_axis) * w_norms
  return sampling.draw(sampler, scores, k, uniform)


def forward_sampled(op, x, w, k, sampler, uniform=None):
  """Forward-mode sampled ``op.apply(x, w)`` over k of the input features.

  Args:
    op: the :class:`LinearOp`.
    x: input tensor.
    w: kernel tensor.
    k: number of input features to keep (< n).
    sampler: one of ``sampling.SAMPLERS``.
    uniform: the draws for a random sampler.

  Returns:
    The estimate of ``op.apply(x, w)``; differentiable through the sample.
  """
  indices, scales = forward_sample(op, x, w, k, sampler, uniform)
  w_kept = _scale_along(
      channels.gather_channels(w, indices, op.w_in_axis), scales,
      op.w_in_axis)
  return op.apply(channels.gather_channels(x, indices, op.x_axis), w_kept)


def blackbox(op, x, w, k, sampler, uniform=None):
  """Sampled forward as in :func:`forward_sampled`, exact gradients."""

  @tf.custom_gradient
  def product(x, w):
    y = forward_sampled(op, x, w, k, sampler, uniform)

    def grad(g):
      return _vjp(op, x, w, g, "x"), _vjp(op, x, w, g, "w")

    return y, grad

  return product(x, w)


def batch_num_samples(batch, sample_ratio, minimal_k):
  """``num_samples`` for a batch size that may be a tensor."""
  if isinstance(batch, int):
    return sampling.num_samples(batch, sample_ratio, minimal_k)
  ratio_k = tf.cast(tf.cast(batch, tf.float32) * sample_ratio, tf.int32)
  return tf.minimum(tf.maximum(ratio_k, minimal_k), batch)


def _sampled_grad_x(op, x, w, g, k_out, sampler, uniform):
  """Grad-input, sampled over output features (k_out < n_out)."""
  scores = (sampling.column_norms(w, op.w_out_axis) *
            sampling.column_norms(g, op.y_out_axis))
  indices, scales = sampling.draw(sampler, scores, k_out, uniform)
  w_kept = _scale_along(tf.gather(w, indices, axis=op.w_out_axis), scales,
                        op.w_out_axis)
  g_kept = tf.gather(g, indices, axis=op.y_out_axis)
  return _vjp(op, x, w_kept, g_kept, "x")


def _sampled_grad_w(op, x, w, g, k_batch, sampler, uniform):
  """Grad-kernel, sampled over batch examples (axis 0 of x and g)."""
  scores = sampling.column_norms(x, 0) * sampling.column_norms(g, 0)
  indices, scales = sampling.draw(sampler, scores, k_batch, uniform)
  g_kept = _scale_along(tf.gather(g, indices, axis=0), scales, 0)
  return _vjp(op, tf.gather(x, indices, axis=0), w, g_kept, "w")


def backward_sampled(op, x, w, k_out, k_batch, sampler, uniforms):
  """Exact forward ``op.apply(x, w)`` with sampled backward products.

  Args:
    op: the :class:`LinearOp`.
    x: input tensor (batch on axis 0).
    w: kernel tensor.
    k_out: output features kept for grad-input (int; n_out means exact).
    k_batch: examples kept for grad-kernel (int or scalar tensor).
    sampler: ``'crs'`` or ``'bernoulli'``.
    uniforms: ``(uniform_out, uniform_batch)`` draws for the two samples.

  Returns:
    ``op.apply(x, w)``, whose gradients are unbiased sampled estimates.
  """
  n_out = w.shape[op.w_out_axis]
  batch = tf.shape(x)[0]

  @tf.custom_gradient
  def product(x, w):
    y = op.apply(x, w)

    def grad(g):
      if k_out >= n_out:
        grad_x = _vjp(op, x, w, g, "x")
      else:
        grad_x = _sampled_grad_x(op, x, w, g, k_out, sampler, uniforms[0])
      grad_w = tf.cond(
          k_batch < batch,
          lambda: _sampled_grad_w(op, x, w, g, k_batch, sampler, uniforms[1]),
          lambda: _vjp(op, x, w, g, "w"))
      return grad_x, grad_w

    return y, grad

  return product(x, w)

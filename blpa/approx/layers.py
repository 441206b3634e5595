"""Keras Dense and Conv2D layers that sample column-row pairs in training.

:class:`ApproxDense` and :class:`ApproxConv2D` subclass ``keras.layers.Dense``
and ``keras.layers.Conv2D``: same constructor arguments, same weights, plus

- ``sample_ratio`` (default 1.0) and ``minimal_k`` (default 1): the layer
  keeps ``k = min(max(int(n * sample_ratio), minimal_k), n)`` of its n input
  features (Dense) or input channels (Conv2D);
- ``mode``: ``'forward'``, ``'backward'`` or ``'blackbox'``
  (:mod:`blpa.approx.modes`);
- ``sampler``: ``'topk'``, ``'crs'``, ``'bernoulli'`` or ``'weight_topk'``
  (:mod:`blpa.approx.sampling`);
- ``seed``: seed of the layer's draws (random samplers only).

The layer computes exactly (the parent's ``call``, bit for bit) when
``training`` is false or ``k == n``. A new sample is drawn at every training
call. Eager training works, but run the step in ``tf.function`` (as ``fit``
does) for the speed-up.
"""

import math

import keras
import tensorflow as tf

from blpa.approx import modes as modes_lib
from blpa.approx import sampling

__all__ = ["ApproxDense", "ApproxConv2D", "APPROX_LAYERS"]


class _ApproxMixin:
  """Sampling settings, their checks and the per-call choice of path."""

  def _init_approx(self, sample_ratio, minimal_k, mode, sampler, seed):
    """Checks and stores the sampling arguments."""
    sampling.check_ratio(sample_ratio, minimal_k)
    sampling.check_sampler(sampler)
    if mode not in modes_lib.MODES:
      raise ValueError(f"{self.__class__.__name__}: mode must be one of "
                       f"{modes_lib.MODES}, got {mode!r}")
    if mode == "backward" and sampler not in sampling.UNBIASED_SAMPLERS:
      raise ValueError(
          f"{self.__class__.__name__}: mode='backward' needs an unbiased "
          f"sampler {sampling.UNBIASED_SAMPLERS}, got sampler={sampler!r} "
          "(a biased gradient estimate does not converge)")
    if seed is not None and (isinstance(seed, bool) or
                             not isinstance(seed, int)):
      raise ValueError(f"seed must be None or an int, got {seed!r}")
    self.sample_ratio = float(sample_ratio)
    self.minimal_k = int(minimal_k)
    self.mode = mode
    self.sampler = sampler
    self.seed = seed
    self._seed_generator = None
    if sampler in sampling.RANDOM_SAMPLERS:
      self._seed_generator = keras.random.SeedGenerator(seed)

  def _approx_config(self, config):
    """config with the sampling arguments added."""
    config.update(sample_ratio=self.sample_ratio, minimal_k=self.minimal_k,
                  mode=self.mode, sampler=self.sampler, seed=self.seed)
    return config

  def num_kept(self):
    """k, the number of input features/channels a training call keeps."""
    return sampling.num_samples(self.kernel.shape[self.kernel_in_axis],
                                self.sample_ratio, self.minimal_k)

  def _samples(self, training, inputs):
    """Whether this call samples: training, and some k below its n.

    Forward and blackbox modes sample k of the n input features; backward
    mode k of the output features and k of the batch examples (an unknown
    batch size counts as sampled; the step then checks it).
    """
    if isinstance(training, tf.Tensor):
      training = tf.get_static_value(training)
    if not training:
      return False
    if self.mode != "backward":
      return self.num_kept() < self.kernel.shape[self.kernel_in_axis]
    n_out = self.kernel.shape[-1]
    batch = inputs.shape[:-1] if self.kernel_in_axis == 0 else \
        inputs.shape[:1]
    batch = None if None in batch else math.prod(batch)
    return (sampling.num_samples(n_out, self.sample_ratio, self.minimal_k) <
            n_out or batch is None or
            sampling.num_samples(batch, self.sample_ratio, self.minimal_k) <
            batch)

  def selected_indices(self, inputs):
    """Indices of the input features/channels a training call would keep.

    For the deterministic samplers (``topk``, ``weight_topk``) in forward or
    blackbox mode: the same selection as a training call on the same inputs
    with the same weights (``inputs`` as the layer receives them).

    Args:
      inputs: the layer's input tensor.

    Returns:
      A sorted int32 vector of k indices (all n when k == n).
    """
    if self.mode == "backward" or self.sampler in sampling.RANDOM_SAMPLERS:
      raise ValueError(
          f"{self.name}: selected_indices needs a deterministic sampler in "
          f"forward or blackbox mode, got mode={self.mode!r}, "
          f"sampler={self.sampler!r}")
    n = self.kernel.shape[self.kernel_in_axis]
    if self.num_kept() >= n:
      return tf.range(n, dtype=tf.int32)
    x = tf.reshape(inputs, [-1, n]) if self.kernel_in_axis == 0 else inputs
    op = modes_lib.LinearOp(None, x_axis=len(x.shape) - 1,
                            w_in_axis=self.kernel_in_axis,
                            w_out_axis=len(self.kernel.shape) - 1,
                            y_out_axis=len(x.shape) - 1)
    indices, _ = modes_lib.forward_sample(
        op, x, tf.convert_to_tensor(self.kernel), self.num_kept(),
        self.sampler)
    return indices

  def _uniform(self, n, k):
    """Uniform draws for a sample of k out of n (None: deterministic)."""
    shape = sampling.uniform_shape(self.sampler, n, k)
    if shape is None:
      return None
    return keras.random.uniform(shape, seed=self._seed_generator)

  def _bias_activation(self, y):
    """y plus the bias (if any), through the activation (if any)."""
    if self.bias is not None:
      y = y + self.bias
    if self.activation is not None:
      y = self.activation(y)
    return y

  def _product(self, op, x, w):
    """The sampled product ``op.apply(x, w)`` in this layer's mode."""
    if self.mode == "backward":
      n_out = w.shape[op.w_out_axis]
      k_out = sampling.num_samples(n_out, self.sample_ratio, self.minimal_k)
      batch = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
      k_batch = modes_lib.batch_num_samples(batch, self.sample_ratio,
                                            self.minimal_k)
      uniforms = (self._uniform(n_out, k_out), self._uniform(batch, k_batch))
      return modes_lib.backward_sampled(op, x, w, k_out, k_batch,
                                        self.sampler, uniforms)
    n = w.shape[op.w_in_axis]
    k = self.num_kept()
    run = (modes_lib.forward_sampled if self.mode == "forward" else
           modes_lib.blackbox)
    return run(op, x, w, k, self.sampler, self._uniform(n, k))


@keras.saving.register_keras_serializable(package="blpa")
class ApproxDense(_ApproxMixin, keras.layers.Dense):
  """``keras.layers.Dense`` that samples its input features in training.

  Args:
    units: as ``keras.layers.Dense``.
    sample_ratio: fraction of input features kept in training, in (0, 1].
    minimal_k: keep at least this many features.
    mode: ``'forward'``, ``'backward'`` or ``'blackbox'``.
    sampler: ``'topk'``, ``'crs'``, ``'bernoulli'`` or ``'weight_topk'``.
    seed: seed of the draws of a random sampler.
    **kwargs: the other arguments of ``keras.layers.Dense``.

  Attributes:
    kernel_in_axis: the kernel axis of the input features (0).
  """

  kernel_in_axis = 0

  def __init__(self, units, sample_ratio=1.0, minimal_k=1, mode="forward",
               sampler="topk", seed=None, **kwargs):
    super().__init__(units, **kwargs)
    self._init_approx(sample_ratio, minimal_k, mode, sampler, seed)

  def call(self, inputs, training=None):
    if not self._samples(training, inputs) or \
        self.quantization_mode is not None:
      return super().call(inputs, training=training)
    d_in = self.kernel.shape[0]
    x = tf.reshape(inputs, [-1, d_in])
    op = modes_lib.LinearOp(tf.matmul, x_axis=1, w_in_axis=0, w_out_axis=1,
                            y_out_axis=1)
    y = self._product(op, x, tf.convert_to_tensor(self.kernel))
    y = tf.reshape(y, tf.concat([tf.shape(inputs)[:-1], [self.units]], 0))
    return self._bias_activation(y)

  def get_config(self):
    return self._approx_config(super().get_config())


@keras.saving.register_keras_serializable(package="blpa")
class ApproxConv2D(_ApproxMixin, keras.layers.Conv2D):
  """``keras.layers.Conv2D`` that samples its input channels in training.

  Sampling needs ``groups=1`` and ``data_format='channels_last'``; other
  settings are accepted only with ``sample_ratio=1``.

  Args:
    filters: as ``keras.layers.Conv2D``.
    kernel_size: as ``keras.layers.Conv2D``.
    sample_ratio, minimal_k, mode, sampler, seed: as :class:`ApproxDense`,
      over input channels.
    **kwargs: the other arguments of ``keras.layers.Conv2D``.

  Attributes:
    kernel_in_axis: the kernel axis of the input channels (2, HWIO).
  """

  kernel_in_axis = 2

  def __init__(self, filters, kernel_size, sample_ratio=1.0, minimal_k=1,
               mode="forward", sampler="topk", seed=None, **kwargs):
    super().__init__(filters, kernel_size, **kwargs)
    self._init_approx(sample_ratio, minimal_k, mode, sampler, seed)
    if self.sample_ratio < 1.0 and self.groups != 1:
      raise ValueError(f"ApproxConv2D samples only with groups=1, got "
                       f"groups={self.groups}")
    if self.sample_ratio < 1.0 and self.data_format != "channels_last":
      raise ValueError("ApproxConv2D samples only with data_format="
                       f"'channels_last', got {self.data_format!r}")

  def call(self, inputs, training=None):
    if not self._samples(training, inputs):
      return super().call(inputs)
    op = modes_lib.LinearOp(self.convolution_op, x_axis=3, w_in_axis=2,
                            w_out_axis=3, y_out_axis=3)
    return self._bias_activation(
        self._product(op, inputs, tf.convert_to_tensor(self.kernel)))

  def get_config(self):
    return self._approx_config(super().get_config())


APPROX_LAYERS = (ApproxDense, ApproxConv2D)

"""Keras layers with fixed-point weights and activations (ADaPTION's LP layers).

:class:`FixedPointConv2D` and :class:`FixedPointDense` keep float master
weights; at every call (training and inference) the kernel, and the bias if
``bias_format`` is given, are rounded to their Q(bd.ad) format and used in
place of the float ones. The rounded copy is never stored. The layer's
output is not rounded (put a :class:`FixedPointActivation` after it).

Backward, straight through: the kernel and bias gradients land on the float
masters and equal the float layer's gradients at the rounded weights (for a
convolution or matmul the kernel gradient does not depend on the kernel).
The input gradient uses the float kernel (``input_grad='float'``, the
reference's behaviour) or the rounded one (``input_grad='rounded'``). No
weight clipping, no gradient quantization. With stochastic rounding the
bias is drawn once per call (per batch), not per image as in the reference.
"""

import keras
import tensorflow as tf
from keras import ops

from blpa.fixedpoint import rounding as rounding_lib

__all__ = ["FixedPointConv2D", "FixedPointDense", "FixedPointActivation"]

INPUT_GRADS = ("float", "rounded")


def _format(value, name, allow_none=False):
  if value is None and allow_none:
    return None
  try:
    bd, ad = value
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a pair (bd, ad), got {value!r}") from None
  return rounding_lib.check_format(bd, ad)


def _check_choice(value, choices, name):
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")
  return value


def _linear_fixed_kernel(op, x, kernel, kernel_fixed, input_grad):
  """``op(x, kernel_fixed)`` with the gradients of FIXEDPOINT.md.

  ``op`` is bilinear (matmul, convolution), so its kernel gradient does not
  depend on the kernel and its input gradient not on the input: the tape of
  ``op(x, kernel)`` gives dW (= the gradient at the rounded kernel) and dx
  at the float kernel.

  Args:
    op: ``op(x, kernel) -> y``.
    x: input tensor.
    kernel: float kernel tensor.
    kernel_fixed: ``kernel -> rounded kernel`` (straight-through gradient).
    input_grad: ``'float'`` or ``'rounded'`` (dx with that kernel).

  Returns:
    ``y``.
  """
  if input_grad == "rounded":
    return op(x, kernel_fixed(kernel))

  @tf.custom_gradient
  def run(x, kernel):
    y = op(x, kernel_fixed(kernel))

    def grad(dy):
      with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y_float = op(x, kernel)
      return tape.gradient(y_float, [x, kernel], output_gradients=dy)

    return y, grad

  return run(x, kernel)


def _seed_generator(rounding, seed):
  """Keras seed state for stochastic rounding (None for deterministic)."""
  return keras.random.SeedGenerator(seed) if rounding == "stochastic" else None


def _draw_seed(generator):
  """A new int64 seed per call from ``generator`` (None: no generator)."""
  if generator is None:
    return None
  return tf.cast(keras.random.randint((), 0, 2**31 - 1, seed=generator),
                 tf.int64)


class _FixedPointWeights:
  """Rounding of a layer's kernel and bias (mixin of the two layers)."""

  def _init_fixed(self, weight_format, bias_format, rounding, input_grad,
                  seed):
    self.weight_format = _format(weight_format, "weight_format")
    self.bias_format = _format(bias_format, "bias_format", allow_none=True)
    self.rounding = _check_choice(rounding, rounding_lib.ROUNDINGS, "rounding")
    self.input_grad = _check_choice(input_grad, INPUT_GRADS, "input_grad")
    self.seed = seed
    self._seeds = _seed_generator(rounding, seed)

  def _output(self, op, inputs, bias_shape):
    """``op(inputs, round(kernel)) + bias`` and the layer's activation."""
    seed = _draw_seed(self._seeds)
    kernel = tf.convert_to_tensor(self.kernel)

    def kernel_fixed(w):
      return rounding_lib.round_fixed(w, *self.weight_format, self.rounding,
                                      seed)

    y = _linear_fixed_kernel(op, inputs, kernel, kernel_fixed,
                             self.input_grad)
    if self.use_bias:
      bias = tf.convert_to_tensor(self.bias)
      if self.bias_format is not None:
        bias = rounding_lib.round_fixed(bias, *self.bias_format,
                                        self.rounding,
                                        None if seed is None else seed + 1)
      y = y + tf.reshape(bias, bias_shape)
    return self.activation(y) if self.activation is not None else y

  def rounded_kernel(self):
    """The rounded kernel the forward pass uses (stochastic: a new draw)."""
    return rounding_lib.round_fixed(self.kernel, *self.weight_format,
                                    self.rounding, _draw_seed(self._seeds))

  def _fixed_config(self):
    return {"weight_format": list(self.weight_format),
            "bias_format": (None if self.bias_format is None else
                            list(self.bias_format)),
            "rounding": self.rounding, "input_grad": self.input_grad,
            "seed": self.seed}


@keras.saving.register_keras_serializable(package="blpa.fixedpoint")
class FixedPointDense(_FixedPointWeights, keras.layers.Dense):
  """``keras.layers.Dense`` with a fixed-point kernel (and optional bias).

  Args:
    units: as Dense.
    weight_format: ``(bd, ad)`` of the kernel.
    bias_format: None (float bias) or ``(bd, ad)``.
    rounding: ``'deterministic'`` or ``'stochastic'`` (a fresh draw per
      call; ``seed`` seeds the sequence of draws).
    input_grad: ``'float'`` (dx with the float kernel, as the reference) or
      ``'rounded'``.
    seed: int or None, stochastic rounding only.
    **kwargs: the other arguments of ``keras.layers.Dense``.
  """

  def __init__(self, units, weight_format, bias_format=None,
               rounding="deterministic", input_grad="float", seed=None,
               **kwargs):
    super().__init__(units, **kwargs)
    self._init_fixed(weight_format, bias_format, rounding, input_grad, seed)

  def call(self, inputs, training=None):
    del training
    return self._output(ops.matmul, inputs, [self.units])

  def get_config(self):
    return {**super().get_config(), **self._fixed_config()}


@keras.saving.register_keras_serializable(package="blpa.fixedpoint")
class FixedPointConv2D(_FixedPointWeights, keras.layers.Conv2D):
  """``keras.layers.Conv2D`` with a fixed-point kernel (and optional bias).

  Args:
    filters: as Conv2D.
    kernel_size: as Conv2D.
    weight_format: ``(bd, ad)`` of the kernel.
    bias_format: None (float bias) or ``(bd, ad)``.
    rounding: ``'deterministic'`` or ``'stochastic'``.
    input_grad: ``'float'`` (reference) or ``'rounded'``.
    seed: int or None, stochastic rounding only.
    **kwargs: the other arguments of ``keras.layers.Conv2D``.
  """

  def __init__(self, filters, kernel_size, weight_format, bias_format=None,
               rounding="deterministic", input_grad="float", seed=None,
               **kwargs):
    super().__init__(filters, kernel_size, **kwargs)
    self._init_fixed(weight_format, bias_format, rounding, input_grad, seed)

  def call(self, inputs, training=None):
    del training
    if self.data_format == "channels_last":
      bias_shape = [1, 1, 1, self.filters]
    else:
      bias_shape = [1, self.filters, 1, 1]
    return self._output(self.convolution_op, inputs, bias_shape)

  def get_config(self):
    return {**super().get_config(), **self._fixed_config()}


@keras.saving.register_keras_serializable(package="blpa.fixedpoint")
class FixedPointActivation(keras.layers.Layer):
  """Rounds its input to Q(bd.ad); the gradient passes through unchanged.

  Args:
    bd: bits before the binary point, sign included.
    ad: bits after the binary point.
    rounding: ``'deterministic'`` or ``'stochastic'`` (a fresh draw per
      call; ``seed`` seeds the sequence of draws).
    seed: int or None.
    **kwargs: ``keras.layers.Layer`` arguments (name, ...).
  """

  def __init__(self, bd, ad, rounding="deterministic", seed=None, **kwargs):
    super().__init__(**kwargs)
    self.bd, self.ad = rounding_lib.check_format(bd, ad)
    self.rounding = _check_choice(rounding, rounding_lib.ROUNDINGS, "rounding")
    self.seed = seed
    self._seeds = _seed_generator(rounding, seed)

  def call(self, inputs, training=None):
    del training
    return rounding_lib.round_fixed(inputs, self.bd, self.ad, self.rounding,
                                    _draw_seed(self._seeds))

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "bd": self.bd, "ad": self.ad,
            "rounding": self.rounding, "seed": self.seed}

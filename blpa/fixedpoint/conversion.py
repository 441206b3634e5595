"""Formats for a trained float network and its fixed-point twin.

From one batch through the float network (FIXEDPOINT.md):

* weights of each conv/dense layer: ``bd = 1 + max(0, ceil(log2(max|W|)))``,
  ``ad = bits - bd`` (the reference used the signed maximum and measured the
  biases instead of the weights; here ``max|W|`` of the kernel);
* activations, the pre-ReLU output (conv/dense + bias) of every conv/dense
  layer but the last: the smallest ``m >= 0`` such that the share of
  ``|values| > 2^m`` is at most ``threshold``; ``bd = m + 1``,
  ``ad = bits - bd``. Measured on the inputs the converted net is fed and
  before any ReLU (the reference measured after an in-place ReLU, on inputs
  255x larger; and its loop stepped one bit too far, which is not offered).

``bd`` is capped at ``bits`` (then ``ad = 0``). :func:`convert` builds the
twin: each conv/dense becomes a fixed-point layer with the float weights
copied, followed (all but the last) by a :class:`FixedPointActivation` and
then its own activation function; the input and the logits stay float.
"""

import math

import keras
import numpy as np

from blpa.fixedpoint import layers as fixed_layers
from blpa.fixedpoint import rounding as rounding_lib

__all__ = ["propose_formats", "convert", "activation_sparsity",
           "weight_format", "activation_format"]

_FLOAT_TYPES = {keras.layers.Conv2D: fixed_layers.FixedPointConv2D,
                keras.layers.Dense: fixed_layers.FixedPointDense}
_FOLLOWERS = (fixed_layers.FixedPointActivation, keras.layers.Activation,
              keras.layers.ReLU)


def _check_bits(bits):
  if (isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or
      not 1 <= bits <= rounding_lib.MAX_WORD_BITS):
    raise ValueError(f"bits must be an int in [1, {rounding_lib.MAX_WORD_BITS}]"
                     f", got {bits!r}")
  return int(bits)


def weight_format(max_abs, bits=16):
  """``(bd, ad)`` for weights whose largest magnitude is ``max_abs``.

  Args:
    max_abs: ``max|W|`` (float >= 0).
    bits: word length.

  Returns:
    ``(bd, ad)`` with ``bd = min(bits, 1 + max(0, ceil(log2(max_abs))))``.
  """
  bits = _check_bits(bits)
  whole = math.ceil(math.log2(max_abs)) if max_abs > 0 else 0
  bd = min(bits, 1 + max(0, whole))
  return bd, bits - bd


def activation_format(values, bits=16, threshold=0.01):
  """``(bd, ad)`` for activations by the saturation-share rule.

  Args:
    values: array of (pre-ReLU) activation values.
    bits: word length.
    threshold: largest share of ``|values| > 2^m`` allowed.

  Returns:
    ``(m + 1, bits - m - 1)`` for the smallest ``m >= 0`` with
    ``mean(|values| > 2^m) <= threshold`` (``m <= bits - 1``).
  """
  bits = _check_bits(bits)
  if not 0 <= threshold < 1:
    raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
  mags = np.abs(np.asarray(values, np.float64)).ravel()
  for m in range(bits):
    if mags.size == 0 or np.mean(mags > 2.0**m) <= threshold:
      return m + 1, bits - m - 1
  return bits, 0


def _is_linear(layer):
  return isinstance(layer, tuple(_FLOAT_TYPES))


def _pre_activation(layer, inputs):
  """conv/dense + bias of ``inputs``, before the layer's activation."""
  if isinstance(layer, keras.layers.Conv2D):
    y = layer.convolution_op(inputs, layer.kernel)
  else:
    y = keras.ops.matmul(inputs, layer.kernel)
  if layer.use_bias:
    y = y + layer.bias
  return np.asarray(y)


def _layer_inputs(model, x):
  """``[(layer, its input)]`` for the conv/dense layers of ``model``."""
  linear = [l for l in model.layers if _is_linear(l)]
  if isinstance(model, keras.Sequential):
    out, h = [], x
    for layer in model.layers:
      if _is_linear(layer):
        out.append((layer, h))
      h = layer(h)
    return out
  inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
  probe = keras.Model(inputs, [l.input for l in linear])
  values = probe(x)
  return list(zip(linear, values if len(linear) > 1 else [values]))


def _output_layers(model):
  if isinstance(model, keras.Sequential):
    return {[l for l in model.layers if _is_linear(l)][-1].name}
  return {t._keras_history[0].name for t in model.outputs}  # pylint: disable=protected-access


def propose_formats(model, x, bits=16, threshold=0.01):
  """Per-layer weight and activation formats for a trained float model.

  Args:
    model: a Keras model with Conv2D / Dense layers (Sequential or
      functional).
    x: one batch of the inputs the converted net will be fed.
    bits: word length of every format.
    threshold: activation rule: largest share of saturated values.

  Returns:
    ``{layer name: {'weight': (bd, ad), 'activation': (bd, ad) or None,
    'weight_max': max|W|, 'activation_saturated': share of |values| above
    MAXVAL}}`` for each conv/dense layer; ``activation`` is None for the
    layers whose output is the model's output (the logits stay float).
  """
  bits = _check_bits(bits)
  outputs = _output_layers(model)
  formats = {}
  for layer, inputs in _layer_inputs(model, np.asarray(x, np.float32)):
    w_max = float(np.max(np.abs(np.asarray(layer.kernel))))
    entry = {"weight": weight_format(w_max, bits), "weight_max": w_max,
             "activation": None, "activation_saturated": None}
    if layer.name not in outputs:
      pre = _pre_activation(layer, inputs)
      fmt = activation_format(pre, bits, threshold)
      entry["activation"] = fmt
      entry["activation_saturated"] = float(
          np.mean(np.abs(pre) > rounding_lib.max_value(*fmt)))
    formats[layer.name] = entry
  return formats


def _fixed_layers(layer, fmt, rounding, input_grad, seed):
  """The fixed-point replacement of one conv/dense layer (a list)."""
  config = layer.get_config()
  activation = config.pop("activation")
  fixed_type = next(f for t, f in _FLOAT_TYPES.items() if isinstance(layer, t))
  out = [fixed_type(**config, activation=None, weight_format=fmt["weight"],
                    bias_format=fmt.get("bias"), rounding=rounding,
                    input_grad=input_grad, seed=seed)]
  if fmt.get("activation") is not None:
    out.append(fixed_layers.FixedPointActivation(
        *fmt["activation"], rounding=rounding, seed=seed,
        name=layer.name + "_fixed"))
  if keras.activations.get(activation) is not keras.activations.linear:
    out.append(keras.layers.Activation(activation, name=layer.name + "_act"))
  return out


def convert(model, formats, rounding="deterministic", input_grad="float",
            seed=None):
  """The fixed-point twin of a Sequential float model.

  Args:
    model: a built ``keras.Sequential`` (Conv2D / Dense layers, any others).
    formats: ``{layer name: {'weight': (bd, ad), 'activation': (bd, ad) or
      None, 'bias': optional (bd, ad)}}``, e.g. from :func:`propose_formats`;
      every conv/dense layer needs an entry.
    rounding: ``'deterministic'`` or ``'stochastic'`` for every layer.
    input_grad: ``'float'`` or ``'rounded'`` (see :mod:`.layers`).
    seed: int or None, for stochastic rounding.

  Returns:
    A new ``keras.Sequential`` (uncompiled) with the float weights copied.

  Raises:
    ValueError: not a built Sequential model, or a layer without a format.
  """
  if not isinstance(model, keras.Sequential) or not model.built:
    raise ValueError("convert needs a built keras.Sequential model, got "
                     f"{type(model).__name__}")
  missing = [l.name for l in model.layers
             if _is_linear(l) and l.name not in formats]
  if missing:
    raise ValueError(f"formats has no entry for the layers {missing}")
  new_layers, copies = [], []
  for layer in model.layers:
    if _is_linear(layer):
      block = _fixed_layers(layer, formats[layer.name], rounding, input_grad,
                            seed)
      copies.append((layer, block[0], True))
      new_layers += block
    else:
      clone = type(layer).from_config(layer.get_config())
      copies.append((layer, clone, False))
      new_layers.append(clone)
  twin = keras.Sequential([keras.Input(model.input_shape[1:])] + new_layers,
                          name=model.name + "_fixed")
  for src, dst, linear in copies:
    if linear:
      dst.kernel.assign(src.kernel)
      if src.use_bias:
        dst.bias.assign(src.bias)
    else:
      dst.set_weights(src.get_weights())
  return twin


def _activation_owners(model):
  """``[(layer, name of the conv/dense whose activation it outputs)]``."""
  owners, owner = [], None
  linear = [l for l in model.layers if _is_linear(l)]
  last = linear[-1].name if linear else None
  for layer in model.layers:
    if _is_linear(layer):
      owner = layer.name if layer.name != last else None
    elif not isinstance(layer, _FOLLOWERS):
      owner = None
    owners.append((layer, owner))
  return owners


def activation_sparsity(model, x, batch=256):
  """Share of exact zeros in each conv/dense layer's activation.

  The activation of a conv/dense layer (all but the last) is the output of
  the chain layer → [FixedPointActivation] → [Activation/ReLU] that follows
  it in a Sequential model: the ReLU output, rounded before the ReLU in a
  fixed-point twin.

  Args:
    model: a Sequential model (float or converted).
    x: inputs.
    batch: batch size for the forward passes.

  Returns:
    ``{layer name: share of zeros}``.
  """
  owners = _activation_owners(model)
  zeros, counts = {}, {}
  for start in range(0, len(x), batch):
    h = np.asarray(x[start:start + batch], np.float32)
    values = {}
    for layer, owner in owners:
      h = layer(h)
      if owner is not None:
        values[owner] = h
    for name, v in values.items():
      v = np.asarray(v)
      zeros[name] = zeros.get(name, 0) + int(np.sum(v == 0))
      counts[name] = counts.get(name, 0) + v.size
  return {name: zeros[name] / counts[name] for name in zeros}

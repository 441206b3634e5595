"""``approximate(model, ...)``: a copy of a Keras model with sampled layers."""

import keras

from blpa.approx import layers as layers_lib

__all__ = ["approximate", "approximated_layers"]

_REPLACEMENTS = {
    keras.layers.Dense: layers_lib.ApproxDense,
    keras.layers.Conv2D: layers_lib.ApproxConv2D,
}


def _default_skip(model):
  """Names of the layer that reads the input features and of the classifier.

  The first is the first Conv2D, or the first Dense in a model without one
  (an MLP: sampling its input features discards what no later layer can
  recover, docs/approx.md); the classifier is the last Dense.
  """
  convs = [l.name for l in model.layers if type(l) is keras.layers.Conv2D]
  denses = [l.name for l in model.layers if type(l) is keras.layers.Dense]
  return set(convs[:1] or denses[:1]) | set(denses[-1:])


def _skip_names(model, skip):
  """The set of layer names kept exact."""
  if isinstance(skip, str):
    if skip != "ends":
      raise ValueError(f"skip must be 'ends', None or a collection of layer "
                       f"names, got {skip!r}")
    return _default_skip(model)
  names = set(skip or ())
  unknown = names - {l.name for l in model.layers}
  if unknown:
    raise ValueError(f"skip names layers that the model does not have: "
                     f"{sorted(unknown)}")
  return names


def _samplable(layer):
  """Whether an approximate layer can replace this one."""
  if type(layer) not in _REPLACEMENTS:
    return False
  if isinstance(layer, keras.layers.Conv2D):
    return layer.groups == 1 and layer.data_format == "channels_last"
  return True


def approximate(model, sample_ratio, minimal_k=1, mode="forward",
                sampler="topk", skip="ends", seed=None):
  """A copy of a Keras model with Dense/Conv2D replaced by sampled layers.

  Args:
    model: a Sequential or functional ``keras.Model``.
    sample_ratio: the layers' sample ratio, in (0, 1].
    minimal_k: the layers' minimal number of kept features.
    mode: ``'forward'``, ``'backward'`` or ``'blackbox'``.
    sampler: ``'topk'``, ``'crs'``, ``'bernoulli'`` or ``'weight_topk'``.
    skip: ``'ends'`` (default) keeps the first Conv2D (in a model without
      one, the first Dense) and the last Dense layer exact, as in the
      paper's ImageNet runs; a collection of layer
      names keeps those exact; None or ``()`` replaces every layer.
    seed: base seed of the random samplers (layer i uses ``seed + i``).

  Returns:
    A new model with the same weights (copied). Grouped or channels-first
    convolutions stay exact.
  """
  if not isinstance(model, keras.Model):
    raise ValueError("approximate needs a Sequential or functional Keras "
                     f"model, got {type(model).__name__}")
  exact = _skip_names(model, skip)
  counter = iter(range(len(model.layers)))

  def clone(layer):
    config = layer.get_config()
    if layer.name in exact or not _samplable(layer):
      return layer.__class__.from_config(config)
    index = next(counter)
    config.update(sample_ratio=sample_ratio, minimal_k=minimal_k, mode=mode,
                  sampler=sampler,
                  seed=None if seed is None else seed + index)
    return _REPLACEMENTS[type(layer)].from_config(config)

  try:
    copy = keras.models.clone_model(model, clone_function=clone)
  except ValueError as err:
    raise ValueError(f"approximate could not copy the model: {err}") from err
  copy.set_weights(model.get_weights())
  return copy


def approximated_layers(model):
  """The sampled layers of a model (``sample_ratio < 1``), in order."""
  return [l for l in model.layers
          if isinstance(l, layers_lib.APPROX_LAYERS) and l.sample_ratio < 1]

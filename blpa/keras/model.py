"""``compress(model, bits)``: a Keras model that keeps compact activations.

For a functional or Sequential model, the returned model runs the original
model's graph node by node with the same layer objects (so it shares every
variable), each node through the wrapper that :mod:`blpa.keras.plan` chose
for it (:mod:`blpa.keras.wrappers`). Compact copies are made once per tensor
and shared by every layer that needs that tensor in its backward pass.

For a subclassed model, and for the custom layers (with sublayers) of a
functional model, the leaf layers get their wrappers while the compressed
model runs (:mod:`blpa.keras.leaves`); the model's own ``call`` runs as
written.
"""

import warnings

import keras
import tensorflow as tf
from keras.src import tree

from blpa.keras import activations as activations_lib, attention, codecs, \
    leaves as leaves_lib, norm as norm_lib, plan as plan_lib, wrappers

BITS = (0, 4, 8)


class _Run:
  """Values and compact copies of one pass through one functional graph.

  Args:
    bits: bits of the compact copies.
    exact_ids: ids of KerasTensors kept exactly (the model's own inputs,
      which the caller holds anyway).
    parent: ``(run, {id(inner_input): outer_keras_tensor})`` for a nested
      model, else None.
  """

  def __init__(self, bits, exact_ids=(), parent=None, shapes=None):
    self.bits = bits
    # id(KerasTensor) -> static shape, shared with nested runs (for report).
    self.shapes = parent[0].shapes if parent is not None else shapes
    self.values = {}
    self.copies = {}
    self.exact_ids = set(exact_ids)
    self.parent = parent

  def copy_of(self, kt):
    """The shared compact copy of a KerasTensor's value."""
    key = id(kt)
    if key not in self.copies:
      padded = plan_lib.padding_of(kt)
      if self.parent is not None and key in self.parent[1]:
        self.copies[key] = self.parent[0].copy_of(self.parent[1][key])
      elif padded is not None:
        self.copies[key] = codecs.Padded(self.copy_of(padded[0]), padded[1])
      elif key in self.exact_ids:
        self.copies[key] = codecs.Exact(self.values[key])
      else:
        with tf.name_scope('blpa_copy'):
          self.copies[key] = codecs.make(
              tf.stop_gradient(self.values[key]), self.bits)
    return self.copies[key]


def _training_of(node, training):
  """The call's training flag, else the node's own (as Keras does)."""
  value = training
  if value is None:
    value = node.arguments.kwargs.get('training')
  return bool(value) if isinstance(value, bool) or value is None else value


def _filled(node, values, training):
  args, kwargs = node.arguments.fill_in(values)
  op = node.operation
  if getattr(op, '_call_has_training_arg', False) and training is not None:
    kwargs['training'] = training
  return args, kwargs


def _run_step(step, run, training, plan):
  """Runs one node; returns its flat outputs (or None for 'act_done')."""
  node, op = step.node, step.node.operation
  xs = [run.values[id(t)] for t in node.input_tensors]
  kind = step.kind
  if kind == 'act_done':
    return None
  if kind == 'bn_act':
    act_layer = step.act_node.operation if step.act_node else None
    batch_stats = _training_of(node, training) is True and op.trainable
    out, copy = wrappers.run_bn_act(op, act_layer, step.act, xs[0], run.bits,
                                    batch_stats)
    final = step.act_node.outputs[0] if step.act_node else node.outputs[0]
    run.values[id(final)] = out
    run.copies[id(final)] = copy
    return [out]
  if kind in plan_lib.LINEAR_KINDS:
    codec = run.copy_of(node.input_tensors[0]) if plan_lib.kernels_trained(
        kind, op) else None
    return [wrappers.run_linear(kind, op, xs[0], codec, act=step.act,
                                bits=run.bits)]
  if kind in norm_lib.KINDS:
    out, copy = norm_lib.run_norm(op, kind, xs[0], run.bits)
    run.copies[id(node.outputs[0])] = copy  # its readers share it
    return [out]
  if kind == 'smooth_act':
    return [activations_lib.run_activation(op, xs[0], step.act, run.bits)]
  if kind == 'relu':
    return [wrappers.run_masked(op, xs[0], wrappers.relu_keep(step.act))]
  if kind == 'dropout':
    if _training_of(node, training) is not True or not op.rate:
      return [op(xs[0], training=False)]
    return [wrappers.run_masked(op, xs[0], lambda out: out != 0,
                                1.0 / (1.0 - op.rate), training=True)]
  if kind == 'maxpool_mask':
    return [wrappers.run_max_pool_mask(op, xs[0])]
  if kind == 'gmp':
    return [wrappers.run_global_max_pool(op, xs[0])]
  if kind == 'maxpool_offsets':
    return [wrappers.run_max_pool_offsets(op, xs[0])]
  if kind in plan_lib.SHAPE_KINDS or kind in plan_lib.COPY_POOL_KINDS:
    codec = run.copy_of(node.input_tensors[0]) if \
        kind in plan_lib.COPY_POOL_KINDS else None
    return [wrappers.run_shape_op(kind, op, xs, codec)]
  if kind == 'model':
    return _run_nested(step, run, training, plan)
  if kind == 'mha':
    return tree.flatten(_run_attention(node, run, training))
  if kind == 'softmax':
    return [attention.run_softmax(op, xs[0], run.bits)]
  if kind in ('generic', 'linear_op'):
    return tree.flatten(_run_generic(node, run, training,
                                     zeros=kind == 'linear_op'))
  args, kwargs = _filled(node, run.values, training)
  return tree.flatten(op(*args, **kwargs))


def _run_attention(node, run, training):
  """A MultiHeadAttention node with its analytic backward
  (:func:`blpa.keras.attention.run_attention`); recomputed from copies of
  its inputs when its dropout depends on a training flag that is a tensor."""
  args, kwargs = _filled(node, run.values, training)
  query, value, key, rest = attention.bind(args, kwargs)
  training_flag = rest.get('training')
  if node.operation.dropout > 0 and not isinstance(training_flag,
                                                   (bool, type(None))):
    return _run_generic(node, run, training)
  by_value = {id(run.values[id(kt)]): kt for kt in node.input_tensors}
  return attention.run_attention(
      node.operation, query, value, key, rest,
      lambda t: run.copy_of(by_value[id(t)]), run.bits)


def _run_generic(node, run, training, zeros=False):
  """A node recomputed in backward: from copies of its inputs, or, for an
  op linear in them (``zeros``), from zeros of their shapes."""
  # A tensor passed to several arguments is one input (its gradient is the
  # sum over its uses, which the recompute's tape takes).
  kts = list({id(t): t for t in node.input_tensors}.values())
  if zeros:
    kept = [codecs.Zeros(run.values[id(t)]) for t in kts]
  else:
    kept = [run.copy_of(t) for t in kts]
  op = node.operation
  trainable = list(getattr(op, 'trainable_variables', []))

  def call(values):
    # Only the node's own inputs: holding run.values here would keep every
    # activation of the forward pass alive in eager mode.
    args, kwargs = _filled(node, {id(t): v for t, v in zip(kts, values)},
                           training)
    return op(*args, **kwargs)

  xs = [run.values[id(t)] for t in kts]
  return wrappers.run_generic(call, xs, kept, trainable,
                              wrappers.seed_states(op))


def _run_nested(step, run, training, plan):
  inner = plan_lib.functional_of(step.node.operation)
  links = {id(i): o for i, o in zip(inner.inputs, step.node.input_tensors)}
  sub = _Run(run.bits, parent=(run, links))
  values = [run.values[id(t)] for t in step.node.input_tensors]
  return run_graph(inner, values, sub, training, plan)


def run_graph(functional, inputs, run, training, plan):
  """Runs a functional graph with the plan's wrappers.

  Args:
    functional: the functional model.
    inputs: flat list of input tensors.
    run: the :class:`_Run` holding values and copies.
    training: the training flag (Python bool or None).
    plan: the dict of :func:`blpa.keras.plan.make_plan`.

  Returns:
    Flat list of the model's outputs.
  """
  for kt, value in zip(functional.inputs, inputs):
    run.values[id(kt)] = value
    if run.shapes is not None:
      run.shapes[id(kt)] = value.shape
  for depth in sorted(functional._nodes_by_depth, reverse=True):  # pylint: disable=protected-access
    for node in functional._nodes_by_depth[depth]:  # pylint: disable=protected-access
      if node.is_input or not node.operation:
        continue
      outs = _run_step(plan[id(node)], run, training, plan)
      if outs is not None:
        for kt, value in zip(node.outputs, outs):
          run.values.setdefault(id(kt), value)
          if run.shapes is not None:
            run.shapes.setdefault(id(kt), value.shape)
  return [run.values[id(kt)] for kt in functional.outputs]


def _descend_roots(plan):
  """The custom layers of a functional plan whose leaves get wrappers, and
  the ids of the layers the plan runs itself (never patched)."""
  roots = [s.layer for s in plan.values() if s.kind == 'descend']
  direct = {id(s.layer) for s in plan.values() if s.kind != 'descend'}
  return roots, direct


@keras.saving.register_keras_serializable(package='blpa')
class CompressedModel(keras.Model):
  """A Keras model computing ``source``'s outputs with compact activations.

  Built by :func:`compress`; shares ``source``'s layers and variables.
  ``save_weights`` / ``load_weights`` act on ``source``, so weight files
  interchange with the original model. ``save`` writes the original
  model's config with ``bits``; ``keras.models.load_model`` gives back a
  compressed model.

  Args:
    source: the functional graph to walk (the model itself, or a
      Sequential's), or a subclassed model.
    bits: 0, 4 or 8.
    plan: the :func:`blpa.keras.plan.make_plan` dict, or None for a
      subclassed model.
    original: the model given to :func:`compress` (for ``get_config``).
  """

  def __init__(self, source, bits, plan, original=None, **kwargs):
    # The original's dtype policy, whatever the global one is now; inputs
    # reach the original as given (it casts them as it does alone).
    kwargs.setdefault('dtype', (original or source).dtype_policy)
    super().__init__(name=kwargs.pop('name', f'{source.name}_blpa{bits}'),
                     **kwargs)
    self._convert_input_args = False
    self._allow_non_tensor_positional_args = True
    self.source = source
    self.bits = bits
    self._blpa_plan = plan
    # Not tracked: its variables are source's.
    object.__setattr__(self, '_blpa_original', original or source)
    self._blpa_checked = False
    self._blpa_record = None  # a list while blpa.keras.report traces
    self._blpa_shapes = None
    self.built = source.built

  def call(self, inputs, training=None):
    record = self._blpa_record
    if record is None and not self._blpa_checked:
      record = []
    if self._blpa_plan is None:
      outputs, values = self._call_subclassed(inputs, training, record)
    else:
      outputs, values = self._call_functional(inputs, training, record)
    if not self._blpa_checked and record is not None:
      self._blpa_checked = True
      _warn_coverage(self, record, values)
    return outputs

  def _call_functional(self, inputs, training, record):
    flat = self.source._standardize_inputs(inputs)  # pylint: disable=protected-access
    run = _Run(self.bits, exact_ids=[id(t) for t in self.source.inputs],
               shapes=self._blpa_shapes)
    roots, direct = _descend_roots(self._blpa_plan)
    registry = leaves_lib.Registry(self.bits, exact=flat)
    with leaves_lib.Interceptor(leaves_lib.leaves_of(roots, direct),
                                registry, record):
      outs = run_graph(self.source, flat, run, training, self._blpa_plan)
    outputs = tree.pack_sequence_as(self.source._outputs_struct, outs)  # pylint: disable=protected-access
    return outputs, run.values

  def _call_subclassed(self, inputs, training, record):
    registry = leaves_lib.Registry(self.bits, exact=tree.flatten(inputs))
    kwargs = {} if training is None else {'training': training}
    with leaves_lib.Interceptor(leaves_lib.leaves_of([self.source]),
                                registry, record):
      return self.source(inputs, **kwargs), {}

  def compute_output_spec(self, inputs, training=None):
    return self.source.compute_output_spec(inputs, training=training)

  def build(self, input_shape):
    # An unbuilt source builds itself on its first call, as Keras does.
    del input_shape
    self.built = True

  def get_config(self):
    return {'name': self.name, 'bits': self.bits,
            'source': keras.saving.serialize_keras_object(
                self._blpa_original)}

  @classmethod
  def from_config(cls, config, custom_objects=None):
    source = keras.saving.deserialize_keras_object(
        config['source'], custom_objects=custom_objects)
    return compress(source, config['bits'], name=config.get('name'))

  def save_weights(self, *args, **kwargs):
    return self.source.save_weights(*args, **kwargs)

  def load_weights(self, *args, **kwargs):
    return self.source.load_weights(*args, **kwargs)

  @property
  def plan(self):
    """The :class:`blpa.keras.plan.Step` of every node, in graph order
    (None for a subclassed model: its leaves are chosen per call)."""
    if self._blpa_plan is None:
      return None
    return list(self._blpa_plan.values())


def compress(model, bits=4, verbose=False, name=None):
  """A model with ``model``'s forward pass that keeps compact activations.

  Args:
    model: any ``keras.Model``: functional or Sequential (its graph is
      walked), or subclassed (its leaf layers get wrappers while the
      compressed model runs).
    bits: 0 (one exact copy per tensor), 8 or 4 bits per stored value.
    verbose: print :func:`blpa.keras.report` for a batch of 1 (a model
      with known input shapes).
    name: the compressed model's name (default ``<name>_blpa<bits>``).

  Returns:
    A :class:`CompressedModel` sharing ``model``'s layers and variables.

  Raises:
    TypeError: ``model`` is not a ``keras.Model``.
    ValueError: ``bits`` not in (0, 4, 8).
  """
  if isinstance(bits, bool) or bits not in BITS:
    raise ValueError(f'bits must be one of {BITS}, got {bits!r}')
  if isinstance(model, CompressedModel):
    raise TypeError(f'{model.name!r} is already compressed (bits '
                    f'{model.bits}); compress the original model')
  if not isinstance(model, keras.Model):
    raise TypeError(f'compress needs a keras.Model; got '
                    f'{type(model).__module__}.{type(model).__name__}')
  functional = plan_lib.functional_of(model)
  kwargs = {'name': name} if name else {}
  if functional is None or not getattr(functional, '_nodes_by_depth', None):
    compressed = CompressedModel(model, bits, None, **kwargs)
  else:
    plan = plan_lib.make_plan(functional, bits)
    compressed = CompressedModel(functional, bits, plan, original=model,
                                 **kwargs)
  if verbose:
    from blpa.keras.report import report  # pylint: disable=import-outside-toplevel
    try:
      print(report(compressed, 1))
    except ValueError as err:  # input shapes the model does not know
      print(f'blpa.keras.compress: no report ({err})')
  return compressed


def _per_example_bytes(t):
  dims = list(t.shape)[1:]
  if any(d is None for d in dims):
    return 0
  size = tf.as_dtype(t.dtype).size
  for d in dims:
    size *= int(d)
  return size


def _warn_coverage(compressed, record, values):
  """Warns once when the layers that keep their ordinary gradient read
  more than half of the bytes that the model's layers read (what plain
  Keras keeps, roughly), naming the largest of them."""
  plain, ordinary = {}, {}
  def count(name, kind, tensors):
    for t in tensors:
      size = _per_example_bytes(t)
      plain[id(t)] = size
      if kind == 'ordinary':
        ordinary[name] = ordinary.get(name, 0) + size
  for step in (compressed._blpa_plan or {}).values():  # pylint: disable=protected-access
    if step.kind in ('model', 'descend'):
      continue
    tensors = [values[id(kt)] for kt in step.node.input_tensors
               if id(kt) in values]
    count(step.layer.name, step.kind, tensors)
  for row in record:
    count(row['layer'].name, row['step'].kind, row['inputs'])
  total = sum(plain.values())
  lost = sum(ordinary.values())
  if total and lost > total / 2:
    worst = sorted(ordinary.items(), key=lambda kv: -kv[1])[:5]
    warnings.warn(
        f'blpa.keras.compress({compressed.bits}) of '
        f'{compressed._blpa_original.name!r}: layers that keep their '  # pylint: disable=protected-access
        f'ordinary gradient read {lost / total:.0%} of the activations, so '
        f'less than half can be compressed; largest: '
        + ', '.join(f'{n} ({b} bytes per example)' for n, b in worst)
        + '. blpa.keras.report(model, batch_size) says why.',
        RuntimeWarning, stacklevel=3)

"""``compress(model, bits)``: a Keras model that keeps compact activations.

The returned model runs the original model's functional graph node by node
with the same layer objects (so it shares every variable), each node through
the wrapper that :mod:`blpa.keras.plan` chose for it
(:mod:`blpa.keras.wrappers`). Compact copies are made once per tensor and
shared by every layer that needs that tensor in its backward pass.
"""

import keras
import tensorflow as tf
from keras.src import tree

from blpa.keras import codecs, plan as plan_lib, wrappers

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

  def __init__(self, bits, exact_ids=(), parent=None):
    self.bits = bits
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
    return [wrappers.run_linear(kind, op, xs[0], codec)]
  if kind == 'relu':
    return [wrappers.run_masked(op, xs[0], wrappers.relu_keep(step.act))]
  if kind == 'dropout':
    if _training_of(node, training) is not True or not op.rate:
      return [op(xs[0], training=False)]
    return [wrappers.run_masked(op, xs[0], lambda out: out != 0,
                                1.0 / (1.0 - op.rate), training=True)]
  if kind == 'maxpool_mask':
    return [wrappers.run_max_pool_mask(op, xs[0])]
  if kind in plan_lib.SHAPE_KINDS or kind == 'maxpool':
    codec = run.copy_of(node.input_tensors[0]) if kind == 'maxpool' else None
    return [wrappers.run_shape_op(kind, op, xs, codec)]
  if kind == 'model':
    return _run_nested(step, run, training, plan)
  if kind == 'generic':
    return tree.flatten(_run_generic(node, run, training))
  args, kwargs = _filled(node, run.values, training)
  return tree.flatten(op(*args, **kwargs))


def _run_generic(node, run, training):
  kts = list(node.input_tensors)
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
  return wrappers.run_generic(call, xs, kept, trainable)


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
  for depth in sorted(functional._nodes_by_depth, reverse=True):  # pylint: disable=protected-access
    for node in functional._nodes_by_depth[depth]:  # pylint: disable=protected-access
      if node.is_input or not node.operation:
        continue
      outs = _run_step(plan[id(node)], run, training, plan)
      if outs is not None:
        for kt, value in zip(node.outputs, outs):
          run.values.setdefault(id(kt), value)
  return [run.values[id(kt)] for kt in functional.outputs]


class CompressedModel(keras.Model):
  """A Keras model computing ``source``'s outputs with compact activations.

  Built by :func:`compress`; shares ``source``'s layers and variables.
  ``save_weights`` / ``load_weights`` act on ``source``, so weight files
  interchange with the original model.
  """

  def __init__(self, source, bits, plan, **kwargs):
    super().__init__(name=kwargs.pop('name', f'{source.name}_blpa{bits}'),
                     **kwargs)
    self.source = source
    self.bits = bits
    self._blpa_plan = plan
    self.built = True

  def call(self, inputs, training=None):
    flat = self.source._standardize_inputs(inputs)  # pylint: disable=protected-access
    run = _Run(self.bits, exact_ids=[id(t) for t in self.source.inputs])
    outs = run_graph(self.source, flat, run, training, self._blpa_plan)
    return tree.pack_sequence_as(self.source._outputs_struct, outs)  # pylint: disable=protected-access

  def compute_output_spec(self, inputs, training=None):
    return self.source.compute_output_spec(inputs, training=training)

  def save_weights(self, *args, **kwargs):
    return self.source.save_weights(*args, **kwargs)

  def load_weights(self, *args, **kwargs):
    return self.source.load_weights(*args, **kwargs)

  @property
  def plan(self):
    """The :class:`blpa.keras.plan.Step` of every node, in graph order."""
    return list(self._blpa_plan.values())


def compress(model, bits=4, verbose=False):
  """A model with ``model``'s forward pass that keeps compact activations.

  Args:
    model: a functional or Sequential ``keras.Model`` (built).
    bits: 0 (one exact copy per tensor), 8 or 4 bits per stored value.
    verbose: print :func:`blpa.keras.report` for a batch of 1.

  Returns:
    A :class:`CompressedModel` sharing ``model``'s layers and variables.

  Raises:
    ValueError: ``bits`` not in (0, 4, 8), or a model without a functional
      graph (a subclassed model).
  """
  if isinstance(bits, bool) or bits not in BITS:
    raise ValueError(f'bits must be one of {BITS}, got {bits!r}')
  functional = plan_lib.functional_of(model)
  if functional is None:
    raise ValueError(
        f'compress needs a functional or Sequential keras.Model with a known '
        f'graph (built on an Input); got {type(model).__name__} '
        f'{getattr(model, "name", "")!r}')
  plan = plan_lib.make_plan(functional, bits)
  compressed = CompressedModel(functional, bits, plan)
  if verbose:
    from blpa.keras.report import report  # pylint: disable=import-outside-toplevel
    print(report(compressed, 1))
  return compressed

"""Which backward pass each node of a functional Keras model gets.

:func:`make_plan` walks a functional model's graph (nested functional
models included) once and gives every node a :class:`Step`: the kind of
wrapper that runs it (an analytic backward, the generic recompute path, or
the ordinary Keras gradient) and, when it is not analytic, why.
"""

import dataclasses
from typing import Any, Optional

import keras

L = keras.layers

#: Layers whose backward pass needs no stored activation at all.
SHAPE_KINDS = ('add', 'concat', 'zeropad', 'crop', 'reshape', 'gap',
               'avgpool')
#: Layers with kernels and an analytic backward (:func:`kernels_of`).
LINEAR_KINDS = ('conv2d', 'depthwise', 'separable', 'dense')
#: Max pools: argmax from the restored input, or from a 1-bit mask.
MAX_POOL_KINDS = ('maxpool', 'maxpool_mask')


@dataclasses.dataclass
class Step:
  """How one node runs.

  Attributes:
    kind: ``'bn_act'``, ``'act_done'`` (a ReLU run by the BN before it),
      ``'conv2d'``, ``'depthwise'``, ``'separable'``, ``'dense'``,
      ``'relu'``, ``'maxpool'``,
      ``'dropout'``, one of :data:`SHAPE_KINDS`, ``'model'`` (a nested
      functional model), ``'generic'`` or ``'ordinary'``.
    node: the Keras node.
    act: for ``'bn_act'``: ``None``, ``'relu'`` or ``'relu6'``.
    act_node: for ``'bn_act'`` with an activation: the activation's node.
    reason: why a node is generic or ordinary (empty otherwise).
  """
  kind: str
  node: Any
  act: Optional[str] = None
  act_node: Any = None
  reason: str = ''

  @property
  def layer(self):
    return self.node.operation


def functional_of(op):
  """The functional graph of a nested model, or None."""
  if isinstance(op, keras.Sequential):
    op = getattr(op, '_functional', None)
  if op is not None and hasattr(op, '_nodes_by_depth') and hasattr(
      op, '_run_through_graph'):
    return op
  return None


def relu_kind(op):
  """``'relu'``, ``'relu6'`` or None: whether a layer is a plain ReLU."""
  if isinstance(op, L.ReLU):
    if float(op.negative_slope) or float(op.threshold):
      return None
    if op.max_value is None:
      return 'relu'
    return 'relu6' if float(op.max_value) == 6.0 else None
  if isinstance(op, L.Activation):
    fn = op.activation
    if fn is keras.activations.relu:
      return 'relu'
    if fn is keras.activations.relu6:
      return 'relu6'
  return None


def _linear(op):
  act = getattr(op, 'activation', None)
  return act is None or act is keras.activations.linear


def _float32(node):
  return all(t.dtype == 'float32' for t in node.input_tensors)


def _plain_weights(op):
  """Why a layer's kernel cannot take the analytic path ('' if it can)."""
  if not _linear(op):
    return 'activation inside the layer'
  if getattr(op, 'lora_enabled', False):
    return 'LoRA enabled'
  if getattr(op, 'quantization_mode', None):
    return f'quantized ({op.quantization_mode})'
  return ''


def kernels_of(kind, layer):
  """The kernels of a layer of one of :data:`LINEAR_KINDS`."""
  if kind == 'separable':
    return [layer.depthwise_kernel, layer.pointwise_kernel]
  return [layer.kernel]


def kernels_trained(kind, layer):
  """Whether a linear layer trains any of its kernels (its input is then
  kept for their gradients)."""
  return layer.trainable and any(k.trainable for k in kernels_of(kind, layer))


_CONV_KINDS = {L.Conv2D: 'conv2d', L.DepthwiseConv2D: 'depthwise',
               L.SeparableConv2D: 'separable'}


def _conv_reason(op):
  if op.data_format != 'channels_last':
    return 'channels_first'
  if getattr(op, 'groups', 1) != 1:
    return 'grouped convolution'
  if type(op) is not L.Conv2D and max(op.dilation_rate) > 1:
    return f'dilated {_CONV_KINDS[type(op)]} convolution'
  return _plain_weights(op)


def _bn_reason(op, node):
  if op.renorm:
    return 'batch renormalization'
  rank = len(node.input_tensors[0].shape)
  if op.axis not in (-1, rank - 1):
    return f'normalizes axis {op.axis}, not the last'
  if 'mask' in node.arguments.kwargs and node.arguments.kwargs['mask'] is \
      not None:
    return 'masked'
  if op.compute_dtype != 'float32' or op.variable_dtype != 'float32':
    return f'dtype {op.compute_dtype}'
  if rank < 2 or node.input_tensors[0].shape[-1] is None:
    return 'unknown channel count'
  return ''


def _same_shapes(node):
  shapes = [tuple(t.shape[1:]) for t in node.input_tensors]
  return all(s == shapes[0] and None not in s for s in shapes)


def _concat_ok(op, node):
  axis = op.axis
  return all(t.shape[axis] is not None for t in node.input_tensors)


def _fixed_kind(op, node):
  """Kind of a layer with an analytic backward, or None."""
  channels_last = getattr(op, 'data_format', 'channels_last') == \
      'channels_last'
  checks = (
      (L.Add, 'add', lambda: _same_shapes(node)),
      (L.Concatenate, 'concat', lambda: _concat_ok(op, node)),
      (L.ZeroPadding2D, 'zeropad', lambda: channels_last),
      (L.Cropping2D, 'crop', lambda: channels_last),
      ((L.Flatten, L.Reshape), 'reshape', lambda: True),
      (L.GlobalAveragePooling2D, 'gap', lambda: channels_last),
      (L.AveragePooling2D, 'avgpool', lambda: channels_last),
      (L.MaxPooling2D, 'maxpool', lambda: channels_last),
      (L.Dropout, 'dropout', lambda: type(op) is L.Dropout),
  )
  for cls, kind, ok in checks:
    if isinstance(op, cls):
      if not ok():
        return None
      return _max_pool_kind(op) if kind == 'maxpool' else kind
  return None


def _max_pool_kind(op):
  """``'avgpool'`` for a 1x1 max pool (the same backward), ``'maxpool_mask'``
  for non-overlapping windows (a 1-bit argmax mask), else ``'maxpool'``
  (argmax recomputed from the restored input)."""
  if tuple(op.pool_size) == (1, 1):
    return 'avgpool'
  if tuple(op.pool_size) == tuple(op.strides) and op.padding == 'valid':
    return 'maxpool_mask'
  return 'maxpool'


def _generic_reason(op, node):
  """Why a node cannot be recomputed from copies of its inputs ('' if ok)."""
  if not node.input_tensors:
    return 'no tensor inputs'
  if not all(t.dtype in ('float16', 'bfloat16', 'float32', 'float64')
             for t in node.input_tensors):
    return 'non-float input'
  if isinstance(op, keras.layers.Layer):
    if op.non_trainable_weights:
      return 'has non-trainable state (recomputing could update it twice)'
    if hasattr(op, 'seed_generator'):
      return 'random (a recompute would draw other numbers)'
  return ''


def _node_step(op, node, consumers, outputs, bits):
  """The :class:`Step` of one node (before BN+ReLU grouping)."""
  if functional_of(op) is not None:
    return Step('model', node)
  if isinstance(op, L.BatchNormalization):
    reason = _bn_reason(op, node)
    return Step('ordinary', node, reason=reason) if reason else Step(
        'bn_act', node)
  if not _float32(node):
    return Step('ordinary', node, reason='input dtype is not float32')
  if type(op) in _CONV_KINDS:
    reason = _conv_reason(op)
    if not reason:
      return Step(_CONV_KINDS[type(op)], node)
  elif isinstance(op, L.Dense) and type(op) is L.Dense:
    reason = _plain_weights(op)
    if not reason:
      return Step('dense', node)
  elif relu_kind(op):
    return Step('relu', node, act=relu_kind(op))
  else:
    kind = _fixed_kind(op, node)
    if kind:
      return Step(kind, node)
    reason = f'{type(op).__name__} has no analytic backward here'
  why_not = _generic_reason(op, node)
  if why_not:
    return Step('ordinary', node, reason=why_not)
  return Step('generic', node, reason=reason)


def padding_of(kt):
  """``(input, padding)`` when a KerasTensor is the output of a
  channels_last ZeroPadding2D (a 4-D input), else None."""
  history = getattr(kt, '_keras_history', None)
  op = history and history.operation
  if type(op) is not L.ZeroPadding2D or op.data_format != 'channels_last':
    return None
  node = op._inbound_nodes[history.node_index]  # pylint: disable=protected-access
  return node.input_tensors[0], op.padding


def unpadded(kt):
  """The tensor whose copy serves ``kt`` (through ZeroPadding2D layers)."""
  found = padding_of(kt)
  while found is not None:
    kt = found[0]
    found = padding_of(kt)
  return kt


def _consumers(functional):
  """id(KerasTensor) -> list of nodes that take it."""
  out = {}
  for nodes in functional._nodes_by_depth.values():
    for node in nodes:
      if node.is_input:
        continue
      for t in node.input_tensors:
        out.setdefault(id(t), []).append(node)
  return out


def _group_bn(steps, consumers, outputs):
  """Marks BN nodes followed by their only consumer, a plain ReLU."""
  for step in list(steps.values()):
    if step.kind != 'bn_act':
      continue
    out = step.node.outputs[0]
    users = consumers.get(id(out), [])
    if id(out) in outputs or len(users) != 1:
      continue
    user = steps.get(id(users[0]))
    if user is not None and user.kind == 'relu' and len(
        user.node.input_tensors) == 1:
      step.act, step.act_node = user.act, user.node
      user.kind = 'act_done'


def make_plan(functional, bits, plan=None):
  """Steps of every node of a functional model and of its nested models.

  Args:
    functional: a functional ``keras.Model``.
    bits: 0, 4 or 8.
    plan: dict to fill (for the recursion).

  Returns:
    dict ``id(node) -> Step``.
  """
  plan = {} if plan is None else plan
  consumers = _consumers(functional)
  outputs = {id(t) for t in functional.outputs}
  steps = {}
  by_depth = functional._nodes_by_depth  # pylint: disable=protected-access
  for depth in sorted(by_depth, reverse=True):  # forward order
    for node in by_depth[depth]:
      if node.is_input or not node.operation:
        continue
      try:
        step = _node_step(node.operation, node, consumers, outputs, bits)
      except Exception as err:  # pylint: disable=broad-except
        step = Step('ordinary', node, reason=f'analysis failed: {err}')
      if step.kind == 'model':
        make_plan(functional_of(node.operation), bits, plan)
      steps[id(node)] = step
  _group_bn(steps, consumers, outputs)
  plan.update(steps)
  return plan

"""Which backward pass each node of a functional Keras model gets.

:func:`make_plan` walks a functional model's graph (nested functional
models included) once and gives every node a :class:`Step`: the kind of
wrapper that runs it (an analytic backward, the generic recompute path, or
the ordinary Keras gradient) and, when it is not analytic, why.
"""

import dataclasses
from typing import Any, Optional

import keras
import tensorflow as tf

from blpa.keras import activations as activations_lib, attention, \
    backward, einsum, norm

L = keras.layers

#: Dtypes the analytic backward passes compute in (a layer's compute dtype
#: and its float inputs); float64 layers keep their ordinary gradient.
FLOAT_DTYPES = ('float16', 'bfloat16', 'float32')

#: Layers whose backward pass needs no stored activation at all.
SHAPE_KINDS = ('add', 'concat', 'zeropad', 'crop', 'reshape', 'gap',
               'avgpool', 'upsampling', 'gap1d', 'avgpool1d')
#: Layers with kernels and an analytic backward (:func:`kernels_of`).
LINEAR_KINDS = ('conv2d', 'depthwise', 'separable', 'dense', 'conv1d',
                'conv3d', 'conv2d_transpose', 'einsum_dense')
#: Relu-like activations of a linear layer, kept as a 1-bit mask (any other
#: ``Step.act`` of a linear layer is a smooth one, :mod:`activations`).
MASK_ACTS = ('relu', 'relu6')
#: Max pools: argmax from the restored input, or from a 1-bit mask.
MAX_POOL_KINDS = ('maxpool', 'maxpool_mask', 'maxpool_offsets', 'maxpool1d')
#: Keras ops (``keras.ops``, not layers) that are linear in their float
#: inputs: their gradient needs only shapes, so the generic recompute runs
#: them on zeros (step ``'linear_op'``).
LINEAR_OPS = frozenset([
    'GetItem', 'Reshape', 'Transpose', 'ExpandDims', 'Squeeze', 'Add',
    'Subtract', 'Concatenate', 'Stack', 'Tile', 'Negative', 'Slice', 'Split',
    'Flatten', 'MoveAxis', 'Swapaxes', 'Repeat', 'BroadcastTo', 'Take',
    'TakeAlongAxis', 'Pad', 'Roll', 'Sum', 'Mean'])
#: Pools whose backward reads a copy of their input.
COPY_POOL_KINDS = ('maxpool', 'maxpool1d')


@dataclasses.dataclass
class Step:
  """How one node runs.

  Attributes:
    kind: ``'bn_act'``, ``'act_done'`` (a ReLU run by the BN before it),
      ``'conv2d'``, ``'depthwise'``, ``'separable'``, ``'dense'``,
      ``'einsum_dense'``, ``'layernorm'``, ``'rmsnorm'``, ``'smooth_act'``
      (an ``Activation`` of :func:`blpa.keras.activations.name_of`),
      ``'embedding'`` (Keras's gradient, which keeps only the indices),
      ``'mha'`` (a MultiHeadAttention, :mod:`blpa.keras.attention`),
      ``'softmax'`` (a Softmax layer over the last axis),
      ``'relu'``, ``'maxpool'``,
      ``'dropout'``, one of :data:`SHAPE_KINDS`, ``'model'`` (a nested
      functional model), ``'descend'`` (a custom layer whose sublayers get
      wrappers, :mod:`blpa.keras.leaves`), ``'generic'`` or ``'ordinary'``.
    node: the Keras node (for a call seen by :mod:`blpa.keras.leaves`, a
      :class:`CallView`).
    act: for ``'bn_act'`` and the linear kinds: ``None``, ``'relu'`` or
      ``'relu6'`` (for a linear layer, its own ``activation``); for Dense,
      EinsumDense and ``'smooth_act'`` also a smooth activation's name.
    act_node: for ``'bn_act'`` with an activation: the activation's node.
    reason: why a node is generic or ordinary (empty otherwise).
    shapes: for an ``'mha'`` call seen by :mod:`blpa.keras.leaves`:
      ``(query shape, value shape, dropout on)`` (for the report).
  """
  kind: str
  node: Any
  act: Optional[str] = None
  act_node: Any = None
  reason: str = ''
  shapes: Any = None

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


@dataclasses.dataclass
class CallView:
  """What :func:`step_of` reads of a node, for one call of a layer seen
  at run time (:mod:`blpa.keras.leaves`).

  Attributes:
    input_tensors: the float tensors of the call, each once.
    kwargs: the call's keyword arguments.
  """
  input_tensors: list
  kwargs: dict

  @property
  def arguments(self):
    return self

  outputs = ()


def linear_act(op):
  """``''`` for a layer without activation, ``'relu'``/``'relu6'`` for
  those, the :func:`blpa.keras.activations.name_of` name of a known smooth
  one (``'gelu'``, ``'silu'``, ...), None for any other activation."""
  act = getattr(op, 'activation', None)
  if act is None or act is keras.activations.linear:
    return ''
  if act is keras.activations.relu:
    return 'relu'
  if act is keras.activations.relu6:
    return 'relu6'
  return activations_lib.name_of(act)


def dtype_name(t):
  """The dtype name of a tensor or KerasTensor."""
  return tf.as_dtype(t.dtype).name


def _dtype_reason(op, node):
  """Why a layer's dtypes rule out the analytic path ('' if they do not)."""
  if getattr(op, 'compute_dtype', 'float32') not in FLOAT_DTYPES:
    return f'compute dtype {op.compute_dtype}'
  for t in node.input_tensors:
    if dtype_name(t) not in FLOAT_DTYPES:
      return f'input dtype {dtype_name(t)}'
  return ''


def _plain_weights(op, smooth=False):
  """Why a layer's kernel cannot take the analytic path ('' if it can);
  ``smooth``: whether its wrapper takes smooth activations (Dense and
  EinsumDense do)."""
  act = linear_act(op)
  if act is None or (act and act not in MASK_ACTS and not smooth):
    return ('activation inside the layer (not relu/relu6' +
            (' or a known smooth one)' if smooth else ')'))
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
               L.SeparableConv2D: 'separable', L.Conv1D: 'conv1d',
               L.Conv3D: 'conv3d', L.Conv2DTranspose: 'conv2d_transpose'}
_CONV_SUPPORT = {L.Conv1D: backward.supports_conv1d,
                 L.Conv3D: backward.supports_conv3d,
                 L.Conv2DTranspose: backward.supports_conv2d_transpose}


def _conv_reason(op):
  if type(op) in _CONV_SUPPORT:
    return _CONV_SUPPORT[type(op)](op) or _plain_weights(op)
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
  if op.compute_dtype not in FLOAT_DTYPES or op.variable_dtype != 'float32':
    return f'dtype {op.compute_dtype} (variables {op.variable_dtype})'
  if rank < 2 or node.input_tensors[0].shape[-1] is None:
    return 'unknown channel count'
  return ''


def _concat_ok(op, node):
  axis = op.axis
  return all(t.shape[axis] is not None for t in node.input_tensors)


def _masked(node):
  """Whether a call gets a Keras mask (given, or carried by its input)."""
  if node.arguments.kwargs.get('mask') is not None:
    return True
  return any(getattr(t, '_keras_mask', None) is not None
             for t in node.input_tensors)


def _fixed_kind(op, node):
  """Kind of a layer with an analytic backward, or None."""
  channels_last = getattr(op, 'data_format', 'channels_last') == \
      'channels_last'
  checks = (
      ((L.UpSampling1D, L.UpSampling2D), 'upsampling',
       lambda: not backward.supports_upsampling(op)),
      (L.GlobalAveragePooling1D, 'gap1d',
       lambda: not backward.supports_global_avg_pool1d(op, _masked(node))),
      ((L.GlobalMaxPooling1D, L.GlobalMaxPooling2D), 'gmp',
       lambda: not backward.supports_global_max_pool(op)),
      (L.AveragePooling1D, 'avgpool1d',
       lambda: not backward.supports_avg_pool1d(op)),
      (L.MaxPooling1D, 'maxpool1d',
       lambda: not backward.supports_max_pool1d(op)),
      (L.Add, 'add', lambda: True),
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
  for non-overlapping windows (a 1-bit argmax mask), else
  ``'maxpool_offsets'`` (each window's argmax offset, a byte per output;
  ``'maxpool'``, the argmax recomputed from the restored input, for windows
  of over 255 positions)."""
  if tuple(op.pool_size) == (1, 1):
    return 'avgpool'
  if tuple(op.pool_size) == tuple(op.strides) and op.padding == 'valid':
    return 'maxpool_mask'
  if op.pool_size[0] * op.pool_size[1] <= 255:
    return 'maxpool_offsets'
  return 'maxpool'


def _generic_reason(op, node):
  """Why a node cannot be recomputed from copies of its inputs ('' if ok)."""
  if not node.input_tensors:
    return 'no tensor inputs'
  if not all(dtype_name(t) in ('float16', 'bfloat16', 'float32', 'float64')
             for t in node.input_tensors):
    return 'non-float input'
  if isinstance(op, keras.layers.Layer):
    if op.non_trainable_weights:
      return 'has non-trainable state (recomputing could update it twice)'
    if _draws_unseeded(op):
      return 'random without a Keras SeedGenerator (not replayable)'
  return ''


def _draws_unseeded(op):
  """Whether a Keras layer draws random numbers that a recompute cannot
  replay (its own ``seed_generator`` attribute without a tracked
  SeedGenerator; Keras's layers track theirs)."""
  return hasattr(op, 'seed_generator') and not getattr(
      op, '_seed_generators', None)


def sublayers(layer):
  """The layers a layer tracks directly (not itself)."""
  return list(layer._flatten_layers(include_self=False, recursive=False))  # pylint: disable=protected-access


def descend_reason(layer):
  """'' when :mod:`blpa.keras.leaves` gives a layer's sublayers their
  wrappers, else why not.

  Models (subclassed, functional or Sequential) and custom layers with
  sublayers are descended into. Keras's own layers with sublayers
  (``MultiHeadAttention``, ``RNN``, ``Bidirectional``, ...) run as one
  leaf: they run their sublayers in loops or with state of their own.
  """
  if isinstance(layer, keras.Model):
    return ''
  if not sublayers(layer):
    return 'no sublayers'
  module = type(layer).__module__
  if module.startswith('keras.') or module == 'keras':
    return f'Keras layer {type(layer).__name__} runs as one unit'
  return ''


def _node_step(op, node, consumers, outputs, bits):
  """The :class:`Step` of one node (before BN+ReLU grouping)."""
  if functional_of(op) is not None:
    return Step('model', node)
  if isinstance(op, keras.layers.Layer) and not descend_reason(op):
    return Step('descend', node)
  return step_of(op, node)


def _attention_kind(op, node):
  """``(kind, reason)``: ``'mha'`` for a MultiHeadAttention, ``'softmax'``
  for a Softmax or ``Activation('softmax')`` layer (``reason`` '' when
  :mod:`blpa.keras.attention` supports the call), else ``(None, '')``."""
  kwargs = node.arguments.kwargs
  if isinstance(op, L.MultiHeadAttention):
    return 'mha', attention.attention_reason(op, kwargs, node.input_tensors)
  why = attention.softmax_reason(op, kwargs, node.input_tensors)
  return (None, '') if why is None else ('softmax', why)


def step_of(op, node):
  """The :class:`Step` of one call of a leaf layer (no sublayers)."""
  if isinstance(op, L.BatchNormalization):
    reason = _bn_reason(op, node)
    return Step('ordinary', node, reason=reason) if reason else Step(
        'bn_act', node)
  if isinstance(op, L.Embedding) and type(op).call is L.Embedding.call:
    return Step('embedding', node)  # a gather keeps only its indices
  attention_kind, attention_why = _attention_kind(op, node)
  if attention_kind and not attention_why:
    return Step(attention_kind, node)
  reason = _dtype_reason(op, node)
  if reason:
    return Step('ordinary', node, reason=reason)
  if type(op) in _CONV_KINDS:
    reason = _conv_reason(op)
    if not reason:
      return Step(_CONV_KINDS[type(op)], node, act=linear_act(op) or None)
  elif isinstance(op, L.Dense) and type(op) is L.Dense:
    reason = _plain_weights(op, smooth=True)
    if not reason:
      return Step('dense', node, act=linear_act(op) or None)
  elif type(op) is L.EinsumDense:
    reason = einsum.reason(op.equation) or _plain_weights(op, smooth=True)
    if not reason:
      return Step('einsum_dense', node, act=linear_act(op) or None)
  elif norm.kind_of(op):
    reason = norm.reason(op, node.input_tensors)
    if not reason:
      return Step(norm.kind_of(op), node)
  elif isinstance(op, L.Activation) and activations_lib.name_of(
      op.activation):
    return Step('smooth_act', node, act=activations_lib.name_of(
        op.activation))
  elif relu_kind(op):
    return Step('relu', node, act=relu_kind(op))
  else:
    kind = _fixed_kind(op, node)
    if kind:
      return Step(kind, node)
    if not isinstance(op, keras.layers.Layer) and \
        type(op).__name__ in LINEAR_OPS:
      return Step('linear_op', node)
    reason = attention_why or \
        f'{type(op).__name__} has no analytic backward here'
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

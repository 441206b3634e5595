"""``report(compressed, batch_size)``: what each layer keeps for backward.

The report traces (does not run) one call of the compressed model on zeros
of its inputs: the functional graph's steps get their shapes from the trace,
and the leaf layers of subclassed models and custom layers
(:mod:`blpa.keras.leaves`) are listed as they were called. It ends with the
coverage: what plain Keras keeps for backward (:func:`kept_bytes` of the
original) against what the compressed model keeps.
"""

import math

import tensorflow as tf

from blpa.keras import attention, codecs, kept as kept_lib, \
    leaves as leaves_lib, norm as norm_lib, plan as plan_lib

EAGER_NOTE = (
    'Eager mode (run_eagerly=True, or a GradientTape loop without '
    'tf.function) keeps part of the full activations: measured on the Keras '
    'CIFAR ResNet (20 -> 38 layers, batch 16) the peak grows by 60-73 MiB '
    'against 126 MiB for plain Keras, and by 5 MiB in tf.function. The '
    'figures above hold in tf.function, which fit/evaluate use by default.')

_WHAT = {
    'conv2d': 'analytic Conv2D backward',
    'depthwise': 'analytic DepthwiseConv2D backward',
    'separable': 'analytic SeparableConv2D backward (depthwise output '
                 'recomputed)',
    'dense': 'analytic Dense backward',
    'einsum_dense': 'analytic EinsumDense backward',
    'layernorm': 'analytic LayerNormalization backward',
    'rmsnorm': 'analytic RMSNormalization backward',
    'smooth_act': "the activation's derivative",
    'embedding': 'indices only (ordinary gradient: a gather keeps its '
                 'indices)',
    'maxpool': 'MaxPoolGrad on the restored input',
    'maxpool_mask': 'argmax mask (1 bit per input value)',
    'maxpool_offsets': 'argmax offset in its window (1 byte per output)',
    'maxpool1d': 'MaxPoolGrad on the restored input',
    'gmp': 'maximum mask (1 bit per input value)',
    'descend': 'custom layer: its sublayers get wrappers',
    'conv1d': 'analytic Conv1D backward',
    'conv3d': 'analytic Conv3D backward',
    'conv2d_transpose': 'analytic Conv2DTranspose backward',
    'relu': 'mask (1 bit per value)',
    'dropout': 'mask (1 bit per value)',
    'mha': 'analytic attention backward: codes of Qs, K, V and the heads, '
           'row codes of the probabilities, dropout mask (1 bit)',
    'softmax': 'row codes of its output',
    'model': 'nested model (its layers are listed)',
    'act_done': 'run with the BatchNormalization before it',
    'generic': 'generic: recomputed from copies of its inputs',
    'linear_op': 'shapes only (a linear op, recomputed on zeros)',
    'ordinary': "Keras's own gradient (keeps what Keras keeps)",
}


def _shape(kt, batch, shapes=None):
  """The shape of a KerasTensor in the traced call (else its static
  shape with the batch size)."""
  if shapes and id(kt) in shapes:
    return [int(d) for d in shapes[id(kt)]]
  return [batch] + [int(d) for d in kt.shape[1:]]


def _outer_links(steps):
  """id(inner input KerasTensor) -> outer KerasTensor, for nested models."""
  links = {}
  for step in steps:
    if step.kind == 'model':
      inner = plan_lib.functional_of(step.layer)
      links.update({id(i): o for i, o in zip(inner.inputs,
                                              step.node.input_tensors)})
  return links


def kind_label(step):
  """A step's kind as the report shows it: a linear layer's smooth
  activation is appended (``'dense+gelu'``)."""
  if step.kind in plan_lib.LINEAR_KINDS and step.act and \
      step.act not in plan_lib.MASK_ACTS:
    return f'{step.kind}+{step.act}'
  return step.kind


def own_bytes(step, layer, bits, in_shape, out_shape, itemsize=4):
  """``(bytes, text)`` of what a normalization or smooth activation keeps
  itself (``(0, '')`` for other steps); ``layer`` is the step's layer."""
  tokens = math.prod(in_shape[:-1])
  if step.kind in norm_lib.KINDS:
    if not bits:
      return (2 * codecs.copy_bytes(in_shape, 0, itemsize) * in_shape[0],
              '; exact input and output (its readers share the output)')
    stats = 2 if getattr(layer, 'rms_scaling', False) else 1
    return (codecs.copy_bytes(in_shape, bits) * in_shape[0] +
            4 * stats * tokens,
            f'; {bits}-bit codes of the normalized values + per-token rstd '
            '(its readers share them)')
  smooth = step.act and step.act not in plan_lib.MASK_ACTS
  if step.kind == 'smooth_act' or (
      step.kind in plan_lib.LINEAR_KINDS and smooth):
    shape = out_shape if step.kind != 'smooth_act' else in_shape
    size = codecs.copy_bytes(shape, bits, itemsize) * shape[0]
    what = f'{bits}-bit codes of {step.act}\'' if bits else \
        f'exact pre-activation of {step.act}'
    return size, f'; {what}'
  return 0, ''


def _copy_needs(step):
  """KerasTensors whose compact copy a step's backward reads."""
  if step.kind in plan_lib.LINEAR_KINDS:
    trained = plan_lib.kernels_trained(step.kind, step.layer)
    return list(step.node.input_tensors[:1]) if trained else []
  if step.kind in plan_lib.COPY_POOL_KINDS or step.kind == 'generic':
    return list(step.node.input_tensors)
  if step.kind == 'mha':  # the projections' inputs, each once
    return list({id(t): t for t in step.node.input_tensors
                 if tf.as_dtype(t.dtype).is_floating}.values())
  return []


def _attention_bytes(layer, step, bits, shape_of):
  """Bytes an ``'mha'`` or ``'softmax'`` step of ``layer`` keeps itself
  (not its inputs' copies); ``shape_of(tensor)`` gives a tensor's traced
  shape."""
  if step.kind == 'softmax':
    x = step.node.input_tensors[0]
    return attention.row_codec_bytes(shape_of(x), bits, _itemsize(x))
  if step.shapes is not None:  # a leaf call: shapes seen at run time
    query_shape, value_shape, dropout = step.shapes
  else:
    query, value, _, _ = attention.bind(step.node.arguments.args,
                                        step.node.arguments.kwargs)
    query_shape, value_shape = shape_of(query), shape_of(value)
    dropout = layer.dropout > 0  # the report traces a training call
  return attention.kept_bytes(layer, query_shape, value_shape, bits, dropout)


def _trace(compressed, sample):
  """``(record, shapes)`` of one traced training call."""
  record, shapes = [], {}
  # object.__setattr__: Keras would track (copy) a list or dict attribute.
  object.__setattr__(compressed, '_blpa_record', record)
  object.__setattr__(compressed, '_blpa_shapes', shapes)
  try:
    tf.function(lambda xs: compressed(xs, training=True)).get_concrete_function(
        sample)
  finally:
    object.__setattr__(compressed, '_blpa_record', None)
    object.__setattr__(compressed, '_blpa_shapes', None)
  return record, shapes


def rows(compressed, batch_size, inputs=None, input_shapes=None):
  """Per node (functional models) and per leaf-layer call (subclassed models
  and custom layers): a dict with ``layer``, ``kind``, ``keeps``,
  ``bytes``, ``reason`` (bytes for a batch of ``batch_size``).

  ``inputs`` (a sample batch) or ``input_shapes`` give shapes that the model
  does not know (:func:`blpa.keras.kept.sample_inputs`).
  """
  sample = kept_lib.sample_inputs(compressed, batch_size, inputs,
                                  input_shapes)
  record, shapes = _trace(compressed, sample)
  if compressed.plan is None:
    roots = [compressed.source]
  else:
    roots = [s.layer for s in compressed.plan if s.kind == 'descend']
  return _plan_rows(compressed, batch_size, shapes) + _leaf_rows(
      compressed.bits, record, leaves_lib.paths_of(roots))


def _plan_rows(compressed, batch_size, shapes):
  """Rows of the functional plan's steps."""
  if compressed.plan is None:
    return []
  bits = compressed.bits
  steps = compressed.plan
  links = _outer_links(steps)
  model_inputs = {id(t) for t in compressed.source.inputs}
  copied = {id(s.act_node.outputs[0] if s.act_node else s.node.outputs[0])
            for s in steps if s.kind == 'bn_act'}
  copied |= {id(s.node.outputs[0]) for s in steps
             if s.kind in norm_lib.KINDS}
  out = []
  for step in steps:
    keeps, size = _WHAT.get(step.kind, 'shapes only'), 0
    if step.kind == 'bn_act':
      shape = _shape(step.node.outputs[0], batch_size, shapes)
      size = codecs.copy_bytes(shape, bits) * shape[0]
      if bits:
        keeps = f'{bits}-bit codes of the BN output, exact {step.act} mask'
      else:
        keeps = 'exact copy of the BN input'
      if step.act == 'relu6':
        size += codecs.mask_bytes(shape) * shape[0]
        keeps += ' + upper mask (1 bit)'
    elif step.kind in ('relu', 'dropout', 'maxpool_mask', 'gmp'):
      shape = _shape(step.node.input_tensors[0], batch_size, shapes)
      size = codecs.mask_bytes(shape) * shape[0]
    elif step.kind == 'maxpool_offsets':
      shape = _shape(step.node.outputs[0], batch_size, shapes)
      size = math.prod(shape)
    elif step.kind in ('mha', 'softmax'):
      size = _attention_bytes(step.layer, step, bits,
                              lambda kt: _shape(kt, batch_size, shapes))
    elif step.kind in norm_lib.KINDS + ('smooth_act',) or (
        step.kind in plan_lib.LINEAR_KINDS and step.act):
      size, text = own_bytes(
          step, step.layer, bits, _shape(step.node.input_tensors[0], batch_size, shapes),
          _shape(step.node.outputs[0], batch_size, shapes),
          _itemsize(step.node.input_tensors[0]))
      keeps += text
    for kt in _copy_needs(step):
      kt = links.get(id(kt), kt)
      inner = links.get(id(plan_lib.unpadded(kt)), plan_lib.unpadded(kt))
      if inner is not kt:
        keeps += '; input padded from the copy of its ZeroPadding2D input'
        kt = inner
      if id(kt) in copied:
        continue
      copied.add(id(kt))
      if id(kt) in model_inputs:
        keeps += '; model input referenced (held by the caller)'
        continue
      shape = _shape(kt, batch_size, shapes)
      q = bits if codecs.quantizable(kt) else 0
      size += codecs.copy_bytes(shape, q, _itemsize(kt)) * shape[0]
      keeps += f'; {q or 32}-bit copy of input {kt.shape}'
    name = getattr(step.layer, 'name', type(step.layer).__name__)
    out.append(dict(layer=name, kind=kind_label(step), keeps=keeps,
                    bytes=int(size),
                    reason=step.reason))
  return out


def _itemsize(t):
  return tf.as_dtype(t.dtype).size


def _codec_bytes(shape, codec):
  """Bytes of a copy made by :class:`blpa.keras.leaves.Registry`."""
  shape = [int(d) for d in shape]
  if isinstance(codec, codecs.MinMax):
    return codecs.copy_bytes(shape, codec.bits) * shape[0]
  if isinstance(codec, codecs.Exact):
    return codecs.copy_bytes(shape, 0, _itemsize(codec.x)) * shape[0]
  return 0


def _leaf_rows(bits, record, paths):
  """Rows of the leaf-layer calls seen while tracing (``paths``: the names
  of :func:`blpa.keras.leaves.paths_of`)."""
  out = []
  for row in record:
    step, layer = row['step'], row['layer']
    shape = [int(d) for d in row['inputs'][0].shape]
    size = sum(_codec_bytes(s, c) for s, c in row['copies'])
    keeps = _WHAT.get(step.kind, 'shapes only')
    if step.kind in ('relu', 'dropout', 'maxpool_mask', 'gmp'):
      size += codecs.mask_bytes(shape) * shape[0]
    elif step.kind == 'maxpool_offsets':
      size += math.prod(layer.compute_output_shape(shape))
    elif step.kind in ('mha', 'softmax'):
      size += _attention_bytes(layer, step, bits,
                               lambda t: [int(d) for d in t.shape])
    elif step.kind in norm_lib.KINDS or step.act:
      extra, text = own_bytes(
          step, layer, bits, shape,
          [int(d) for d in row.get('output_shape') or shape],
          row['inputs'][0].dtype.size)
      size += extra
      keeps += text
    elif step.kind == 'bn_act':
      itemsize = row['inputs'][0].dtype.size
      size += codecs.copy_bytes(shape, bits, itemsize) * shape[0]
      keeps = (f'{bits}-bit codes of the BN output (a ReLU layer after it '
               'reuses them)' if bits else 'exact copy of the BN input')
    if row['copies']:
      keeps += '; copy of its input'
    out.append(dict(layer=paths.get(id(layer)) or layer.name,
                    kind=kind_label(step), keeps=keeps, bytes=int(size),
                    reason=step.reason))
  return out


def coverage(compressed, batch_size, inputs=None, input_shapes=None):
  """``(plain, compressed)``: bytes that one training step keeps for
  backward with the original model and with the compressed one
  (:func:`blpa.keras.kept_bytes`)."""
  sample = kept_lib.sample_inputs(compressed, batch_size, inputs,
                                  input_shapes)
  original = compressed._blpa_original  # pylint: disable=protected-access
  plain = kept_lib.kept_bytes(original, batch_size, inputs=sample)['total']
  ours = kept_lib.kept_bytes(compressed, batch_size, inputs=sample)['total']
  return plain, ours


def _size(nbytes):
  if nbytes >= 2**20:
    return f'{nbytes / 2**20:.1f} MiB'
  return f'{nbytes / 2**10:.1f} KiB'


def report(compressed, batch_size, inputs=None, input_shapes=None):
  """A text table: per layer what it keeps, its bytes, and why a layer took
  the generic path or kept its ordinary gradient.

  Args:
    compressed: a model from :func:`blpa.keras.compress`.
    batch_size: batch size for the byte counts.
    inputs: a sample batch, for inputs whose shapes the model does not know
      (a subclassed model, a sequence length ``None``).
    input_shapes: or those shapes without the batch dimension, in the
      structure of the inputs.

  Returns:
    The report as a string.
  """
  table = rows(compressed, batch_size, inputs, input_shapes)
  original = compressed._blpa_original  # pylint: disable=protected-access
  lines = [f'blpa.keras.compress(bits={compressed.bits}) of '
           f'{original.name!r}, batch {batch_size}',
           f'{"layer":32s} {"kind":10s} {"bytes":>12s}  keeps']
  for row in table:
    why = f'  [{row["reason"]}]' if row['reason'] else ''
    lines.append(f'{row["layer"][:32]:32s} {row["kind"]:10s} '
                 f'{row["bytes"]:12d}  {row["keeps"]}{why}')
  total = sum(r['bytes'] for r in table)
  kinds = {}
  for row in table:
    kinds[row['kind']] = kinds.get(row['kind'], 0) + 1
  lines.append(f'total kept: {total} bytes ({total / 2**20:.1f} MiB); '
               + ', '.join(f'{k}: {v}' for k, v in sorted(kinds.items())))
  lines.append(EAGER_NOTE)
  plain, ours = coverage(compressed, batch_size, inputs, input_shapes)
  ratio = f'{plain / ours:.1f}x less' if ours else 'nothing kept'
  lines.append(
      f'coverage: one training step keeps {_size(plain)} for backward with '
      f'plain Keras, {_size(ours)} compressed ({ratio}; '
      'blpa.keras.kept_bytes, glue ops included)')
  return '\n'.join(lines)

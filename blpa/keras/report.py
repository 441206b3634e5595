"""``report(compressed, batch_size)``: what each layer keeps for backward."""

from blpa.keras import codecs, plan as plan_lib

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
    'maxpool': 'MaxPoolGrad on the restored input',
    'maxpool_mask': 'argmax mask (1 bit per input value)',
    'relu': 'mask (1 bit per value)',
    'dropout': 'mask (1 bit per value)',
    'model': 'nested model (its layers are listed)',
    'act_done': 'run with the BatchNormalization before it',
    'generic': 'generic: recomputed from copies of its inputs',
    'ordinary': "Keras's own gradient (keeps what Keras keeps)",
}


def _shape(kt, batch):
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


def _copy_needs(step):
  """KerasTensors whose compact copy a step's backward reads."""
  if step.kind in plan_lib.LINEAR_KINDS:
    trained = plan_lib.kernels_trained(step.kind, step.layer)
    return list(step.node.input_tensors[:1]) if trained else []
  if step.kind in ('maxpool', 'generic'):
    return list(step.node.input_tensors)
  return []


def rows(compressed, batch_size):
  """Per node: a dict with ``layer``, ``kind``, ``keeps``, ``bytes``,
  ``reason`` (bytes for a batch of ``batch_size``)."""
  bits = compressed.bits
  steps = compressed.plan
  links = _outer_links(steps)
  model_inputs = {id(t) for t in compressed.source.inputs}
  copied = {id(s.act_node.outputs[0] if s.act_node else s.node.outputs[0])
            for s in steps if s.kind == 'bn_act'}
  out = []
  for step in steps:
    keeps, size = _WHAT.get(step.kind, 'shapes only'), 0
    if step.kind == 'bn_act':
      shape = _shape(step.node.outputs[0], batch_size)
      size = codecs.copy_bytes(shape, bits) * batch_size
      if bits:
        keeps = f'{bits}-bit codes of the BN output, exact {step.act} mask'
      else:
        keeps = 'exact copy of the BN input'
      if step.act == 'relu6':
        size += codecs.mask_bytes(shape) * batch_size
        keeps += ' + upper mask (1 bit)'
    elif step.kind in ('relu', 'dropout', 'maxpool_mask'):
      kt = step.node.input_tensors[0]
      size = codecs.mask_bytes(_shape(kt, batch_size)) * batch_size
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
      shape = _shape(kt, batch_size)
      q = bits if codecs.quantizable(kt) else 0
      size += codecs.copy_bytes(shape, q) * batch_size
      keeps += f'; {q or 32}-bit copy of input {kt.shape}'
    name = getattr(step.layer, 'name', type(step.layer).__name__)
    out.append(dict(layer=name, kind=step.kind, keeps=keeps, bytes=int(size),
                    reason=step.reason))
  return out


def report(compressed, batch_size):
  """A text table: per layer what it keeps, its bytes, and why a layer took
  the generic path or kept its ordinary gradient.

  Args:
    compressed: a model from :func:`blpa.keras.compress`.
    batch_size: batch size for the byte counts.

  Returns:
    The report as a string.
  """
  table = rows(compressed, batch_size)
  lines = [f'blpa.keras.compress(bits={compressed.bits}) of '
           f'{compressed.source.name!r}, batch {batch_size}',
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
  return '\n'.join(lines)

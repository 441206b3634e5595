"""Compact wrappers for the leaf layers of subclassed models and custom layers.

A subclassed model (or a custom layer) has no graph to walk: its ``call`` is
Python code that calls sublayers and glue ops (``x + h``,
``keras.ops.relu``). For the duration of one call of the compressed model,
:class:`Interceptor` replaces the ``call`` of each leaf layer it reaches
(through the tracked sublayers of models and custom layers) by a function
that runs the layer through its wrapper (:mod:`blpa.keras.wrappers`), the
kind chosen per call by :func:`blpa.keras.plan.step_of`. ``Layer.__call__``
itself is untouched (autocasting, masks, the training flag), and the patch is
removed when the call returns, so the original model, called directly,
behaves exactly as before. Glue ops keep their ordinary gradient (an add
keeps nothing; a ``keras.ops.relu`` keeps its output).

Copies are shared by tensor identity (:class:`Registry`): a tensor that two
layers read is copied once, and a ReLU layer's output reuses the codes of
the BatchNormalization before it.
"""

import weakref

import keras
import tensorflow as tf
from keras.src import backend as keras_backend
from keras.src import tree

from blpa.keras import activations as activations_lib, attention, codecs, \
    norm as norm_lib, plan as plan_lib, wrappers


class ActOf:
  """The codec of a ReLU/ReLU6 output read from the BN copy of its input.

  Args:
    inner: the :class:`blpa.keras.wrappers.BatchNormCopy` of the input.
    act: ``'relu'`` or ``'relu6'``.
  """

  def __init__(self, inner, act):
    self.inner, self.act, self.bits = inner, act, inner.bits

  def restore(self):
    out = tf.nn.relu(self.inner.restore())
    return tf.minimum(out, tf.cast(6.0, out.dtype)) if self.act == 'relu6' \
        else out

  def restore_rows(self, start, stop):
    """Rows ``start:stop`` of :meth:`restore` (the BN copy restores the
    activation's output directly)."""
    return self.inner.restore_rows(start, stop, act=self.act)

  def tensors(self):
    return []


class Registry:
  """Compact copies of the tensors of one compressed call, by identity.

  Args:
    bits: bits of the copies.
    exact: tensors kept exactly (the model's inputs, held by the caller).
  """

  def __init__(self, bits, exact=()):
    self.bits = bits
    self._copies = {}
    self.made = []  # (tensor shape, codec) of every copy made here
    for t in exact:
      if tf.is_tensor(t):
        self.put(t, codecs.Exact(t))

  def get(self, x):
    """The copy registered for ``x``, else None."""
    entry = self._copies.get(id(x))
    if entry is not None and entry[0]() is x:
      return entry[1]
    return None

  def put(self, x, codec):
    """Registers ``codec`` as the copy of ``x``."""
    self._copies[id(x)] = (weakref.ref(x), codec)

  def copy_of(self, x):
    """The shared copy of ``x`` (made on first use)."""
    codec = self.get(x)
    if codec is None:
      with tf.name_scope('blpa_copy'):
        codec = codecs.make(tf.stop_gradient(x), self.bits)
      self.put(x, codec)
      self.made.append((x.shape, codec))
    return codec


class _Slot:
  """Marks where a float tensor argument goes (so that a recompute closure
  holds no input tensor)."""

  def __init__(self, index):
    self.index = index


def _is_float(v):
  return tf.is_tensor(v) and v.dtype.is_floating


def _template(args, kwargs):
  """``(template, tensors)``: the call's arguments with each distinct float
  tensor replaced by a :class:`_Slot`, and those tensors (each once)."""
  tensors, index = [], {}

  def slot(v):
    if not _is_float(v):
      return v
    if id(v) not in index:
      index[id(v)] = len(tensors)
      tensors.append(v)
    return _Slot(index[id(v)])

  return tree.map_structure(slot, (list(args), dict(kwargs))), tensors


def _filled(template, values):
  return tree.map_structure(
      lambda v: values[v.index] if isinstance(v, _Slot) else v, template)


def paths_of(roots):
  """``id(layer) -> 'root/.../layer'`` for the layers reached from
  ``roots`` as :func:`leaves_of` reaches them (names for the report)."""
  paths, stack = {}, [(root, root.name) for root in roots]
  while stack:
    layer, path = stack.pop()
    for sub in plan_lib.sublayers(layer):
      if id(sub) in paths:
        continue
      paths[id(sub)] = f'{path}/{sub.name}'
      if not plan_lib.descend_reason(sub):
        stack.append((sub, paths[id(sub)]))
  return paths


def leaves_of(roots, skip=()):
  """The layers reached from ``roots`` through models and custom layers
  (:func:`blpa.keras.plan.descend_reason`), each once, without those in
  ``skip`` (ids)."""
  found, seen, stack = [], set(skip), list(roots)
  while stack:
    layer = stack.pop()
    for sub in plan_lib.sublayers(layer):
      if id(sub) in seen:
        continue
      seen.add(id(sub))
      if plan_lib.descend_reason(sub):
        found.append(sub)
      else:
        stack.append(sub)
  return found


class Interceptor:
  """Gives leaf layers their wrappers for the duration of a ``with`` block.

  Args:
    leaves: the layers to patch (:func:`leaves_of`).
    registry: the :class:`Registry` of the call.
    record: a list to which one row per leaf call is appended (for
      :func:`blpa.keras.report`), or None.
  """

  def __init__(self, leaves, registry, record=None):
    self.leaves = leaves
    self.registry = registry
    self.record = record
    self._saved = []

  def __enter__(self):
    for layer in self.leaves:
      own = layer.__dict__.get('call')
      original = own if own is not None else type(layer).call.__get__(layer)
      self._saved.append((layer, own))
      object.__setattr__(layer, 'call', self._wrapped(layer, original))
    return self

  def __exit__(self, *exc):
    for layer, own in reversed(self._saved):
      if own is None:
        object.__delattr__(layer, 'call')
      else:
        object.__setattr__(layer, 'call', own)
    self._saved = []
    return False

  def _wrapped(self, layer, original):
    def call(*args, **kwargs):
      return self.run(layer, original, args, kwargs)
    return call

  def run(self, layer, original, args, kwargs):
    """Runs one call of a leaf layer through its wrapper."""
    template, tensors = _template(args, kwargs)
    if not tensors:
      return original(*args, **kwargs)
    try:
      step = plan_lib.step_of(layer, plan_lib.CallView(tensors, kwargs))
    except Exception as err:  # pylint: disable=broad-except
      step = plan_lib.Step('ordinary', None, reason=f'analysis failed: {err}')
    single = len(tensors) == 1 and len(args) == 1 and args[0] is tensors[0]
    if step.kind not in ('generic', 'ordinary', 'add', 'concat', 'mha') and \
        not single:
      step = plan_lib.Step('ordinary', None,
                           reason='called with several tensor arguments')
    made = len(self.registry.made)
    out = self._run_kind(step, layer, original, args, kwargs, template,
                         tensors)
    if self.record is not None:
      self.record.append(dict(layer=layer, step=step,
                              copies=self.registry.made[made:],
                              inputs=[tf.TensorSpec(t.shape, t.dtype)
                                      for t in tensors],
                              output_shape=getattr(out, 'shape', None)))
    return out

  def _run_kind(self, step, layer, original, args, kwargs, template,
                tensors):
    kind, bits, registry = step.kind, self.registry.bits, self.registry
    x = tensors[0]
    if kind == 'bn_act':
      training = kwargs.get('training')
      batch_stats = training is True and layer.trainable
      if not isinstance(training, (bool, type(None))):
        return original(*args, **kwargs)
      out, copy = wrappers.run_bn_act(layer, None, None, x, bits, batch_stats)
      registry.put(out, copy)
      return out
    if kind in plan_lib.LINEAR_KINDS:
      codec = registry.copy_of(x) if plan_lib.kernels_trained(
          kind, layer) else None
      return wrappers.run_linear(kind, layer, x, codec, call=original,
                                 act=step.act, bits=bits)
    if kind in norm_lib.KINDS:
      out, copy = norm_lib.run_norm(layer, kind, x, bits, call=original)
      registry.put(out, copy)  # the layers that read ``out`` share it
      return out
    if kind == 'smooth_act':
      return activations_lib.run_activation(layer, x, step.act, bits,
                                            call=original)
    if kind == 'relu':
      out = wrappers.run_masked(layer, x, wrappers.relu_keep(step.act),
                                call=original)
      inner = registry.get(x)
      if isinstance(inner, wrappers.BatchNormCopy) and not inner.act:
        registry.put(out, ActOf(inner, step.act))
      return out
    if kind == 'dropout':
      if kwargs.get('training') is not True or not layer.rate:
        return original(*args, **kwargs)
      return wrappers.run_masked(layer, x, lambda out: out != 0,
                                 1.0 / (1.0 - layer.rate), call=original,
                                 training=True)
    if kind == 'maxpool_mask':
      return wrappers.run_max_pool_mask(layer, x, call=original)
    if kind == 'gmp':
      return wrappers.run_global_max_pool(layer, x, call=original)
    if kind == 'maxpool_offsets':
      return wrappers.run_max_pool_offsets(layer, x, call=original)
    if kind in plan_lib.SHAPE_KINDS or kind in plan_lib.COPY_POOL_KINDS:
      codec = registry.copy_of(x) if kind in plan_lib.COPY_POOL_KINDS \
          else None
      xs = list(args[0]) if kind in ('add', 'concat') else [x]
      return wrappers.run_shape_op(
          kind, layer, xs, codec,
          call=lambda v: original(v, *args[1:], **kwargs))
    if kind == 'mha':
      query, value, key, rest = attention.bind(args, kwargs)
      step.shapes = (query.shape, value.shape,
                     attention.dropout_on(layer, rest))
      return attention.run_attention(layer, query, value, key, rest,
                                     registry.copy_of, bits)
    if kind == 'softmax':
      return attention.run_softmax(layer, x, bits, call=original)
    if kind == 'generic':
      kept = [registry.copy_of(t) for t in tensors]
      # The recompute runs outside Layer.__call__: in the same autocast
      # scope as the forward (mixed precision).
      scope = keras_backend.get_autocast_scope()
      dtype = scope.dtype if scope is not None else None

      def recompute(values):
        a, k = _filled(template, values)
        with keras_backend.AutocastScope(dtype):
          return original(*a, **k)

      return wrappers.run_generic(recompute, tensors, kept,
                                  list(layer.trainable_variables),
                                  wrappers.seed_states(layer))
    return original(*args, **kwargs)

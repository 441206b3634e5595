"""Memory-efficient training of a width-2 residual network on one device.

The API is the reference implementation's::

    from blpa import graph
    net = graph.Graph(graph.SimpleData([128, 32, 32, 3]), graph.LogLoss())
    net.add(3, 16, 1, 'SAME', graph.NLDef(False, False, False, None, False))
    ...
    net.close(qtype=4, WD=2e-4)
    acc, loss = net.forward(x, y)
    net.backward(lr)

``forward`` computes the network exactly and keeps, per layer, a K-bit copy
of its activation (``qtype`` 4 or 8) or a full copy (``qtype`` 0) in device
variables; ``backward`` walks the layers from last to first with
hand-written gradients that read those copies, restoring one layer at a time,
and applies momentum SGD.  Layers that are not BN+ReLU, the max-pool layer
and the last layer always keep full-precision copies (their activations
cannot be restored with an exact ReLU mask from K-bit codes).
"""

import math
import warnings

import numpy as np
import tensorflow as tf

from blpa import checkpoint
from blpa import layers as layers_lib
from blpa import storage as storage_lib
from blpa.layers import LogLoss, NLDef, SimpleData  # pylint: disable=unused-import

MOMENTUM = 0.9
#: What an update does when its loss, learning rate or gradients are not
#: finite (see ``Graph.on_nonfinite``).
NONFINITE_MODES = ('skip', 'raise')
SUM = tf.VariableAggregation.SUM
MEAN = tf.VariableAggregation.MEAN
NONE = tf.VariableAggregation.NONE


class Graph:
  """A residual network trained with backprop on approximate activations.

  Args:
    data_layer: a :class:`SimpleData` giving the input shape.
    loss_layer: a :class:`LogLoss`.
  """

  _on_nonfinite = 'skip'
  _pending_loss = 0.0
  _spoiled = None

  @property
  def on_nonfinite(self):
    """What ``backward``/``hback``/``cback`` do when an update is not finite.

    An update is not finite when the loss of its ``forward`` is NaN or
    infinite, the learning rate is, or a gradient is (checked on the
    device inside the compiled backward pass).  The weights and momentum
    are then left untouched, and

    * ``'skip'`` (the default): the update is skipped with a
      ``RuntimeWarning`` saying why, and training can go on;
    * ``'raise'``: ``FloatingPointError`` is raised.

    With ``multi`` sub-batches, a non-finite sub-batch (its loss at
    ``hback``, or any accumulated gradient at ``cback``) skips the whole
    update: ``cback`` applies nothing (``binit`` starts afresh).
    """
    return self._on_nonfinite

  @on_nonfinite.setter
  def on_nonfinite(self, mode):
    if mode not in NONFINITE_MODES:
      raise ValueError("Graph.on_nonfinite must be 'skip' or 'raise', got "
                       f'{mode!r}')
    self._on_nonfinite = mode

  def __init__(self, data_layer, loss_layer):
    if not isinstance(data_layer, SimpleData):
      raise TypeError('Graph: data_layer must be a SimpleData, got '
                      f'{type(data_layer).__name__}')
    if not isinstance(loss_layer, LogLoss):
      raise TypeError('Graph: loss_layer must be a LogLoss, got '
                      f'{type(loss_layer).__name__}')
    self.input_shape = list(data_layer.shape)
    self.device_batch = self.input_shape[0]
    self.layers = []
    self.closed = False
    self._shape = tuple(data_layer.shape[1:])
    self._residual = None
    self._functions = {}
    self._pending_backward = False
    self._accumulated = None

  # --------------------------------------------------------------------------
  # Definition
  # --------------------------------------------------------------------------

  def add(self, ksz, out_ch, stride, pad, nldef):
    """Appends a layer: pre-activation block ``nldef``, then a convolution.

    Args:
      ksz: kernel size (square).
      out_ch: output channels.
      stride: convolution stride.
      pad: ``'SAME'`` or ``'VALID'``.
      nldef: an :class:`NLDef`.

    Returns:
      The new layer's index.

    Raises:
      ValueError: naming the layer and the problem, for a spec that cannot
        be built (see :func:`blpa.layers.make_layer`).
    """
    if self.closed:
      raise ValueError('Graph.add: the graph is closed; add layers before '
                       'close()')
    layer, self._residual = layers_lib.make_layer(
        len(self.layers), ksz, out_ch, stride, pad, nldef, self._shape,
        self._residual)
    self.layers.append(layer)
    self._shape = layer.out_shape
    return layer.index

  def close(self, qtype=0, WD=1e-4, multi=False):  # pylint: disable=invalid-name
    """Finishes the network and creates its variables.

    Args:
      qtype: bits per stored activation: 0 (full precision), 8 or 4. At 4 or
        8, only BN+ReLU layers without max pool, other than the last, keep
        K-bit copies; every other layer keeps a full-precision copy.
      WD: weight decay on convolution kernels.
      multi: sub-batches per update for ``binit``/``hback``/``cback``
        (``False`` or an integer ≥ 1).

    Raises:
      ValueError: for a bad qtype, WD or multi, an empty network, a
        residual never joined, or a last layer whose output is not 1x1.
    """
    if self.closed:
      raise ValueError('Graph.close: the graph is already closed')
    self._check_close(qtype, WD, multi)
    self.qtype = int(qtype)
    self.weight_decay = float(WD)
    self.multi = int(multi) if multi else 1
    self.num_classes = self.layers[-1].out_ch
    last = len(self.layers) - 1
    for layer in self.layers:
      eligible = (layer.nl.bn and layer.nl.relu and not layer.nl.maxpool
                  and layer.index != last)
      layer.bits = self.qtype if eligible else 0
    self._make_variables()
    self.closed = True

  def _check_close(self, qtype, wd, multi):
    if not self.layers:
      raise ValueError('Graph.close: the network has no layers')
    if isinstance(qtype, bool) or qtype not in layers_lib.QTYPES:
      raise ValueError(f'Graph.close: qtype must be 0, 4 or 8, got {qtype!r}')
    if not np.isscalar(wd) or not np.isfinite(wd) or wd < 0:
      raise ValueError(f'Graph.close: WD must be a number >= 0, got {wd!r}')
    if multi is not False and multi is not None and (
        isinstance(multi, bool) or not isinstance(multi, (int, np.integer))
        or multi < 1):
      raise ValueError('Graph.close: multi must be False or an integer >= 1, '
                       f'got {multi!r}')
    if self._residual is not None:
      raise ValueError(f'Graph.close: the residual from layer '
                       f'{self._residual[1]} is never joined (no later layer '
                       'has res_in)')
    h, w, _ = self._shape
    if (h, w) != (1, 1):
      raise ValueError(f'Graph.close: {self.layers[-1].describe()} outputs '
                       f'{h}x{w} but LogLoss needs 1x1 (use avpool or a VALID '
                       'convolution covering the input)')

  def _make_variables(self):
    """Weights, momentum, saved-activation storage and running BN stats."""
    self.params = []
    self.weights = []
    self.weight_names = []
    for layer in self.layers:
      params = {}
      for name, shape in layer.param_shapes():
        params[name] = tf.Variable(_initial(layer, name, shape, self.layers),
                                   name=f'l{layer.index}_{name}')
        self.weights.append(params[name])
        self.weight_names.append(f'layer {layer.index} {name}')
      self.params.append(params)
    self.loss_bias = tf.Variable(tf.zeros([self.num_classes]),
                                 name='loss_bias')
    self.weights.append(self.loss_bias)
    self.weight_names.append('loss bias')
    self.momentum = [_zeros_like(w, 'momentum') for w in self.weights]
    self.accumulators = ([per_device(tf.zeros_like(w), SUM)
                          for w in self.weights] if self.multi > 1 else None)
    self.saved = [self._make_storage(layer) for layer in self.layers]
    self.running = [
        (per_device(tf.zeros([l.in_ch]), MEAN),
         per_device(tf.ones([l.in_ch]), MEAN))
        if l.has_scale else None for l in self.layers]
    self.loss_grad = per_device(tf.zeros([0, 1, 1, self.num_classes]), NONE,
                                shape=[None, 1, 1, self.num_classes])

  def _make_storage(self, layer):
    """Variables that hold what a layer saves between forward and backward."""
    h, w, c = layer.in_shape
    if layer.bits:
      act = self._code_storage(h, w, -(-c * layer.bits // 8))
    else:
      act = per_device(tf.zeros([0, h, w, c]), NONE, shape=[None, h, w, c])
    storage = {'act': act}
    if layer.has_scale:
      storage['sigma'] = per_device(tf.ones([c]), NONE)
    if layer.bits:
      storage['offset'] = per_device(tf.zeros([c]), NONE)
    return storage

  @staticmethod
  def _code_storage(height, width, nbytes):
    """Storage of a layer's K-bit codes: ``nbytes`` uint8 per pixel.

    Returns:
      An object with ``assign(codes, read_value=False)`` and
      ``read_value()``, as a variable has.
    """
    return per_device(tf.zeros([0, height, width, nbytes], tf.uint8), NONE,
                      shape=[None, height, width, nbytes])

  # --------------------------------------------------------------------------
  # Forward
  # --------------------------------------------------------------------------

  def forward(self, x, y=None, train=True, bn='batch'):
    """Runs the network on a batch.

    Args:
      x: float ``[B, H, W, C]`` (numpy array or tensor); H, W, C as given to
        :class:`SimpleData`, any batch size B.
      y: integer labels ``[B, 1, 1, 1]`` (or ``[B]``), or None.
      train: with labels, keep the activation copies for ``backward`` /
        ``hback`` and update the running BN statistics.  ``False`` only
        evaluates.
      bn: ``'batch'`` normalizes with the batch's statistics (the
        reference's behaviour, also in evaluation); ``'running'`` with the
        running statistics kept during training (not with ``train``).

    Returns:
      ``(accuracy, loss)`` as Python floats when ``y`` is given, else the
      softmax probabilities as a numpy array ``[B, classes]``.

    Raises:
      ValueError: for inputs or labels of the wrong shape, labels out of
        range, or an unknown ``bn`` mode.
    """
    self._check_mode(y, train, bn)
    x = self._check_input(x)
    y = None if y is None else self._check_labels(y, x.shape[0])
    return self._forward(x, y, train, bn)

  def _check_mode(self, y, train, bn):
    """Checks ``forward``'s mode arguments before its inputs."""
    self._check_closed('forward')
    if bn not in ('batch', 'running'):
      raise ValueError(f"forward: bn must be 'batch' or 'running', got {bn!r}")
    if y is not None and train and bn != 'batch':
      raise ValueError("forward: train=True needs bn='batch' (training "
                       'normalizes with batch statistics)')

  def _forward(self, x, y, train, bn):
    """``forward`` on checked inputs, as the compiled functions take them."""
    if y is None:
      return self._function('predict', bn)(x).numpy()
    if train:
      acc, loss = self._function('train', bn)(x, y)
      self._pending_backward = True
      self._pending_loss = float(loss)
    else:
      acc, loss = self._function('eval', bn)(x, y)
    return float(acc), float(loss)

  def _function(self, kind, bn):
    """The tf.function for one kind of call, traced once per kind."""
    key = (kind, bn)
    if key not in self._functions:
      x_spec = tf.TensorSpec([None] + self.input_shape[1:], tf.float32)
      y_spec = tf.TensorSpec([None], tf.int32)
      running = bn == 'running'
      if kind == 'predict':
        fn = lambda x: self._predict(x, running)
        signature = [x_spec]
      elif kind == 'eval':
        fn = lambda x, y: self._evaluate(x, y, running)
        signature = [x_spec, y_spec]
      else:
        fn = self._train_forward
        signature = [x_spec, y_spec]
      self._functions[key] = self._compile(kind, bn, fn, signature)
    return self._functions[key]

  def _compile(self, kind, bn, fn, signature):  # pylint: disable=unused-argument
    """Compiles one kind of forward call (``fn`` runs on one device).

    Args:
      kind: ``'predict'``, ``'eval'`` or ``'train'``.
      bn: ``'batch'`` or ``'running'``.
      fn: the function of one device's inputs.
      signature: its input signature.

    Returns:
      The callable that ``_forward`` calls.
    """
    return tf.function(fn, input_signature=signature)

  def _run_layers(self, x, save, running=False):
    """Forward through all layers.

    Each layer starts only once the previous layer's copies are stored
    (a control dependency), so that at most one layer's full-size
    temporaries are alive at a time, whatever the executor's scheduling.

    Args:
      x: input batch.
      save: store each layer's copies and update running BN statistics.
      running: normalize with running statistics.

    Returns:
      The last convolution output.
    """
    buf, stored = None, []
    if save:
      stored = [self._fit_storage(tf.shape(x)[0])]
    for layer, params, storage, stats in zip(self.layers, self.params,
                                             self.saved, self.running):
      values = {k: v.read_value() for k, v in params.items()}
      bn_stats = (stats[0].read_value(), stats[1].read_value()) if (
          running and stats) else None
      with tf.control_dependencies(stored):
        x = tf.identity(x)
      x, buf, saved, moments = layers_lib.forward(layer, values, x, buf,
                                                  bn_stats, save)
      if save:
        stored = [_store(storage[k], v, k == 'act' and layer.bits)
                  for k, v in saved.items()]
        if moments is not None:
          _update_running(stats, moments)
    return x

  def _code_variables(self):
    """The variables that hold the K-bit codes."""
    return [batch_variable(saved['act'])
            for layer, saved in zip(self.layers, self.saved) if layer.bits]

  def _fit_storage(self, batch):
    """Sizes every code variable for ``batch``, all at once, if needed.

    Allocated together before the first layer runs, and then written in
    place, the codes lie side by side instead of in the holes that the
    forward pass's temporaries leave (:mod:`blpa.storage`).  Full-precision
    copies are assigned as usual: copying them in place would cost as many
    bytes as the activations themselves.

    Returns:
      The op to wait on.
    """
    return tf.group([storage_lib.resize(var, batch)
                     for var in self._code_variables()])

  def _train_forward(self, x, y):
    out = self._run_layers(x, save=True)
    acc, loss, grad = layers_lib.loss_forward(out, self.loss_bias, y)
    self.loss_grad.assign(grad)
    return acc, loss

  def _evaluate(self, x, y, running):
    out = self._run_layers(x, save=False, running=running)
    acc, loss, _ = layers_lib.loss_forward(out, self.loss_bias, y)
    return acc, loss

  def _predict(self, x, running):
    out = self._run_layers(x, save=False, running=running)
    return layers_lib.predictions(out, self.loss_bias)

  def _check_input(self, x):
    x = tf.convert_to_tensor(x)
    if not (x.dtype.is_floating or x.dtype.is_integer):
      raise ValueError(f'forward: x must be numeric, got dtype {x.dtype.name}')
    want = self.input_shape[1:]
    if x.shape.rank != 4 or list(x.shape[1:]) != want or x.shape[0] == 0:
      raise ValueError(f'forward: x must have shape [B, {want[0]}, {want[1]}, '
                       f'{want[2]}] with B >= 1 (as given to SimpleData), got '
                       f'{x.shape.as_list()}')
    return tf.cast(x, tf.float32)

  def _check_labels(self, y, batch):
    y = np.asarray(y.numpy() if tf.is_tensor(y) else y)
    if y.shape not in ((batch,), (batch, 1), (batch, 1, 1, 1)):
      raise ValueError(f'forward: labels must have shape [{batch}, 1, 1, 1] '
                       f'(or [{batch}]) for a batch of {batch}, got '
                       f'{list(y.shape)}')
    if y.dtype.kind not in 'iu':
      if y.dtype.kind != 'f' or not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError(f'forward: labels must be integers, got {y.dtype}')
    y = y.reshape(batch).astype(np.int64)
    if y.min() < 0 or y.max() >= self.num_classes:
      raise ValueError(f'forward: labels must be in [0, {self.num_classes}), '
                       f'got values from {y.min()} to {y.max()}')
    return tf.constant(y, tf.int32)

  def _check_closed(self, what):
    if not self.closed:
      raise ValueError(f'{what}: call close() first')

  # --------------------------------------------------------------------------
  # Backward
  # --------------------------------------------------------------------------

  def _backward_pass(self, consume):
    """Walks the layers from last to first, handing each gradient on.

    Each layer's saved copy is read only once the gradients reaching it and
    the weight gradients of the layer after it are computed (control
    dependencies), so one layer at a time is restored to full size; each
    weight is read before ``consume`` may update it.

    Args:
      consume: called as ``consume(index, grad)`` with the position of a
        weight in ``self.weights`` and its gradient.
    """
    grad = self.loss_grad.read_value()
    consume(len(self.weights) - 1, tf.reduce_sum(grad, axis=[0, 1, 2]))
    rgrad, done = None, []
    index = len(self.weights) - 1
    for layer, params, storage in reversed(list(zip(self.layers, self.params,
                                                    self.saved))):
      index -= len(params)
      waits = [t for t in [grad, rgrad] + done if t is not None]
      with tf.control_dependencies(waits):
        saved = {k: v.read_value() for k, v in storage.items()}
        values = {k: v.read_value() for k, v in params.items()}
      grads, grad, rgrad = layers_lib.backward(layer, values, saved, grad,
                                               rgrad, self.weight_decay)
      done = list(grads.values())
      for offset, name in enumerate(params):
        consume(index + offset, grads[name])

  def _apply(self, index, grad, lr):
    tf.raw_ops.ResourceApplyMomentum(
        var=self.weights[index].handle, accum=self.momentum[index].handle,
        lr=lr, grad=grad, momentum=MOMENTUM, use_locking=False,
        use_nesterov=False)

  def _each_device(self, fn, *args):
    """Runs ``fn(*args)`` on every device (here: the one device).

    Returns:
      What ``fn`` returns (on one device, whichever).
    """
    return fn(*args)

  def _total(self, grad, count=1):
    """The mean of ``grad`` over devices and ``count`` sub-batches.

    Args:
      grad: this device's gradient, summed over ``count`` sub-batches.
      count: sub-batches summed into ``grad``.

    Returns:
      The gradient of one update, the same on every device.
    """
    return grad / float(count) if count > 1 else grad

  def _apply_if_finite(self, grads, lr):
    """Applies ``grads`` (one per weight) only if they and ``lr`` are finite.

    The check is one all-finite reduction on the device and the updates
    sit in a ``tf.cond``: no host round trip, and weights and momentum are
    untouched when it fails.

    Returns:
      The boolean scalar: whether the update was applied.
    """
    finite = tf.reduce_all(tf.stack(
        [tf.math.is_finite(lr)] +
        [tf.reduce_all(tf.math.is_finite(g)) for g in grads]))

    def apply():
      for i, g in enumerate(grads):
        self._apply(i, g, lr)
      return tf.constant(True)

    return tf.cond(finite, apply, lambda: tf.constant(False))

  def _apply_all(self, lr):
    """Backward pass, then the update if every gradient is finite."""
    return self._apply_if_finite(self._collect_all(), lr)

  def _accumulate_all(self):
    """Backward pass adding gradients to this device's accumulators."""
    self._backward_pass(lambda i, g: self.accumulators[i].assign_add(g))

  def _apply_accumulators(self, lr):
    return self._apply_if_finite(
        [self._total(acc.read_value(), self.multi)
         for acc in self.accumulators], lr)

  def _collect_all(self):
    grads = [None] * len(self.weights)
    self._backward_pass(lambda i, g: grads.__setitem__(i, self._total(g)))
    return grads

  @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
  def _backward_apply(self, lr):
    return self._each_device(self._apply_all, lr)

  @tf.function
  def _backward_accumulate(self):
    self._each_device(self._accumulate_all)

  @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
  def _apply_accumulated(self, lr):
    return self._each_device(self._apply_accumulators, lr)

  @tf.function
  def _backward_collect(self):
    return self._each_device(self._collect_all)

  def _take_pending(self, what):
    """Consumes the pending ``forward``.

    Returns:
      Its loss (a float).
    """
    self._check_closed(what)
    if not self._pending_backward:
      raise ValueError(f'{what}: call forward(x, y) (with labels, train=True) '
                       'first; each forward allows one backward')
    self._pending_backward = False
    return self._pending_loss

  def _nonfinite(self, what, reason):
    """Skips (with a warning) or raises for an update that is not finite.

    Args:
      what: the method, for the message.
      reason: what is not finite.

    Raises:
      FloatingPointError: when ``on_nonfinite`` is ``'raise'``.
    """
    message = (f'{what}: {reason}; the update is skipped, weights and '
               'momentum are unchanged')
    if self.on_nonfinite == 'raise':
      raise FloatingPointError(message + " (on_nonfinite='raise')")
    warnings.warn(message, RuntimeWarning, stacklevel=4)

  def _check_update(self, what, lr, loss=None):
    """Why an update cannot be finite (host-side), or None.

    Args:
      what: the method, for messages.
      lr: the learning rate (a number).
      loss: the loss of the forward the update uses, if any.
    """
    try:
      lr = float(lr)
    except (TypeError, ValueError) as e:
      raise ValueError(f'{what}: lr must be a number, got {lr!r}') from e
    if loss is not None and not math.isfinite(loss):
      return f'the loss of the last forward is {loss}'
    if not math.isfinite(lr):
      return f'the learning rate is {lr}'
    return None

  def _update(self, what, reason, apply, lr, gradient):
    """Runs ``apply(lr)`` (which checks the gradients on the device).

    Args:
      what: the method, for messages.
      reason: why the update cannot be finite (host-side), or None.
      apply: a compiled update returning whether it applied.
      lr: the learning rate.
      gradient: what ``apply`` checks, for the message.

    Returns:
      Whether the update was applied (else see :attr:`on_nonfinite`).
    """
    if reason is None:
      if bool(apply(tf.constant(lr, tf.float32))):
        return True
      reason = f'{gradient} is not finite'
    self._nonfinite(what, reason)
    return False

  def backward(self, lr):
    """Backpropagates the last ``forward`` and applies one momentum update.

    The update is made only if the forward's loss, ``lr`` and every
    gradient are finite; otherwise see :attr:`on_nonfinite`.

    Args:
      lr: learning rate; momentum 0.9 with TF1 semantics
        (``acc = 0.9·acc + grad; w -= lr·acc``).

    Returns:
      Whether the update was applied.

    Raises:
      FloatingPointError: for a non-finite update with
        ``on_nonfinite='raise'``.
    """
    loss = self._take_pending('backward')
    return self._update('backward', self._check_update('backward', lr, loss),
                        self._backward_apply, lr, 'a gradient')

  def binit(self):
    """Starts accumulating gradients over ``multi`` sub-batches."""
    self._check_closed('binit')
    if self.accumulators is None:
      raise ValueError('binit: close(..., multi=k) with k > 1 to accumulate '
                       'gradients over sub-batches')
    for acc in self.accumulators:
      acc.assign(tf.zeros_like(acc))
    self._accumulated = 0
    self._spoiled = None

  def hback(self):
    """Adds the gradients of the last ``forward`` to the accumulators.

    After a non-finite loss nothing is accumulated and the next ``cback``
    skips its update (with ``on_nonfinite='raise'``: raises now, and
    ``binit`` must start again).
    """
    if self._accumulated is None:
      raise ValueError('hback: call binit() first')
    loss = self._take_pending('hback')
    if not math.isfinite(loss):
      reason = f'the loss of sub-batch {self._accumulated + 1} is {loss}'
      if self.on_nonfinite == 'raise':
        self._accumulated = None
        raise FloatingPointError(f'hback: {reason}; the update is abandoned '
                                 "(on_nonfinite='raise'), call binit() again")
      warnings.warn(f'hback: {reason}; it is not accumulated and the next '
                    'cback skips its update', RuntimeWarning, stacklevel=2)
      self._spoiled = reason
    elif self._spoiled is None:
      self._backward_accumulate()
    self._accumulated += 1

  def cback(self, lr):
    """Applies the accumulated gradients, divided by ``multi``.

    The update is made only if every sub-batch's loss, ``lr`` and every
    accumulated gradient are finite; otherwise see :attr:`on_nonfinite`.

    Args:
      lr: learning rate.

    Returns:
      Whether the update was applied.

    Raises:
      ValueError: unless exactly ``multi`` ``hback`` calls followed
        ``binit``.
      FloatingPointError: for a non-finite update with
        ``on_nonfinite='raise'``.
    """
    if self._accumulated != self.multi:
      raise ValueError(f'cback: expected {self.multi} hback() calls since '
                       f'binit() (multi={self.multi}), got {self._accumulated}')
    self._accumulated = None
    return self._update('cback',
                        self._spoiled or self._check_update('cback', lr),
                        self._apply_accumulated, lr, 'an accumulated gradient')

  def gradients(self, x, y):
    """Gradients of the loss (plus weight decay) for one batch, no update.

    Args:
      x, y: a batch, as for :meth:`forward`.

    Returns:
      List of numpy arrays, one per weight in checkpoint order.
    """
    self.forward(x, y)
    self._take_pending('gradients')
    return [g.numpy() for g in self._backward_collect()]

  # --------------------------------------------------------------------------
  # Memory accounting
  # --------------------------------------------------------------------------

  def saved_bytes(self, batch=None):
    """Bytes each layer keeps between forward and backward.

    Args:
      batch: batch size (default: the data layer's).

    Returns:
      List of ``(layer_index, bits, bytes)``; ``bits`` is 0 for a
      full-precision copy.  Per-channel statistics are included.
    """
    self._check_closed('saved_bytes')
    batch = batch or self.device_batch
    out = []
    for layer in self.layers:
      h, w, c = layer.in_shape
      per_pixel = -(-c * layer.bits // 8) if layer.bits else 4 * c
      small = 4 * c * (int(layer.has_scale) + int(bool(layer.bits)))
      out.append((layer.index, layer.bits, batch * h * w * per_pixel + small))
    return out

  # --------------------------------------------------------------------------
  # Checkpoints
  # --------------------------------------------------------------------------

  def save(self, path, niter, state=False):
    """Saves the weights in the reference ``.npz`` format, atomically.

    Args:
      path: file to write (written to a temporary file, then renamed).
      niter: iteration count stored under ``'niter'``.
      state: also store momentum (``'mom_K'``) and running BN statistics
        (``'bnmean_L'``, ``'bnvar_L'``) so that training resumes exactly;
        the reference implementation ignores these keys.

    Raises:
      IsADirectoryError, OSError: naming ``path``, when it is a directory
        or cannot be written; no temporary file is left behind.
    """
    self._check_closed('save')
    arrays = {str(i): w.numpy() for i, w in enumerate(self.weights)}
    arrays['niter'] = np.int64(niter)
    if state:
      arrays.update({f'mom_{i}': m.numpy()
                     for i, m in enumerate(self.momentum)})
      for layer, stats in zip(self.layers, self.running):
        if stats:
          arrays[f'bnmean_{layer.index}'] = stats[0].numpy()
          arrays[f'bnvar_{layer.index}'] = stats[1].numpy()
    checkpoint.write_atomic(path, arrays)

  def load(self, path):
    """Loads weights (and state keys if present) from a checkpoint.

    Args:
      path: an ``.npz`` written by :meth:`save` or by the reference.

    Returns:
      The stored iteration count.

    Raises:
      FileNotFoundError, ValueError: naming the file and the weight that
        does not fit this network.
    """
    self._check_closed('load')
    arrays = checkpoint.read(path)
    checkpoint.check_weights(path, arrays, self.weight_names,
                             [w.shape for w in self.weights])
    for i, w in enumerate(self.weights):
      w.assign(arrays[str(i)])
      if f'mom_{i}' in arrays:
        self.momentum[i].assign(arrays[f'mom_{i}'])
    for layer, stats in zip(self.layers, self.running):
      if stats and f'bnmean_{layer.index}' in arrays:
        stats[0].assign(arrays[f'bnmean_{layer.index}'])
        stats[1].assign(arrays[f'bnvar_{layer.index}'])
    return int(arrays['niter'])


def _initial(layer, name, shape, all_layers):
  """Initial value of a weight, as in the reference."""
  if name == 'scale':
    return tf.ones(shape)
  if name == 'bias':
    return tf.zeros(shape)
  fan_in = layer.ksz * layer.ksz * layer.in_ch
  gain = 1.0 if layer is all_layers[-1] else 2.0
  return tf.random.normal(shape, stddev=np.sqrt(gain / fan_in))


def per_device(initial, aggregation, shape=None):
  """A variable of one device's own state (each device keeps its copy).

  Outside a ``tf.distribute`` scope it is an ordinary variable; inside one
  it is a per-replica (``ON_READ``) variable whose cross-device value is the
  ``aggregation`` of the copies.

  Args:
    initial: initial value.
    aggregation: a ``tf.VariableAggregation`` (SUM, MEAN or NONE).
    shape: the variable's shape, if less specific than ``initial``'s.

  Returns:
    A non-trainable variable.
  """
  return tf.Variable(initial, shape=shape, trainable=False,
                     synchronization=tf.VariableSynchronization.ON_READ,
                     aggregation=aggregation)


def batch_variable(storage):
  """The variable behind a storage object (itself, or its ``var``)."""
  return getattr(storage, 'var', storage)


def _store(storage, value, in_place):
  """Stores one saved tensor (codes ``in_place``, see :mod:`blpa.storage`).

  Args:
    storage: a variable, or a wrapper with ``assign`` (which writes in place
      itself).
    value: the tensor to keep.
    in_place: write into the variable's buffer instead of adopting
      ``value``'s.

  Returns:
    The op to wait on.
  """
  if in_place and isinstance(storage, tf.Variable):
    return storage_lib.write(storage, value)
  return storage.assign(value, read_value=False)


def _zeros_like(var, what):
  return tf.Variable(tf.zeros_like(var), trainable=False,
                     name=f'{var.name.split(":")[0]}_{what}')


def _update_running(stats, moments):
  for var, value in zip(stats, moments):
    var.assign(layers_lib.RUNNING_MOMENTUM * var + (
        1 - layers_lib.RUNNING_MOMENTUM) * value)

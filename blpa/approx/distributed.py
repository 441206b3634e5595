"""Compressed all-reduce of data-parallel gradients for ``weight_topk`` layers.

A layer sampled with ``sampler='weight_topk'`` in forward mode picks its k
input channels from the weights alone, so every replica picks the same ones
and the kernel gradient is exactly zero outside them. One step all-reduces a
single flat buffer holding

- the selected slices ``grad[..., S, :]`` of those kernels,
- the full gradients of every other trainable variable,
- the BatchNormalization moving statistics (averaged every step; Keras keeps
  one copy per replica and would otherwise let them drift apart),

and scatters the slices back into zero gradients: the result equals the full
all-reduce bit for bit. The indices are recomputed from the kernels (the
weights are the same on every replica and unchanged since the forward pass),
so nothing has to be recorded during the forward pass.

Custom training step (``strategy = tf.distribute.MirroredStrategy()``, or
:func:`logical_cpu_strategy` to try it on one CPU)::

  with strategy.scope():
    model = approximate(base, 1 / 3, sampler="weight_topk")
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
  reducer = CompressedAllReduce(model)

  def replica_step(x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True)) / global_batch
    grads = tape.gradient(loss, model.trainable_variables)
    reducer.apply_gradients(optimizer, grads)   # not optimizer.apply_...

  @tf.function
  def train_step(dist_x, dist_y):
    strategy.run(replica_step, (dist_x, dist_y))

With ``fit``: wrap the model as ``CompressedModel(model.inputs,
model.outputs)`` under the scope, then compile and fit it as usual; its
``train_step`` is Keras's with the update replaced (the trained weights are
bit-identical to a plain ``fit``; only the all-reduce is smaller, and the BN
statistics are averaged). :meth:`CompressedAllReduce.bytes_per_step` counts
the buffer. Weight decay and momentum still act on whole kernels, so
unselected channels shrink and are chosen ever less ("rich get richer").
"""

import math
import threading

import keras
import tensorflow as tf

from blpa.approx import convert
from blpa.approx import sampling

__all__ = ["CompressedAllReduce", "CompressedModel", "logical_cpu_strategy"]


def logical_cpu_strategy(devices=2):
  """A MirroredStrategy over the CPU split into logical devices.

  Call before TensorFlow initializes its devices (first thing in a process).

  Args:
    devices: number of logical CPU devices.

  Returns:
    ``tf.distribute.MirroredStrategy`` over ``/cpu:0`` … ``/cpu:{n-1}``.
  """
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
  return tf.distribute.MirroredStrategy(
      [f"/cpu:{i}" for i in range(devices)])


# Per thread: MirroredStrategy runs each replica's function in its own thread.
_SKIP_ALL_REDUCE = threading.local()


def _allow_skipping_all_reduce(optimizer):
  """Lets _SKIP_ALL_REDUCE.on turn off the optimizer's own all-reduce."""
  name = "_all_reduce_sum_gradients"
  if name in vars(optimizer):
    return
  original = getattr(optimizer, name)

  def all_reduce_unless_skipped(grads_and_vars):
    if getattr(_SKIP_ALL_REDUCE, "on", False):
      return grads_and_vars
    return original(grads_and_vars)

  object.__setattr__(optimizer, name, all_reduce_unless_skipped)


def _bn_statistics(model):
  """The moving mean and variance variables of the model's BN layers."""
  stats = []
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      stats += [layer.moving_mean, layer.moving_variance]
  return stats


def _selected_channels(layer):
  """The sorted channels a weight_topk layer keeps (from its kernel)."""
  norms = sampling.column_norms(tf.convert_to_tensor(layer.kernel),
                                layer.kernel_in_axis)
  indices, _ = sampling.draw("weight_topk", norms, layer.num_kept())
  return indices


def _scatter_along(slices, indices, axis, shape):
  """Zeros of ``shape`` with ``slices`` at ``indices`` along ``axis``."""
  perm = [axis] + [a for a in range(len(shape)) if a != axis]
  moved = tf.transpose(slices, perm)
  full = tf.scatter_nd(indices[:, None], moved,
                       [shape[axis]] + [shape[a] for a in perm[1:]])
  inverse = [perm.index(a) for a in range(len(shape))]
  return tf.transpose(full, inverse)


class CompressedAllReduce:
  """All-reduces a model's gradients (and BN statistics) in one flat buffer.

  Args:
    model: a model whose ``weight_topk`` forward-mode layers are compressed.
    compressed: False sends every gradient in full (the baseline).
  """

  def __init__(self, model, compressed=True):
    self.model = model
    self.compressed = compressed
    self._layer_of_kernel = {}
    for layer in convert.approximated_layers(model):
      if compressed and layer.sampler == "weight_topk" and \
          layer.mode == "forward" and layer.num_kept() < \
          layer.kernel.shape[layer.kernel_in_axis]:
        self._layer_of_kernel[id(layer.kernel)] = layer
    self._stats = _bn_statistics(model)

  def _parts(self, grads):
    """Flat pieces of the buffer, and how to put each piece back."""
    parts, layouts = [], []
    for grad, var in zip(grads, self.model.trainable_variables):
      grad = tf.convert_to_tensor(grad)
      layer = self._layer_of_kernel.get(id(var))
      if layer is None:
        parts.append(tf.reshape(grad, [-1]))
        layouts.append((grad.shape, None, None))
        continue
      axis = layer.kernel_in_axis
      indices = _selected_channels(layer)
      kept = tf.gather(grad, indices, axis=axis)
      parts.append(tf.reshape(kept, [-1]))
      layouts.append((kept.shape, indices, (axis, grad.shape)))
    for stat in self._stats:
      parts.append(tf.reshape(tf.convert_to_tensor(stat), [-1]))
    return parts, layouts

  def all_reduce(self, grads):
    """Sums the gradients over replicas; averages and sets the BN statistics.

    Call in replica context (inside ``strategy.run``).

    Args:
      grads: gradients of ``model.trainable_variables`` (per replica).

    Returns:
      The summed gradients, dense, in the same order.
    """
    ctx = tf.distribute.get_replica_context()
    parts, layouts = self._parts(grads)
    sizes = [int(p.shape[0]) for p in parts]
    flat = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.concat(parts, 0))
    pieces = tf.split(flat, sizes)
    reduced = []
    for piece, (shape, indices, scatter) in zip(pieces, layouts):
      piece = tf.reshape(piece, shape)
      if indices is not None:
        piece = _scatter_along(piece, indices, scatter[0], scatter[1])
      reduced.append(piece)
    replicas = float(ctx.num_replicas_in_sync)
    for stat, piece in zip(self._stats, pieces[len(layouts):]):
      stat.assign(tf.reshape(piece / replicas, stat.shape))
    return reduced

  def bytes_per_step(self):
    """Bytes of the flat buffer each replica sends into the all-reduce."""
    total = 0
    for var in self.model.trainable_variables:
      size = math.prod(var.shape)
      layer = self._layer_of_kernel.get(id(var))
      if layer is not None:
        axis = layer.kernel_in_axis
        size = size // var.shape[axis] * layer.num_kept()
      total += size * tf.as_dtype(var.dtype).size
    for stat in self._stats:
      total += math.prod(stat.shape) * tf.as_dtype(stat.dtype).size
    return total

  def apply_gradients(self, optimizer, grads):
    """Compressed all-reduce, then the optimizer's update on every replica.

    Call in replica context (inside ``strategy.run`` or ``train_step``) in
    place of ``optimizer.apply_gradients``, which would all-reduce the full
    gradients again: the optimizer's own all-reduce
    (``_all_reduce_sum_gradients`` of Keras 3's TensorFlow optimizer) is
    turned off for this call.

    Args:
      optimizer: a Keras optimizer created under the strategy.
      grads: this replica's gradients of ``model.trainable_variables``.

    Returns:
      The summed gradients that were applied.
    """
    reduced = self.all_reduce(grads)
    _allow_skipping_all_reduce(optimizer)
    _SKIP_ALL_REDUCE.on = True
    try:
      optimizer.apply_gradients(zip(reduced, self.model.trainable_variables))
    finally:
      _SKIP_ALL_REDUCE.on = False
    return reduced


class CompressedModel(keras.Model):
  """A functional model whose ``fit`` uses :class:`CompressedAllReduce`.

  ``CompressedModel(model.inputs, model.outputs)`` shares the layers (and
  weights) of ``model``; compile and fit it under the same strategy scope.
  Its ``train_step`` is Keras's, with the gradient update replaced by
  :meth:`CompressedAllReduce.apply_gradients`.
  """

  def compile(self, *args, **kwargs):  # pylint: disable=arguments-differ
    super().compile(*args, **kwargs)
    self._reducer = CompressedAllReduce(self)

  def train_step(self, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    with tf.GradientTape() as tape:
      y_pred = self(x, training=True)
      loss = self.compute_loss(x=x, y=y, y_pred=y_pred,
                               sample_weight=sample_weight, training=True)
      self._loss_tracker.update_state(  # pylint: disable=protected-access
          keras.src.losses.loss.unscale_loss_for_distribution(loss),
          sample_weight=tf.shape(tf.nest.flatten(x)[0])[0])
      loss = self.optimizer.scale_loss(loss)
    grads = tape.gradient(loss, self.trainable_variables)
    self._reducer.apply_gradients(self.optimizer, grads)
    return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

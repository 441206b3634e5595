"""Peak memory of a training step: blpa, its autodiff twin and Keras.

On CPU the figures come from TensorFlow's BFC allocator, which keeps peak
statistics only when the process starts with ``TF_CPU_ALLOCATOR_USE_BFC=true``
(set before TensorFlow is imported); on GPU from ``get_memory_info('GPU:0')``.
The trainers here (:class:`AutodiffTrainer`, :class:`KerasTrainer`) are the
baselines of ``bench/``; :func:`peak_breakdown` accounts for blpa's peak.
Used by the memory test and by ``bench/``.
"""

import os
import time

import numpy as np
import tensorflow as tf

from blpa import autodiff, models


def device_name():
  """``'GPU:0'`` when a GPU is visible, else ``'CPU:0'``."""
  return 'GPU:0' if tf.config.list_physical_devices('GPU') else 'CPU:0'


def check_allocator():
  """Raises unless peak statistics are available on CPU."""
  if (device_name() == 'CPU:0' and
      os.environ.get('TF_CPU_ALLOCATOR_USE_BFC', '').lower() != 'true'):
    raise RuntimeError('CPU memory statistics need TF_CPU_ALLOCATOR_USE_BFC='
                       'true in the environment before TensorFlow starts')


def peak_bytes(step, repeats=3):
  """Peak allocator bytes of one call of ``step()``, the worst of several.

  The executor's scheduling decides which temporaries coexist, so the peak
  varies a little from step to step; the largest of ``repeats`` steps
  (after one warm-up step) is reported.

  Args:
    step: a callable running one training step.
    repeats: measured steps.

  Returns:
    Peak bytes in use, including everything resident (weights, optimizer
    state, stored activations).
  """
  check_allocator()
  device = device_name()
  step()  # trace and allocate persistent buffers
  peaks = []
  for _ in range(repeats):
    tf.config.experimental.reset_memory_stats(device)
    step()
    peaks.append(tf.config.experimental.get_memory_info(device)['peak'])
  return max(peaks)


def step_times(step, steps, warmup=1):
  """Wall-clock seconds of ``steps`` calls of ``step()`` after warm-up.

  Args:
    step: a callable running one training step (it must return only once
      the step's results are computed, as the callables of
      :func:`step_function` do).
    steps: timed calls.
    warmup: untimed calls first (tracing, allocation).

  Returns:
    List of ``steps`` durations in seconds.
  """
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


class AutodiffTrainer:
  """Plain GradientTape training of a blpa network's twin (the baseline).

  Args:
    net: a closed :class:`blpa.graph.Graph`; its layers and initial weights
      are copied into ordinary variables.
    recompute: wrap each residual stage in ``tf.recompute_grad``.
  """

  def __init__(self, net, recompute=False):
    self.layers = net.layers
    self.weight_decay = net.weight_decay
    self.recompute = recompute
    self.weights = [tf.Variable(w) for w in net.weights]
    self.momentum = [tf.Variable(tf.zeros_like(w)) for w in net.weights]
    shape = [None] + net.input_shape[1:]
    self.step = tf.function(self._step, input_signature=[
        tf.TensorSpec(shape, tf.float32), tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([], tf.float32)])

  def _step(self, x, y, lr):
    with tf.GradientTape() as tape:
      objective, acc, xent = autodiff.loss(self.layers, self.weights, x, y,
                                           self.weight_decay, self.recompute)
    grads = tape.gradient(objective, self.weights)
    for w, m, g in zip(self.weights, self.momentum, grads):
      tf.raw_ops.ResourceApplyMomentum(var=w.handle, accum=m.handle, lr=lr,
                                       grad=g, momentum=0.9,
                                       use_locking=False, use_nesterov=False)
    return acc, xent


class KerasTrainer:
  """The same network as a ``tf.keras`` model, trained as a Keras user would.

  :func:`blpa.models.keras_cifar_resnet` (pool+pad shortcut: the same
  network as blpa's), ``GradientTape`` over ``model(x, training=True)``,
  sparse softmax cross-entropy on the logits plus the model's L2 kernel
  regularizers (``model.losses``), Keras ``SGD(momentum=0.9)``; the step is
  one ``tf.function``.

  With ``recompute``, the model is cut into segments at the residual
  joins (the stem convolution, each bottleneck block up to its ``Add``, the
  classifier head) — sub-models sharing the full model's layers, whose
  input is the one tensor passed between blocks — and each segment is
  wrapped in ``tf.recompute_grad``, as ``AutodiffTrainer(recompute=True)``
  wraps each residual stage.  (Recomputation re-runs the BN layers, so
  their moving statistics are updated twice per step.)

  Args:
    rblocks: bottleneck blocks per stage.
    input_shape: ``[B, H, W, C]`` of the batch.
    num_classes: output classes.
    weight_decay: L2 weight decay on the kernels.
    lr: learning rate.
    recompute: wrap each segment in ``tf.recompute_grad``.
  """

  def __init__(self, rblocks, input_shape, num_classes=10, weight_decay=1e-4,
               lr=0.01, recompute=False):
    self.model = models.keras_cifar_resnet(
        rblocks, num_classes, tuple(input_shape[1:]), weight_decay,
        shortcut='pool_pad')
    self.segments = (
        [tf.recompute_grad(lambda h, s=s: s(h, training=True))
         for s in keras_segments(self.model)] if recompute else None)
    self.optimizer = tf.keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    self.optimizer.build(self.model.trainable_variables)
    self.step = tf.function(self._step, input_signature=[
        tf.TensorSpec([None] + list(input_shape[1:]), tf.float32),
        tf.TensorSpec([None], tf.int32)])

  def logits(self, x):
    """The model's training-mode output (segment by segment if recompute)."""
    if self.segments is None:
      return self.model(x, training=True)
    for segment in self.segments:
      x = segment(x)
    return x

  def _step(self, x, y):
    variables = self.model.trainable_variables
    with tf.GradientTape() as tape:
      out = self.logits(x)
      xent = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=y, logits=out))
      objective = xent + tf.add_n(self.model.losses)
    grads = tape.gradient(objective, variables)
    self.optimizer.apply_gradients(zip(grads, variables))
    acc = tf.reduce_mean(tf.cast(
        tf.equal(tf.argmax(out, axis=1, output_type=tf.int32), y), tf.float32))
    return acc, xent


def keras_segments(model):
  """Sub-models of a functional ResNet cut at its residual joins.

  Args:
    model: a model of :func:`blpa.models.keras_cifar_resnet`.

  Returns:
    Sub-models sharing ``model``'s layers, to be applied in turn: the stem
    convolution, one per bottleneck block (ending at its ``Add``), and the
    head (BN, ReLU, pooling, classifier).
  """
  joins = [l.output for l in model.layers
           if isinstance(l, tf.keras.layers.Add)]
  stem = next(l for l in model.layers
              if isinstance(l, tf.keras.layers.Conv2D)).output
  cuts = [stem] + joins + [model.outputs[0]]
  segments, start = [], model.inputs[0]
  for end in cuts:
    segments.append(tf.keras.Model(start, end))
    start = end
  return segments


KERAS_METHODS = ('keras', 'keras_recompute')
METHODS = ('blpa', 'autodiff', 'recompute') + KERAS_METHODS


def step_function(method, net, x, y, lr=0.01):
  """A callable running one training step of ``method`` on a batch.

  Args:
    method: ``'blpa'`` (the graph's own forward/backward), ``'autodiff'`` or
      ``'recompute'`` (:class:`AutodiffTrainer` on the graph's twin).
    net: a closed graph (its qtype is used for ``'blpa'``).
    x, y: the batch (numpy; labels ``[B]`` or ``[B,1,1,1]``).
    lr: learning rate.

  Returns:
    A function of no arguments.
  """
  if method == 'blpa':
    def forward():
      net.forward(x, y)

    def backward():
      net.backward(lr)

    def step():
      forward()
      backward()
    step.phases = {'forward': forward, 'backward': backward}
    return step
  trainer = AutodiffTrainer(net, recompute=(method == 'recompute'))
  lr = tf.constant(lr, tf.float32)
  return _tensor_step(lambda xt, yt: trainer.step(xt, yt, lr), x, y)


def keras_step_function(method, rblocks, x, y, num_classes=10,
                        weight_decay=1e-4, lr=0.01):
  """A callable running one step of :class:`KerasTrainer` on a batch.

  Args:
    method: ``'keras'`` or ``'keras_recompute'``.
    rblocks: bottleneck blocks per stage.
    x, y: the batch (numpy; labels ``[B]`` or ``[B,1,1,1]``).
    num_classes, weight_decay, lr: as for :class:`KerasTrainer`.

  Returns:
    A function of no arguments.
  """
  trainer = KerasTrainer(rblocks, x.shape, num_classes, weight_decay, lr,
                         recompute=(method == 'keras_recompute'))
  return _tensor_step(trainer.step, x, y)


def _tensor_step(step, x, y):
  """``step(x, y)`` on constant tensors, waiting for its results."""
  xt = tf.constant(x)
  yt = tf.constant(np.asarray(y).reshape(-1).astype(np.int32))
  return lambda: [t.numpy() for t in step(xt, yt)]


def cifar_step(method, rblocks, batch, qtype=4, size=32, seed=0):
  """One training step of a CIFAR ResNet on a random batch.

  Args:
    method: one of :data:`METHODS`.
    rblocks: bottleneck blocks per stage (depth 9·rblocks+2).
    batch: batch size.
    qtype: blpa's qtype (ignored by the other methods).
    size: image height and width.
    seed: random seed of weights and data.

  Returns:
    ``(step, net)``: a callable running one step (see
    :func:`step_function`) and the closed blpa graph (``None`` for the
    Keras methods, which build no graph, so that their peak holds only the
    Keras model).
  """
  tf.random.set_seed(seed)
  shape = [batch, size, size, 3]
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  y = rng.integers(0, 10, size=(batch, 1, 1, 1)).astype(np.int32)
  if method in KERAS_METHODS:
    return keras_step_function(method, rblocks, x, y), None
  net = models.build(models.cifar_resnet(rblocks), shape, qtype=qtype)
  return step_function(method, net, x, y), net


def cifar_step_peak(method, rblocks, batch, qtype=4, size=32, seed=0,
                    repeats=3):
  """Peak bytes of one training step of a CIFAR ResNet.

  Args:
    method, rblocks, batch, qtype, size, seed: as for :func:`cifar_step`.
    repeats: measured steps (see :func:`peak_bytes`).

  Returns:
    ``(peak_bytes, net)``; ``net`` tells stored bytes and weight counts.
  """
  step, net = cifar_step(method, rblocks, batch, qtype, size, seed)
  return peak_bytes(step, repeats), net


def weight_bytes(net):
  """Bytes of the network's weights."""
  return sum(int(np.prod(w.shape)) * 4 for w in net.weights)


def phase_peaks(step):
  """Peak bytes of each phase of a blpa step (``step.phases``), in turn.

  Returns:
    ``{'forward': bytes, 'backward': bytes}``: the allocator peak from the
    start of each phase to its end (everything resident included).
  """
  device = device_name()
  out = {}
  for name, phase in step.phases.items():
    tf.config.experimental.reset_memory_stats(device)
    phase()
    out[name] = int(tf.config.experimental.get_memory_info(device)['peak'])
  return out


def _elements(batch, shape):
  return batch * int(np.prod(shape))


def peak_breakdown(net, batch, peak=None):
  """What a blpa step holds at its peak, by kind, from known tensor sizes.

  Resident through the step: weights, momentum, the K-bit copies and the
  full-precision copies (with their per-channel statistics), the input
  batch (float images and int32 labels) and the loss gradient.  Transient,
  at the widest layer (largest input): one full-size tensor (its restored
  activation, freed before the gradient leaving it is allocated, which the
  BN backward then overwrites in place), the gradient arriving at its
  convolution output, and the pending residual gradient (the size of the
  widest residual buffer).  Everything else at the peak (the other
  temporaries of that layer's forward or backward, the allocator's
  rounding of chunks) is ``unexplained``.

  Args:
    net: a closed :class:`blpa.graph.Graph`.
    batch: batch size of the step.
    peak: measured peak bytes, to compute ``unexplained`` (optional).

  Returns:
    dict kind → bytes (``'unexplained'`` and ``'total_explained'`` included
    when ``peak`` is given), and ``'widest_layer'``, its index.
  """
  saved = net.saved_bytes(batch)
  widest = max(net.layers, key=lambda l: _elements(batch, l.in_shape))
  residual = max((_elements(batch, l.in_shape) for l in net.layers
                  if l.nl.res_out is not None), default=0)
  act = 4 * _elements(batch, widest.in_shape)
  out = {
      'weights': weight_bytes(net),
      'momentum': weight_bytes(net),
      'compact_copies': sum(b for _, bits, b in saved if bits),
      'full_copies': sum(b for _, bits, b in saved if not bits),
      'input_batch': 4 * _elements(batch, net.input_shape[1:]) + 4 * batch,
      'loss_gradient': 4 * batch * net.num_classes,
      'widest_activation': act,
      'widest_gradient_out': 4 * _elements(batch, widest.out_shape),
      'residual_gradient': 4 * residual,
  }
  explained = sum(out.values())
  out['widest_layer'] = widest.index
  if peak is not None:
    out['total_explained'] = explained
    out['unexplained'] = int(peak) - explained
  return out


def main(argv=None):
  """Prints the peak of one CIFAR ResNet training step as JSON.

  Run in a fresh process with ``TF_CPU_ALLOCATOR_USE_BFC=true``, e.g.::

    TF_CPU_ALLOCATOR_USE_BFC=true python -m blpa.memory --method blpa \\
        --rblocks 8 --batch 32 --qtype 4
  """
  import argparse  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=main.__doc__.split('\n')[0])
  parser.add_argument('--method', default='blpa', choices=METHODS)
  parser.add_argument('--rblocks', type=int, default=2)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--qtype', type=int, default=4, choices=[0, 4, 8])
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--inter-op-threads', type=int, default=1,
                      help='executor threads (1 makes the peak repeatable; '
                      '0: TensorFlow\'s default)')
  parser.add_argument('--repeats', type=int, default=3,
                      help='measured steps for the peak (0: no peak, e.g. '
                      'for timing without the BFC allocator)')
  parser.add_argument('--time-steps', type=int, default=0,
                      help='also time this many steps (after the peak steps, '
                      'or after one warm-up step) and report their seconds')
  args = parser.parse_args(argv)
  if args.inter_op_threads:
    tf.config.threading.set_inter_op_parallelism_threads(
        args.inter_op_threads)
  step, net = cifar_step(args.method, args.rblocks, args.batch, args.qtype,
                         args.size)
  result = {'method': args.method, 'rblocks': args.rblocks,
            'batch': args.batch, 'qtype': args.qtype, 'size': args.size}
  if net is not None:
    result['saved_bytes'] = int(sum(b for _, _, b in
                                    net.saved_bytes(args.batch)))
    result['weight_bytes'] = weight_bytes(net)
  if args.repeats:
    result['peak_bytes'] = int(peak_bytes(step, args.repeats))
    if hasattr(step, 'phases'):
      result['phase_peak_bytes'] = phase_peaks(step)
      result['breakdown'] = peak_breakdown(net, args.batch,
                                           result['peak_bytes'])
  if args.time_steps:
    result['step_times'] = step_times(step, args.time_steps,
                                      warmup=0 if args.repeats else 1)
  print(json.dumps(result))


if __name__ == '__main__':
  main()

"""Peak memory of a training step, blpa against plain autodiff.

On CPU the figures come from TensorFlow's BFC allocator, which keeps peak
statistics only when the process starts with ``TF_CPU_ALLOCATOR_USE_BFC=true``
(set before TensorFlow is imported); on GPU from ``get_memory_info('GPU:0')``.
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


def step_function(method, net, x, y, lr=0.01):
  """A callable running one training step of ``method`` on a batch.

  Args:
    method: ``'blpa'`` (the graph's own forward/backward), ``'autodiff'`` or
      ``'recompute'``.
    net: a closed graph (its qtype is used for ``'blpa'``).
    x, y: the batch (numpy; labels ``[B]`` or ``[B,1,1,1]``).
    lr: learning rate.

  Returns:
    A function of no arguments.
  """
  if method == 'blpa':
    def step():
      net.forward(x, y)
      net.backward(lr)
    return step
  trainer = AutodiffTrainer(net, recompute=(method == 'recompute'))
  xt = tf.constant(x)
  yt = tf.constant(np.asarray(y).reshape(-1).astype(np.int32))
  lr = tf.constant(lr, tf.float32)
  return lambda: [t.numpy() for t in trainer.step(xt, yt, lr)]


def cifar_step(method, rblocks, batch, qtype=4, size=32, seed=0):
  """One training step of a CIFAR ResNet on a random batch.

  Args:
    method: ``'blpa'``, ``'autodiff'`` or ``'recompute'``.
    rblocks: bottleneck blocks per stage (depth 9·rblocks+2).
    batch: batch size.
    qtype: blpa's qtype (ignored by the autodiff methods).
    size: image height and width.
    seed: random seed of weights and data.

  Returns:
    ``(step, net)``: a callable running one step (see
    :func:`step_function`) and the closed graph.
  """
  tf.random.set_seed(seed)
  shape = [batch, size, size, 3]
  net = models.build(models.cifar_resnet(rblocks), shape, qtype=qtype)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  y = rng.integers(0, net.num_classes, size=(batch, 1, 1, 1)).astype(np.int32)
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


def main(argv=None):
  """Prints the peak of one CIFAR ResNet training step as JSON.

  Run in a fresh process with ``TF_CPU_ALLOCATOR_USE_BFC=true``, e.g.::

    TF_CPU_ALLOCATOR_USE_BFC=true python -m blpa.memory --method blpa \\
        --rblocks 8 --batch 32 --qtype 4
  """
  import argparse  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=main.__doc__.split('\n')[0])
  parser.add_argument('--method', default='blpa',
                      choices=['blpa', 'autodiff', 'recompute'])
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
  result = {
      'method': args.method, 'rblocks': args.rblocks, 'batch': args.batch,
      'qtype': args.qtype, 'size': args.size,
      'saved_bytes': int(sum(b for _, _, b in net.saved_bytes(args.batch))),
      'weight_bytes': weight_bytes(net)}
  if args.repeats:
    result['peak_bytes'] = int(peak_bytes(step, args.repeats))
  if args.time_steps:
    result['step_times'] = step_times(step, args.time_steps,
                                      warmup=0 if args.repeats else 1)
  print(json.dumps(result))


if __name__ == '__main__':
  main()

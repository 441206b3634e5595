"""Memory-efficient training across several devices, and several machines.

The API is the reference implementation's::

    from blpa import graph, mgraph
    net = mgraph.Graph([graph.SimpleData, [[256, 224, 224, 3]]],
                       [graph.LogLoss, []], ngpu=4)
    net.add(...)                    # as graph.Graph.add
    net.close(qtype=4, WD=1e-4, multi=2)
    net.binit()
    for s in range(2):
      net.forward(x[s::2], y[s::2]) # each device takes x[s::2][j::4]
      net.hback()
    net.cback(lr)

The batch given to ``SimpleData`` is the whole batch of one update, over all
devices and ``multi`` sub-batches.  Each device runs the same network, with
its own batch statistics, on an interleaved shard ``x[j::devices]`` of every
``forward`` batch; gradients are summed over devices and divided by their
number before one momentum update, so one update equals
:class:`blpa.graph.Graph` with ``multi = devices·k`` on the same interleaved
sub-batches.

It is built on ``tf.distribute``:

* one machine: a ``MirroredStrategy`` over ``ngpu`` GPUs (or logical CPU
  devices, see :func:`split_cpu`);
* several machines (or processes): a ``MultiWorkerMirroredStrategy`` when
  ``TF_CONFIG`` names more than one worker.  Every worker runs the same
  program, calls ``forward`` with the same whole batch and takes the shards
  of its own devices.  The graph must be created before TensorFlow runs any
  operation.

Weights and momentum are mirrored variables.  What each device keeps
between forward and backward (the compact activation copies, the loss
gradient, gradient accumulators, running BN statistics) lives in per-replica
(``ON_READ``) variables: each device reads and writes its own copy, and the
copies never travel.  The backward pass runs on each device with
:mod:`blpa.graph`'s code; each weight's gradient is all-reduced (summed over
devices, then divided) as soon as it is computed, and every device applies
the same momentum update to its own copy of the weight.
"""

import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from blpa import graph
from blpa import storage
from blpa.layers import LogLoss, NLDef, SimpleData  # pylint: disable=unused-import

SUM = tf.distribute.ReduceOp.SUM
MEAN = tf.distribute.ReduceOp.MEAN
FINGERPRINT = ('batch', 'layers', 'qtype', 'WD', 'multi', 'ngpu',
               'spec hash')


def split_cpu(count):
  """Splits the CPU into ``count`` logical devices (to use ngpu > 1 on CPU).

  Must run before TensorFlow runs any operation.

  Args:
    count: logical CPU devices wanted.

  Raises:
    RuntimeError: when TensorFlow has already started.
  """
  cpu = tf.config.list_physical_devices('CPU')[0]
  current = tf.config.get_logical_device_configuration(cpu) or [None]
  if len(current) == count:
    return
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * count)
  except RuntimeError as e:
    raise RuntimeError(f'split_cpu({count}): TensorFlow has already started '
                       f'({e}); call it before any TensorFlow operation') from e


def cluster_workers():
  """Workers named by ``TF_CONFIG`` (chief and worker tasks); 1 if unset."""
  cluster = _tf_config().get('cluster', {})
  return max(1, len(cluster.get('chief', [])) + len(cluster.get('worker', [])))


def _tf_config():
  return json.loads(os.environ.get('TF_CONFIG') or '{}')


def make_strategy(ngpu):
  """The ``tf.distribute`` strategy for ``ngpu`` devices per worker.

  Args:
    ngpu: devices on this worker.

  Returns:
    A ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG`` names several
    workers, else a ``MirroredStrategy``.

  Raises:
    ValueError: naming how many devices of which kind exist, when fewer
      than ``ngpu`` do.
    RuntimeError: for several workers once TensorFlow has started.
  """
  if isinstance(ngpu, bool) or not isinstance(ngpu, (int, np.integer)) or (
      ngpu < 1):
    raise ValueError(f'mgraph.Graph: ngpu must be an integer >= 1, got '
                     f'{ngpu!r}')
  if cluster_workers() > 1:
    return _multi_worker_strategy(int(ngpu))
  kind = 'GPU' if tf.config.list_physical_devices('GPU') else 'CPU'
  devices = [d.name for d in tf.config.list_logical_devices(kind)]
  if ngpu > len(devices):
    hint = ('; on CPU, call blpa.mgraph.split_cpu(n) before TensorFlow '
            'starts to make n logical devices' if kind == 'CPU' else '')
    raise ValueError(f'mgraph.Graph: {ngpu} devices requested but only '
                     f'{len(devices)} {kind} device(s) exist '
                     f'({", ".join(devices)}){hint}')
  return _shared(tuple(devices[:ngpu]), tf.distribute.MirroredStrategy)


_STRATEGIES = {}


def _shared(devices, make):
  """One strategy per set of devices and process, made by ``make(devices)``.

  Strategies over the same devices would number their collective operations
  alike, and TensorFlow would mix up those of different graphs.
  """
  if devices not in _STRATEGIES:
    _STRATEGIES[devices] = make(devices)
  return _STRATEGIES[devices]


def _multi_worker_strategy(ngpu):
  """A ``MultiWorkerMirroredStrategy`` over ``ngpu`` GPUs (or the CPU)."""
  resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  gpus = len(tf.config.list_physical_devices('GPU'))
  if ngpu > max(gpus, 1):
    raise ValueError(f'mgraph.Graph: {ngpu} devices per worker requested but '
                     f'this worker has {gpus} GPU(s)' + (
                         ' (without GPUs, each worker is one CPU device)'
                         if not gpus else ''))
  if gpus:
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        resolver.cluster_spec(), task_type=resolver.task_type,
        task_id=resolver.task_id, num_accelerators={'GPU': ngpu},
        rpc_layer=resolver.rpc_layer or 'grpc')
  try:
    return _shared(('workers', ngpu), lambda _: (
        tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)))
  except RuntimeError as e:
    raise RuntimeError('mgraph.Graph: several workers in TF_CONFIG, but '
                       f'TensorFlow has already started ({e}); create the '
                       'graph before any TensorFlow operation') from e


def _instantiate(spec, what, cls):
  """A layer object from ``[Class, args]`` (or the object itself)."""
  if isinstance(spec, cls):
    return spec
  if not (isinstance(spec, (list, tuple)) and len(spec) == 2
          and isinstance(spec[0], type) and isinstance(spec[1], (list, tuple))):
    raise TypeError(f'mgraph.Graph: the {what} layer must be [Class, [args]] '
                    f'(e.g. [graph.{cls.__name__}, [...]]), got {spec!r}')
  return spec[0](*spec[1])


class Graph(graph.Graph):
  """A residual network trained with backprop on approximate activations
  across ``ngpu`` devices (per worker).

  Args:
    data_layer: ``[SimpleData, [[B, H, W, C]]]``; ``B`` is the whole batch
      of one update (all devices and sub-batches).
    loss_layer: ``[LogLoss, []]``.
    ngpu: devices per worker.

  Raises:
    ValueError: when fewer than ``ngpu`` devices exist (naming how many of
      which kind do).
  """

  def __init__(self, data_layer, loss_layer, ngpu=1):
    super().__init__(_instantiate(data_layer, 'data', SimpleData),
                     _instantiate(loss_layer, 'loss', LogLoss))
    self.strategy = make_strategy(ngpu)
    self.ngpu = int(ngpu)
    self.replicas = self.strategy.num_replicas_in_sync
    self.workers = self.replicas // len(self.strategy.extended.worker_devices)
    self.worker = _worker_index()
    self._running_differ = False

  # --------------------------------------------------------------------------
  # Definition
  # --------------------------------------------------------------------------

  def _check_close(self, qtype, wd, multi):
    super()._check_close(qtype, wd, multi)
    batch, split = self.input_shape[0], int(multi) if multi else 1
    parts = self.replicas * split
    if batch % parts:
      raise ValueError(f'Graph.close: the batch of {batch} does not split '
                       f'over {self.replicas} devices x {split} sub-batches '
                       f'(multi) = {parts}: {batch} is not divisible by '
                       f'{parts}')

  def _make_variables(self):
    """Checks that the workers agree, then makes distributed variables."""
    self.device_batch = self.input_shape[0] // (self.replicas * self.multi)
    if self.workers > 1:
      self._check_workers_agree()
    with self.strategy.scope():
      super()._make_variables()

  @staticmethod
  def _code_storage(height, width, nbytes):
    return _Words(height, width, nbytes)

  def _fingerprint(self):
    """What all workers must agree on, as exactly representable floats."""
    specs = [(l.ksz, l.out_ch, l.stride, l.pad, l.nl.as_list(), l.bits)
             for l in self.layers]
    digest = hashlib.sha256(repr((self.input_shape, specs)).encode()).digest()
    return np.array([self.input_shape[0], len(self.layers), self.qtype,
                     self.weight_decay, self.multi, self.ngpu,
                     int.from_bytes(digest[:3], 'big')], np.float32)

  def _check_workers_agree(self):
    """All-gathers each worker's fingerprint and compares it with worker 0's.

    Raises:
      ValueError: naming each worker whose network differs from worker 0's.
    """
    mine = tf.constant(self._fingerprint()[None])
    rows = self.strategy.gather(self.strategy.run(lambda: mine), axis=0)
    rows = rows.numpy()[::self.replicas // self.workers]
    bad = [w for w in range(1, self.workers)
           if not np.array_equal(rows[w], rows[0])]
    if bad:
      raise ValueError('mgraph.Graph.close: the workers disagree on the '
                       'network: ' + '; '.join(
                           f'worker {w} has {_describe(rows[w])}, worker 0 '
                           f'has {_describe(rows[0])}' for w in bad))

  # --------------------------------------------------------------------------
  # Forward
  # --------------------------------------------------------------------------

  def forward(self, x, y=None, isxlist=False, isylist=False,  # pylint: disable=arguments-differ
              train=True, bn='batch'):
    """Runs the network on a batch spread over the devices.

    Args:
      x: float ``[B, H, W, C]``; device ``j`` (of all workers) takes
        ``x[j::devices]``.  With ``isxlist``, a list of one shard per
        device.  Training needs an example on every device.
      y: integer labels ``[B, 1, 1, 1]`` (or ``[B]``), split like ``x``
        (a list of per-device shards with ``isylist``), or None.
      isxlist: ``x`` is already a list of shards.
      isylist: ``y`` is already a list of shards.
      train: as :meth:`blpa.graph.Graph.forward`.
      bn: as :meth:`blpa.graph.Graph.forward`; ``'running'`` uses the
        mean of the devices' running statistics.

    Returns:
      ``(accuracy, loss)`` over the whole batch when ``y`` is given, else
      the softmax probabilities: ``[B, classes]`` in the order of ``x``, or
      with ``isxlist`` a list of one array per shard.

    Raises:
      ValueError: for inputs of the wrong shape, a training batch smaller
        than the number of devices, or as :meth:`blpa.graph.Graph.forward`.
    """
    self._check_mode(y, train, bn)
    training = train and y is not None
    xs = self._input_shards(x, isxlist, training)
    ys = None if y is None else self._label_shards(y, isylist, xs)
    if bn == 'running' and self._running_differ:
      self._sync_running()
      self._running_differ = False
    self._running_differ |= training
    real = sum(1 for s in xs if s.shape[0])
    if real < self.replicas:
      return self._evaluate_few(xs[:real], ys, bn)
    out = self._forward(self._distribute(xs),
                        None if ys is None else self._distribute(ys), train,
                        bn)
    if y is not None:
      return out
    sizes = [s.shape[0] for s in xs]
    if isxlist:
      return np.split(out, np.cumsum(sizes)[:-1])
    order = np.concatenate([np.arange(j, len(out), self.replicas)
                            for j in range(self.replicas)])
    probs = np.empty_like(out)
    probs[order] = out
    return probs

  def _evaluate_few(self, xs, ys, bn):
    """Evaluates a batch smaller than the number of devices.

    Each device takes one example; those left over repeat the first one,
    and only the real examples count.  Accuracy and loss are computed from
    the probabilities.

    Args:
      xs: one single-example shard per real example.
      ys: their labels, or None.
      bn: ``'batch'`` or ``'running'``.

    Returns:
      As :meth:`forward`.
    """
    padded = xs + xs[:1] * (self.replicas - len(xs))
    probs = self._forward(self._distribute(padded), None, False, bn)[:len(xs)]
    if ys is None:
      return probs
    labels = np.concatenate([l.numpy() for l in ys[:len(xs)]])
    picked = np.maximum(probs[np.arange(len(xs)), labels],
                        np.finfo(np.float32).tiny)
    return (float(np.mean(probs.argmax(axis=1) == labels)),
            float(-np.mean(np.log(picked))))

  def _input_shards(self, x, isxlist, train):
    """Checked per-device inputs: the list given, or ``x[j::devices]``.

    Only evaluation may leave a device without examples (see
    :meth:`_evaluate_few`).
    """
    if isxlist:
      self._check_count(x, 'isxlist')
      return [self._check_input(s) for s in x]
    x = self._check_input(x)
    if train and x.shape[0] < self.replicas:
      raise ValueError(f'forward: a training batch of {x.shape[0]} leaves '
                       f'devices without examples ({self.replicas} devices)')
    return [x[j::self.replicas] for j in range(self.replicas)]

  def _label_shards(self, y, isylist, xs):
    """Checked per-device labels for the input shards ``xs``."""
    if isylist:
      self._check_count(y, 'isylist')
      return [self._check_labels(s, x.shape[0]) for s, x in zip(y, xs)]
    y = self._check_labels(y, sum(x.shape[0] for x in xs))
    return [y[j::self.replicas] for j in range(self.replicas)]

  def _check_count(self, shards, what):
    if not isinstance(shards, (list, tuple)) or len(shards) != self.replicas:
      got = len(shards) if isinstance(shards, (list, tuple)) else type(
          shards).__name__
      raise ValueError(f'forward: {what} needs a list of one shard per device '
                       f'({self.replicas}), got {got}')

  def _distribute(self, shards):
    """Per-replica values: shard ``j`` on device ``j`` (of all workers)."""
    return self.strategy.experimental_distribute_values_from_function(
        lambda ctx: shards[ctx.replica_id_in_sync_group])

  def _compile(self, kind, bn, fn, signature):
    """Runs ``fn`` on every device and combines what they return.

    Accuracy and loss are averaged over devices, weighted by their shards'
    sizes; predictions are gathered in device order.
    """
    del signature  # per-replica inputs: traced with relaxed shapes

    def weighted(*args):
      size = tf.cast(tf.shape(args[0])[0], tf.float32)
      return [v * size for v in fn(*args)] + [size]

    def run(*args):
      if kind == 'predict':
        return self.strategy.gather(self.strategy.run(fn, args), axis=0)
      acc, loss, size = [self.strategy.reduce(SUM, v, axis=None)
                         for v in self.strategy.run(weighted, args)]
      return acc / size, loss / size
    return tf.function(run, reduce_retracing=True)

  @tf.function
  def _sync_running(self):
    """Sets every device's running BN statistics to their mean.

    The mean is what checkpoints store and evaluation uses; each device
    keeps its own moving averages while training, and the mean of moving
    averages is the moving average of the means.
    """
    for stats in self.running:
      for var in stats or ():
        var.assign(var.read_value())

  # --------------------------------------------------------------------------
  # Backward
  # --------------------------------------------------------------------------

  def _each_device(self, fn, *args):
    """Runs ``fn(*args)`` on every device.

    Returns:
      What ``fn`` returned on the first local device.
    """
    out = self.strategy.run(fn, args)
    return tf.nest.map_structure(
        lambda v: self.strategy.experimental_local_results(v)[0], out)

  def _total(self, grad, count=1):
    """Sum over devices of ``grad``, divided by devices x ``count``."""
    ctx = tf.distribute.get_replica_context()
    return ctx.all_reduce(SUM, grad) / float(self.replicas * count)


class _Words:
  """One device's K-bit codes (uint8) kept in int32 words.

  ``MultiWorkerMirroredStrategy`` broadcasts every new variable's initial
  value from the chief, and its collective broadcast has no uint8 kernel;
  four codes share a word (``tf.bitcast``, no copy), padded with up to three
  bytes per pixel when ``nbytes`` is not a multiple of 4.

  Args:
    height, width: the layer input's size.
    nbytes: code bytes per pixel.
  """

  def __init__(self, height, width, nbytes):
    self.nbytes = nbytes
    self.words = -(-nbytes // 4)
    self.var = graph.per_device(
        tf.zeros([0, height, width, self.words], tf.int32), graph.NONE,
        shape=[None, height, width, self.words])

  def assign(self, codes, read_value=False):
    """Stores uint8 ``codes`` ``[N, H, W, nbytes]``."""
    pad = 4 * self.words - self.nbytes
    if pad:
      codes = tf.pad(codes, [[0, 0], [0, 0], [0, 0], [0, pad]])
    shape = tf.shape(codes)
    codes = tf.reshape(codes, tf.concat([shape[:3], [self.words, 4]], 0))
    del read_value  # written in place (blpa.storage), as the graph's copies
    return storage.write(self.var, tf.bitcast(codes, tf.int32))

  def read_value(self):
    """The stored codes, uint8 ``[N, H, W, nbytes]``."""
    codes = tf.bitcast(self.var.read_value(), tf.uint8)
    shape = tf.shape(codes)
    codes = tf.reshape(codes, tf.concat([shape[:3], [4 * self.words]], 0))
    return codes[..., :self.nbytes] if self.nbytes % 4 else codes


def _worker_index():
  """This worker's index in ``TF_CONFIG`` (the chief first; 0 if unset)."""
  config = _tf_config()
  task = config.get('task', {})
  if task.get('type') == 'chief':
    return 0
  chiefs = len(config.get('cluster', {}).get('chief', []))
  return int(task.get('index', 0)) + chiefs


def _describe(row):
  """Text of a fingerprint row (see ``Graph._fingerprint``)."""
  values = [f'{v:g}' if name == 'WD' else f'{int(v)}'
            for name, v in zip(FINGERPRINT, row)]
  return ', '.join(f'{name} {v}' for name, v in zip(FINGERPRINT, values))

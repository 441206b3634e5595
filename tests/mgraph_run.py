"""Runs blpa.mgraph jobs in a fresh process, for tests/test_mgraph.py.

Logical CPU devices (``--cpu-devices``) and ``MultiWorkerMirroredStrategy``
(``TF_CONFIG``) must be set up before TensorFlow starts, and the test suite
shares one process, so the tests run this script::

    python tests/mgraph_run.py JOBS.json RESULTS.json [--cpu-devices N]

``JOBS.json`` is a list of jobs; ``RESULTS.json`` gets one dict per job
(``{'error': message}`` when the job raised a ValueError).  Kinds of job:

* ``train``: builds the every-kind test network with
  :func:`blpa.training.build_graph` (``ngpu``, ``qtype``, ``multi``,
  ``batch`` = one update's batch, ``classes``), loads ``init`` (and saves
  it again to ``out + '.loaded.npz'``), runs one
  :func:`blpa.training.train_step` per batch of the ``data`` file (``x``,
  ``y``, ``lr``), saves ``out`` with state, and writes evaluations of
  ``xe``/``ye`` to ``out + '.eval.npz'``; ``stored_rows`` lists, for each
  layer, the rows of its kept copy on each of this worker's devices after
  the last update;
* ``errors``: the messages of requests that must fail before training;
* ``memory``: peak allocator bytes of one update of a CIFAR ResNet
  (``rblocks``, ``device_batch`` examples per device, ``qtype``) on
  ``ngpu`` devices; needs ``TF_CPU_ALLOCATOR_USE_BFC=true``.  Logical CPU
  devices share one allocator, so the peak is the process's (all its
  devices); worker processes each have their own.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from blpa import graph, memory, mgraph, models, training  # noqa: E402
from tests import helpers  # noqa: E402


def train(job):
  """Trains on the job's batches; returns what the test compares."""
  net = training.build_graph(helpers.every_kind_specs(job['classes']),
                             [job['batch'], 16, 16, 3], job['qtype'], 2e-4,
                             job['multi'], job['ngpu'])
  net.load(job['init'])
  net.save(job['out'] + '.loaded.npz', 0, state=True)
  with np.load(job['data']) as data:
    steps = [training.train_step(net, x, y, lr, job['multi'])
             for x, y, lr in zip(data['x'], data['y'], data['lr'])]
    _evaluate(net, data['xe'], data['ye'], job['out'] + '.eval.npz')
  net.save(job['out'], len(steps), state=True)
  variables = net.weights + net.momentum
  return {'steps': steps, 'replicas': net.replicas, 'worker': net.worker,
          'device_batch': net.device_batch, 'stored_rows': _stored_rows(net),
          'identical': all(_same(v.values) for v in variables)}


def _stored_rows(net):
  """Rows of each layer's kept copy (codes or float copy) on each of this
  worker's devices."""
  rows = []
  for saved in net.saved:
    act = saved['act']
    var = act if isinstance(act, tf.Variable) else act.var  # mgraph._Words
    rows.append([int(copy.read_value().shape[0]) for copy in var.values])
  return rows


def _same(copies):
  return all(np.array_equal(c.numpy(), copies[0].numpy()) for c in copies)


def _evaluate(net, x, y, path):
  """Evaluations after training, in every mode, saved to ``path``."""
  shards = [x[j::net.replicas] for j in range(net.replicas)]
  np.savez(path, batch=net.forward(x, y, train=False),
           running=net.forward(x, y, train=False, bn='running'),
           probs=net.forward(x), probs_running=net.forward(x, bn='running'),
           probs_list=np.concatenate(net.forward(shards, isxlist=True)),
           odd=net.forward(x[:-1], y[:-1], train=False),
           one=net.forward(x[:1], y[:1], train=False),
           one_probs=net.forward(x[:1]))


def errors(job):
  """Messages of requests that must fail, keyed by what was wrong."""
  shape = [6, 16, 16, 3]

  def build(ngpu, multi):
    net = mgraph.Graph([graph.SimpleData, [shape]], [graph.LogLoss, []], ngpu)
    for spec in helpers.every_kind_specs():
      net.add(*spec)
    net.close(0, 1e-4, multi)
    return net

  messages = {}
  cases = {'devices': lambda: build(job['devices'] + 1, False),
           'batch': lambda: build(2, 2),
           'data_layer': lambda: mgraph.Graph(graph.SimpleData, [], 2),
           'ngpu': lambda: build(0, False)}
  net = build(2, 3)
  x, y = helpers.batch(shape, net.num_classes)
  cases.update({
      'small_batch': lambda: net.forward(x[:1], y[:1]),
      'xlist': lambda: net.forward([x], y, isxlist=True),
      'labels': lambda: net.forward(x, y[:4])})
  for name, case in cases.items():
    try:
      case()
      messages[name] = None
    except (ValueError, TypeError) as e:
      messages[name] = f'{type(e).__name__}: {e}'
  return messages


def peak(job):
  """Peak bytes of one update, and the bytes each device must keep."""
  batch = job['device_batch'] * job['ngpu'] * mgraph.cluster_workers()
  net = mgraph.Graph([graph.SimpleData, [[batch, 32, 32, 3]]],
                     [graph.LogLoss, []], job['ngpu'])
  for spec in models.cifar_resnet(job['rblocks']):
    net.add(*spec)
  net.close(job['qtype'], 1e-4)
  x = np.random.default_rng(0).standard_normal(
      [batch, 32, 32, 3]).astype(np.float32)
  y = np.arange(batch) % net.num_classes
  step = memory.step_function('blpa', net, x, y)
  return {'replicas': net.replicas, 'peak_bytes': int(
      memory.peak_bytes(step)), 'saved_bytes': int(sum(
          b for _, _, b in net.saved_bytes())),
          'weight_bytes': memory.weight_bytes(net)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('jobs')
  parser.add_argument('results')
  parser.add_argument('--cpu-devices', type=int, default=None)
  parser.add_argument('--inter-op-threads', type=int, default=0)
  args = parser.parse_args()
  if args.inter_op_threads:
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
  if args.cpu_devices:
    mgraph.split_cpu(args.cpu_devices)
  with open(args.jobs) as f:
    jobs = json.load(f)
  results = []
  for job in jobs:
    try:
      results.append({'train': train, 'errors': errors,
                      'memory': peak}[job['kind']](job))
    except ValueError as e:
      results.append({'error': str(e)})
  with open(args.results, 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main()

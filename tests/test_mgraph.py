"""blpa.mgraph: several devices and several workers equal blpa.graph.

With N devices and ``multi = k``, one update must equal blpa.graph with
``multi = N·k`` on the same interleaved sub-batches (weights and momentum;
running BN statistics are averaged differently).  Logical CPU devices and
worker processes must be set up before TensorFlow starts, so the multi-device
runs happen in fresh processes (``tests/mgraph_run.py``); the references run
here with :mod:`blpa.graph`.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from blpa import checkpoint
from tests import helpers, programs
from tests.conftest import ROOT

DEVICES = 2
BATCH = 8
STEPS = 3
LRS = [0.1, 0.05, 0.1]  # a changing rate checks TF1 momentum too
SPECS = helpers.every_kind_specs()
SCRIPT = os.path.join(ROOT, 'tests', 'mgraph_run.py')
TIMEOUT = 180


def _env(**extra):
  return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2',
              TF_ENABLE_ONEDNN_OPTS='0', **extra)


def _start(jobs, folder, name, *args, **env):
  """Starts ``mgraph_run.py`` on ``jobs``; returns (process, results path)."""
  jobs_path = os.path.join(folder, f'{name}.jobs.json')
  with open(jobs_path, 'w') as f:
    json.dump(jobs, f)
  results = os.path.join(folder, f'{name}.results.json')
  proc = subprocess.Popen([sys.executable, SCRIPT, jobs_path, results]
                          + list(args), env=_env(**env), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  return proc, results


def _finish(procs, results=True):
  """Waits for ``(process, results path)`` pairs (fails unless all exit 0).

  Returns:
    Each process's results (or, with ``results=False``, its output).
  """
  outs = []
  try:
    for proc, _ in procs:
      outs.append(proc.communicate(timeout=TIMEOUT)[0])
  finally:
    for proc, _ in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  for (proc, _), out in zip(procs, outs):
    assert proc.returncode == 0, out[-3000:]
  if not results:
    return outs
  found = []
  for _, path in procs:
    with open(path) as f:
      found.append(json.load(f))
  return found


def _train_job(folder, name, qtype, multi, ngpu=DEVICES, classes=5):
  return {'kind': 'train', 'ngpu': ngpu, 'qtype': qtype, 'multi': multi,
          'batch': BATCH, 'classes': classes, 'init': f'{folder}/init.npz',
          'data': f'{folder}/data.npz', 'out': f'{folder}/{name}.npz'}


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """A start (scales and biases moved off 1 and 0, after one step) and
  batches."""
  path = str(tmp_path_factory.mktemp('mgraph'))
  net = helpers.build(SPECS, [BATCH, 16, 16, 3])
  for w in net.weights[:-1]:
    if w.shape.rank == 1:
      w.assign(w + tf.random.uniform(w.shape, -0.3, 0.3))
  batches = [helpers.batch([BATCH, 16, 16, 3], 5, seed=s) for s in
             range(STEPS + 2)]
  net.forward(*batches.pop())  # momentum and running statistics
  net.backward(0.1)
  net.save(f'{path}/init.npz', 0, state=True)
  np.savez(f'{path}/data.npz', x=np.stack([b[0] for b in batches[:STEPS]]),
           y=np.stack([b[1] for b in batches[:STEPS]]), lr=LRS,
           xe=batches[-1][0], ye=batches[-1][1])
  return path


CASES = [(0, 1), (0, 2), (4, 1), (4, 2)]


@pytest.fixture(scope='module')
def local(folder):
  """Two logical CPU devices in one process: every case and the errors."""
  jobs = [_train_job(folder, f'local_q{q}_k{k}', q, k) for q, k in CASES]
  jobs.append({'kind': 'errors', 'devices': DEVICES})
  results = _finish([_start(jobs, folder, 'local', '--cpu-devices',
                            str(DEVICES))])[0]
  return dict(zip([f'q{q}_k{k}' for q, k in CASES] + ['errors'], results))


def _reference(folder, qtype, multi, devices=DEVICES):
  """blpa.graph with multi = devices·k on the same interleaved sub-batches."""
  parts = devices * multi
  net = helpers.build(SPECS, [BATCH // parts, 16, 16, 3], qtype, 2e-4, parts)
  net.load(f'{folder}/init.npz')
  with np.load(f'{folder}/data.npz') as data:
    for x, y, lr in zip(data['x'], data['y'], data['lr']):
      net.binit()
      for s in range(multi):
        for j in range(devices):
          net.forward(x[s::multi][j::devices], y[s::multi][j::devices])
          net.hback()
      net.cback(lr)
  return net


def _assert_matches(path, net):
  """The checkpoint's weights and momentum equal the graph's (rtol 1e-5)."""
  arrays = checkpoint.read(path)
  assert int(arrays['niter']) == STEPS
  for i, name in enumerate(net.weight_names):
    for key, var in ((str(i), net.weights[i]), (f'mom_{i}', net.momentum[i])):
      np.testing.assert_allclose(arrays[key], var.numpy(), rtol=1e-5,
                                 atol=1e-7, err_msg=f'{key} ({name})')


@pytest.mark.parametrize('qtype,multi', CASES)
def test_update_equals_graph_with_devices_times_multi(folder, local, qtype,
                                                      multi):
  result = local[f'q{qtype}_k{multi}']
  assert 'error' not in result, result
  name = f'{folder}/local_q{qtype}_k{multi}.npz'
  assert programs.differing_keys(f'{folder}/init.npz',
                                 name + '.loaded.npz') == []
  assert result['identical'], 'weights differ between devices'
  assert result['device_batch'] == BATCH // (DEVICES * multi)
  _assert_matches(name, _reference(folder, qtype, multi))


@pytest.mark.parametrize('qtype,multi', CASES)
def test_each_device_keeps_only_its_shard(local, qtype, multi):
  """Every layer's copy on each device holds that device's sub-batch
  (batch / (devices x multi) rows), not the batch: a device's memory for
  copies is one shard's. (The allocator peak per worker: the slow
  test_memory_per_device_is_that_of_one_shard.)"""
  result = local[f'q{qtype}_k{multi}']
  assert 'error' not in result, result
  shard = BATCH // (DEVICES * multi)
  assert result['stored_rows'] == [[shard] * DEVICES] * len(SPECS)


def test_evaluation_is_over_the_whole_batch(folder, local):
  """Accuracy/loss are whole-batch means; predictions keep x's order."""
  assert 'error' not in local['q0_k1']
  net = helpers.build(SPECS, [BATCH, 16, 16, 3])
  net.load(f'{folder}/local_q0_k1.npz')  # running stats: devices' mean
  with np.load(f'{folder}/data.npz') as data:
    x, y = data['xe'], data['ye']
  with np.load(f'{folder}/local_q0_k1.npz.eval.npz') as got:
    got = dict(got)
  shards = [net.forward(x[j::DEVICES]) for j in range(DEVICES)]
  interleaved = np.stack(shards, axis=1).reshape(BATCH, -1)
  close = dict(rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['probs'], interleaved, **close)
  np.testing.assert_allclose(got['probs_list'], np.concatenate(shards),
                             **close)
  np.testing.assert_allclose(got['probs_running'],
                             net.forward(x, bn='running'), **close)
  np.testing.assert_allclose(
      got['running'], net.forward(x, y, train=False, bn='running'), **close)
  np.testing.assert_allclose(got['one_probs'], net.forward(x[:1]), **close)
  for key, n in (('batch', BATCH), ('odd', BATCH - 1), ('one', 1)):
    parts = [(len(y[j:n:DEVICES]), net.forward(x[j:n:DEVICES], y[j:n:DEVICES],
                                                train=False))
             for j in range(min(n, DEVICES))]
    want = sum(size * np.array(r) for size, r in parts) / n
    np.testing.assert_allclose(got[key], want, err_msg=key, **close)


@pytest.mark.parametrize('case,match', [
    ('devices', r'3 devices requested but only 2 CPU device\(s\) exist '
     r'\(/.*CPU:0, /.*CPU:1\); on CPU, call blpa.mgraph.split_cpu'),
    ('batch', r'batch of 6 does not split over 2 devices x 2 sub-batches '
     r'\(multi\) = 4: 6 is not divisible by 4'),
    ('ngpu', r'ngpu must be an integer >= 1, got 0'),
    ('data_layer', r'TypeError: .*data layer must be \[Class, \[args\]\]'),
    ('small_batch', r'a training batch of 1 leaves devices without examples '
     r'\(2 devices\)'),
    ('xlist', r'isxlist needs a list of one shard per device \(2\), got 1'),
    ('labels', r'labels must have shape \[6, 1, 1, 1\]'),
])
def test_errors_before_training(local, case, match):
  message = local['errors'][case]
  assert message is not None, f'{case}: no error'
  assert re.search(match, message), message


def _tf_configs(count):
  """``TF_CONFIG`` of each of ``count`` workers on free localhost ports."""
  socks = [socket.socket() for _ in range(count)]
  for s in socks:
    s.bind(('localhost', 0))
  hosts = [f'localhost:{s.getsockname()[1]}' for s in socks]
  for s in socks:
    s.close()
  return [json.dumps({'cluster': {'worker': hosts},
                      'task': {'type': 'worker', 'index': i}})
          for i in range(count)]


def _workers(folder, jobs, **env):
  """Runs one job per worker, as a cluster on localhost; returns results."""
  return [r[0] for r in _finish([
      _start([job], folder, f'worker{i}', TF_CONFIG=config, **env)
      for i, (job, config) in enumerate(zip(jobs, _tf_configs(len(jobs))))])]


def test_two_workers_train_as_one_process(folder, local):
  """Two worker processes (one CPU device each) on localhost."""
  results = _workers(folder, [
      _train_job(folder, f'worker{i}', 4, 2, ngpu=1) for i in range(2)])
  for i, result in enumerate(results):
    assert 'error' not in result, result
    assert (result['worker'], result['replicas']) == (i, 2)
    assert result['stored_rows'] == [[BATCH // 4]] * len(SPECS), result
  assert programs.differing_keys(f'{folder}/worker0.npz',
                                 f'{folder}/worker1.npz') == []
  _assert_matches(f'{folder}/worker0.npz', _reference(folder, 4, 2))
  single = checkpoint.read(f'{folder}/local_q4_k2.npz')
  for key, value in checkpoint.read(f'{folder}/worker0.npz').items():
    np.testing.assert_allclose(value, single[key], rtol=1e-5, atol=1e-7,
                               err_msg=key)


def test_workers_that_disagree_on_the_network(folder):
  results = _workers(folder, [
      _train_job(folder, 'bad0', 4, 1, ngpu=1),
      _train_job(folder, 'bad1', 4, 1, ngpu=1, classes=6)])
  for result in results:  # both stop, before making any variable
    assert re.search(r'workers disagree on the network: worker 1 has batch '
                     r'8, .* spec hash \d+, worker 0 has batch 8',
                     result.get('error', '')), result
  assert not os.path.exists(f'{folder}/bad0.npz')


def _imagenet(folder, save, *extra, **env):
  """Starts imagenet/train.py on the tiny image folder."""
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'imagenet', 'train.py'), '-save',
       save, '--data-dir', folder, '--image-size', '32', '--blocks',
       '1,1,1,1', '--bsz', '8', '-split', '2', '-qtype', '4', '--iters', '3',
       '--val-every', '2', '--log-every', '1', '--no-progress'] + list(extra),
      env=_env(**env), cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _wait(procs):
  """Waits for programs; returns their outputs (fails unless all exit 0)."""
  return _finish([(proc, None) for proc in procs], results=False)


@pytest.fixture(scope='module')
def imagenet_two_devices(tmp_path_factory):
  """imagenet/train.py -ngpu 2 on two logical CPU devices."""
  folder = str(tmp_path_factory.mktemp('imagenet'))
  programs.write_images(folder)
  save = f'{folder}/two.npz'
  out = _wait([_imagenet(folder, save, '-ngpu', '2', '--cpu-devices', '2')])
  return folder, save, out[0]


def test_imagenet_program_on_two_devices(imagenet_two_devices):
  _, save, out = imagenet_two_devices
  assert 'val loss' in out
  assert int(checkpoint.read(save)['niter']) == 3


@pytest.mark.slow
def test_imagenet_program_on_two_workers(imagenet_two_devices):
  """Two workers (one CPU device each) give the two devices' weights."""
  folder, save, _ = imagenet_two_devices
  _wait([_imagenet(folder, f'{folder}/workers.npz', TF_CONFIG=config)
         for config in _tf_configs(2)])
  assert programs.differing_keys(f'{folder}/workers.npz', save) == []
  assert programs.differing_keys(f'{folder}/workers.worker1.npz', save) == []


@pytest.mark.slow
def test_memory_per_device_is_that_of_one_shard(tmp_path):
  """Two workers with a shard of 32 each peak as one process with 32.

  Logical CPU devices share one allocator, so devices are measured as
  worker processes (one CPU device each, an allocator each).
  """
  job = {'kind': 'memory', 'ngpu': 1, 'rblocks': 4, 'device_batch': 32,
         'qtype': 4}
  folder = str(tmp_path)
  single = _finish([_start([job], folder, 'one',
                           TF_CPU_ALLOCATOR_USE_BFC='true')])[0][0]
  workers = _workers(folder, [job, job], TF_CPU_ALLOCATOR_USE_BFC='true')
  assert single['replicas'] == 1
  for worker in workers:
    assert worker['replicas'] == 2
    assert worker['peak_bytes'] <= 1.1 * single['peak_bytes'], (
        worker, single)

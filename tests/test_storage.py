"""Tests of blpa.storage: writing into a variable's buffer, resizing it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from blpa import graph, models, native, storage
from tests import helpers
from tests.conftest import ROOT
from tests.test_quant import use_backend

BACKENDS = ['native', 'python']


def _codes_variable(rows=0):
  return tf.Variable(tf.zeros([rows, 4, 4, 3], tf.uint8),
                     shape=[None, 4, 4, 3], trainable=False)


def _fill(value, rows=2):
  return tf.fill([rows, 4, 4, 3], tf.constant(value, tf.uint8))


@pytest.mark.parametrize('backend', BACKENDS)
def test_write_stores_value_in_eager_and_function(backend):
  with use_backend(backend):
    var = _codes_variable()
    storage.write(var, _fill(3))
    np.testing.assert_array_equal(var.numpy(), _fill(3).numpy())

    @tf.function
    def write_and_read(value):
      with tf.control_dependencies([storage.write(var, _fill(value))]):
        return var.read_value()

    np.testing.assert_array_equal(write_and_read(7).numpy(), 7)
    np.testing.assert_array_equal(var.numpy(), 7)


@pytest.mark.parametrize('backend', BACKENDS)
def test_write_never_changes_a_live_read(backend):
  """A read taken before a write keeps the old values (copy on write)."""
  with use_backend(backend):
    var = _codes_variable()
    storage.write(var, _fill(1))
    before = var.read_value()
    storage.write(var, _fill(2))
    np.testing.assert_array_equal(before.numpy(), 1)
    np.testing.assert_array_equal(var.numpy(), 2)


@pytest.mark.parametrize('backend', BACKENDS)
def test_write_of_another_shape_replaces_the_buffer(backend):
  with use_backend(backend):
    var = _codes_variable()
    storage.write(var, _fill(1, rows=2))
    storage.write(var, _fill(5, rows=3))
    assert var.numpy().shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(var.numpy(), 5)


_REUSE_CHECK = """
import json
import tensorflow as tf
from blpa import storage
MIB = 1 << 20
var = tf.Variable(tf.zeros([16, 256, 256, 4], tf.uint8),
                  shape=[None, 256, 256, 4], trainable=False)

@tf.function
def write_and_keep(value):
  kept = tf.fill([16, 256, 256, 4], value)
  with tf.control_dependencies([storage.write(var, kept)]):
    return tf.identity(kept)

def current():
  return tf.config.experimental.get_memory_info('CPU:0')['current'] / MIB

kept = write_and_keep(tf.constant(1, tf.uint8))
del kept
before = current()
kept = write_and_keep(tf.constant(2, tf.uint8))
separate = current() - before
reading = var.read_value()
read = current() - before - separate
print(json.dumps({'separate': separate, 'read': read,
                  'value': int(reading[3, 5, 7, 1])}))
"""


def test_native_write_reuses_the_variable_buffer():
  """The value is copied into the variable's buffer; reads are aliases.

  Adopting the value's buffer (``assign``) would leave the kept value and
  the variable sharing one 4 MiB buffer; ``ResourceStridedSliceAssign``
  would make the read a copy.
  """
  if native.library() is None:
    pytest.skip(f'native library not built ({native.so_path()})')
  env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC='true',
             TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT, BLPA_PY_OPS='0')
  out = subprocess.run([sys.executable, '-c', _REUSE_CHECK], env=env,
                       capture_output=True, text=True, check=True, cwd=ROOT)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got['value'] == 2
  assert abs(got['separate'] - 4) < 0.1, got
  assert abs(got['read']) < 0.1, got


@pytest.mark.parametrize('backend', BACKENDS)
def test_write_rejects_another_dtype(backend):
  with use_backend(backend):
    var = _codes_variable()
    with pytest.raises(ValueError, match='dtype float32.*uint8'):
      storage.write(var, tf.zeros([2, 4, 4, 3]))


@pytest.mark.parametrize('backend', BACKENDS)
def test_resize_gives_zeroed_rows_and_keeps_a_fitting_buffer(backend):
  with use_backend(backend):
    var = _codes_variable()
    @tf.function
    def resize(rows):
      storage.resize(var, rows)
    resize(tf.constant(5))
    assert var.numpy().shape == (5, 4, 4, 3)
    np.testing.assert_array_equal(var.numpy(), 0)
    storage.write(var, _fill(9, rows=5))
    resize(tf.constant(5))  # already 5 rows: untouched
    np.testing.assert_array_equal(var.numpy(), 9)
    resize(tf.constant(2))
    assert var.numpy().shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(var.numpy(), 0)


def test_native_resize_rejects_bad_rows():
  with use_backend('native'):
    var = _codes_variable(rows=1)
    with pytest.raises(tf.errors.InvalidArgumentError, match='rows must be >= 0'):
      storage.resize(var, -1)


@pytest.mark.parametrize('backend', BACKENDS)
def test_graph_copies_follow_the_batch_size(backend, tmp_path):
  """Training steps with changing batch sizes resize the code variables,
  and train as a fresh network of each step's batch size does (started
  from the same weights and momentum, built and run with the pure-TF ops,
  which never write in place)."""
  path = str(tmp_path / 'state.npz')
  with use_backend(backend):
    net = helpers.build(helpers.every_kind_specs(), [4, 16, 16, 3], qtype=4)
  rng = np.random.default_rng(0)
  fresh = {}  # one per batch size, which it never changes
  for batch in (4, 3, 4):
    x, y = helpers.batch([batch, 16, 16, 3], net.num_classes, seed=batch)
    net.save(path, 0, state=True)
    with use_backend('python'):
      if batch not in fresh:
        fresh[batch] = helpers.build(helpers.every_kind_specs(),
                                     [batch, 16, 16, 3], qtype=4)
      fresh[batch].load(path)
      want = fresh[batch].forward(x, y)
      assert fresh[batch].backward(0.01)
    with use_backend(backend):
      got = net.forward(x, y)
      assert net.backward(0.01)
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg='acc, loss')
    for layer, saved in zip(net.layers, net.saved):
      if layer.bits:
        assert tf.shape(graph.batch_variable(saved['act']))[0] == batch
    for name, w, v in zip(net.weight_names, net.weights,
                          fresh[batch].weights):
      np.testing.assert_allclose(w.numpy(), v.numpy(), rtol=1e-4, atol=1e-6,
                                 err_msg=f'batch {batch}: {name}')


def test_graph_training_is_the_same_with_both_backends():
  """Native in-place storage and plain assignment train identically."""
  results = []
  for backend in BACKENDS:
    with use_backend(backend):
      tf.random.set_seed(1)
      net = models.build(models.cifar_resnet(1), [4, 8, 8, 3], qtype=8)
      rng = np.random.default_rng(0)
      for _ in range(3):
        net.forward(rng.normal(size=[4, 8, 8, 3]).astype(np.float32),
                    rng.integers(0, 10, 4))
        net.backward(0.05)
      results.append([w.numpy() for w in net.weights])
  for native_w, python_w in zip(*results):
    np.testing.assert_allclose(native_w, python_w, rtol=1e-4, atol=1e-6)


def test_native_library_has_the_storage_ops():
  lib = native.library()
  if lib is None:
    pytest.skip(f'native library not built ({native.so_path()})')
  assert hasattr(lib, 'blpa_write_variable')
  assert hasattr(lib, 'blpa_resize_variable')

"""A Conv2D's kernel gradient computed over chunks of the batch.

``blpa.keras.backward.conv2d_chunked`` restores the layer's input chunk by
chunk from its compact copy (``restore_rows`` of the codecs and of the BN
copy) and sums the chunks' kernel gradients in float32. The thresholds
are module constants; here they are lowered so that a tiny model is
chunked (chunks of 3, 3 and 2 examples of a batch of 8), and its gradients
are compared with the same compressed model computed in one pass and with
plain Keras, at bits 0, 4 and 8, in float32 and under mixed_bfloat16.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

from bench import keras_subclassed
from blpa.keras import backward, compress
from tests import keras_helpers as kh

BATCH = 8
SIZE = 8


@pytest.fixture
def policy(request):
  keras.mixed_precision.set_global_policy(request.param)
  try:
    yield request.param
  finally:
    keras.mixed_precision.set_global_policy('float32')


def _model():
  """A subclassed ResNet-8 (the benchmark's classes) on 8x8 inputs: its
  convolutions read the model input (exact copy), a block input (MinMax
  codes) and a ReLU layer's output (the codes of the BN before it)."""
  keras.utils.set_random_seed(1)
  _, cifar_resnet = keras_subclassed.model_classes()
  model = cifar_resnet(1, weight_decay=0)
  model(tf.zeros([1, SIZE, SIZE, 3]))
  return model


def _force_chunks(monkeypatch, chunk_bytes=12000):
  """Chunk every Conv2D (with ``chunk_bytes``, the first stage's layers
  run chunks of 3, 3 and 2 examples) with the low-memory kernels."""
  monkeypatch.setattr(backward, 'CONV_CHUNK_THRESHOLD', 0)
  monkeypatch.setattr(backward, 'CONV_CHUNK_BYTES', chunk_bytes)
  monkeypatch.setattr(backward, 'LOW_MEMORY_KERNEL_BYTES', 0)


def _grads(model, x, y, function=True):
  return kh.loss_and_grads(model, x, y, function=function)[1]


def _float32_grads(model, x, y):
  """The gradients of ``model``'s weights computed in float32."""
  keras.mixed_precision.set_global_policy('float32')
  try:
    exact = _model()
    exact.set_weights(model.get_weights())
    return _grads(exact, x, y)
  finally:
    keras.mixed_precision.set_global_policy(model.dtype_policy.name)


def test_chunk_rows_of_the_benchmark_layers():
  """The first stage of the CIFAR ResNet-20 at batch 128 (16 MiB of input
  and output-gradient rows in float32) runs 4 chunks of 32 examples; at
  batch 32 (4 MiB) one pass; a 1x1 projection's rows count too."""
  conv = keras.layers.Conv2D(16, 3, padding='same')
  assert backward.conv2d_chunk_rows(conv, [128, 32, 32, 16], 'float32') == 32
  assert backward.conv2d_chunk_rows(conv, [32, 32, 32, 16], 'float32') is None
  # bfloat16: 2-byte rows plus their float32 restore.
  assert backward.conv2d_chunk_rows(conv, [128, 32, 32, 16],
                                    'bfloat16') == 32
  assert backward.conv2d_chunk_rows(conv, [None, 32, 32, 16],
                                    'float32') == 32
  dilated = keras.layers.Conv2D(16, 3, padding='same', dilation_rate=2)
  assert backward.conv2d_chunk_rows(dilated, [128, 32, 32, 16],
                                    'float32') is None


@pytest.mark.parametrize('policy', ['float32', 'mixed_bfloat16'],
                         indirect=True)
@pytest.mark.parametrize('bits', [0, 4, 8])
def test_chunked_equals_one_pass(monkeypatch, policy, bits):
  """The same copies and kernels, one pass against chunks: only the
  order of the sum differs (in bfloat16 each chunk is rounded)."""
  model = _model()
  x, y = kh.batch([BATCH, SIZE, SIZE, 3])
  monkeypatch.setattr(backward, 'LOW_MEMORY_KERNEL_BYTES', 0)
  whole = _grads(compress(model, bits), x, y)
  _force_chunks(monkeypatch)
  chunked = _grads(compress(model, bits), x, y)
  if policy == 'float32':
    kh.assert_same_gradients(whole, chunked)
  else:
    assert kh.weighted_cosine(whole, chunked) >= 0.9999


@pytest.mark.parametrize('policy', ['float32', 'mixed_bfloat16'],
                         indirect=True)
def test_chunked_bits0_equals_keras(monkeypatch, policy):
  """Chunks, low-memory kernels and bits 0 give Keras's gradients: in
  float32 within 1e-5; in bfloat16 as close to the float32 gradient as
  Keras's own (both are 14% from it here; the Eigen kernels round
  differently from TensorFlow's default ones, cosine 0.9996 between the
  two bfloat16 gradients, while chunking alone changes nothing visible)."""
  model = _model()
  x, y = kh.batch([BATCH, SIZE, SIZE, 3])
  ref = _grads(model, x, y)
  _force_chunks(monkeypatch)
  got = _grads(compress(model, 0), x, y)
  if policy == 'float32':
    kh.assert_same_gradients(ref, got)
  else:
    exact = _float32_grads(model, x, y)
    assert kh.global_rel_error(exact, got) <= \
        1.02 * kh.global_rel_error(exact, ref)
    assert kh.weighted_cosine(ref, got) >= 0.999


def test_chunks_are_taken(monkeypatch):
  """Eagerly (the loop runs in Python) every Conv2D of the model runs
  ceil(8 / rows) chunks: 1-byte chunks give one example each."""
  model = _model()
  convs = [layer for layer in model._flatten_layers()  # pylint: disable=protected-access
           if isinstance(layer, keras.layers.Conv2D)]
  x, y = kh.batch([BATCH, SIZE, SIZE, 3])
  calls = []
  real = backward.chunked_sum

  def counted(fn, n, rows, shape, dtype, **kwargs):
    def chunk(start, stop):
      calls.append(int(stop - start))
      return fn(start, stop)
    return real(chunk, n, rows, shape, dtype, **kwargs)

  monkeypatch.setattr(backward, 'chunked_sum', counted)
  _force_chunks(monkeypatch, chunk_bytes=1)
  got = _grads(compress(model, 4), x, y, function=False)
  assert calls == [1] * (BATCH * len(convs))
  assert all(np.isfinite(g).all() for g in got)


def _conv_grad_ops(graph, seen=None):
  """The Conv2D gradient ops of a graph and of the functions it calls."""
  seen = set() if seen is None else seen
  found = []
  for op in graph.get_operations():
    if op.type in ('Conv2DBackpropFilter', 'Conv2DBackpropInput'):
      found.append(op)
  for fn in getattr(graph, '_functions', {}).values():
    inner = getattr(fn, 'graph', None)
    if inner is not None and id(inner) not in seen:
      seen.add(id(inner))
      found += _conv_grad_ops(inner, seen)
  return found


EIGEN = b'eigen_tensor'


@pytest.mark.parametrize('threshold,onednn,labels', [
    (0, '0', {EIGEN}), (2**40, '0', {None}), (0, '1', {EIGEN, None})])
def test_large_convolutions_get_the_low_memory_kernels(monkeypatch,
                                                       threshold, onednn,
                                                       labels):
  """In tf.function, a Conv2D whose output gradient reaches
  LOW_MEMORY_KERNEL_BYTES has both gradient ops labelled for TF's
  ``eigen_tensor`` kernels (no im2col buffer); smaller ones keep the
  default kernels (no label). In float32 with oneDNN on, the strided
  convolutions keep oneDNN's kernels (no label; Eigen's are slow there)
  and the others are labelled."""
  monkeypatch.setattr(backward, 'LOW_MEMORY_KERNEL_BYTES', threshold)
  monkeypatch.setenv('TF_ENABLE_ONEDNN_OPTS', onednn)
  model = _model()
  compressed = compress(model, 4)
  x, y = kh.batch([BATCH, SIZE, SIZE, 3])

  @tf.function
  def grads(x):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(compressed(x, training=True))
    return tape.gradient(loss, model.trainable_variables)

  graph = grads.get_concrete_function(x).graph
  ops = _conv_grad_ops(graph)
  assert ops, 'no Conv2D gradient op in the step graph'
  found = set()
  for op in ops:
    try:
      found.add(op.get_attr('_kernel'))
    except ValueError:
      found.add(None)
  assert found == labels
  del y

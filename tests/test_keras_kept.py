"""blpa.keras.kept_bytes: a compressed model keeps no full-precision
activation for backward, in the traced graph of a training step.

This is the schedule-free form of the depth-doubling regression (the peak
form, tests/test_keras_memory.py, is slow and varies from run to run): the
graph of one step says which forward tensors its backward pass reads.
"""

import pytest
import keras
import numpy as np

from blpa import models
from blpa.keras import compress, kept_bytes
from blpa.keras.report import rows

BATCH = 16
SMALL_FLOAT = 64 * 1024   # logits, BN statistics, the dense layer's input


def _kept(rblocks, bits):
  model = models.keras_cifar_resnet(rblocks)
  reported = 0
  if bits is not None:
    model = compress(model, bits)
    reported = sum(r['bytes'] for r in rows(model, BATCH))
  return kept_bytes(model, BATCH), reported


@pytest.fixture(scope='module')
def resnets():
  """kept_bytes (and report's total) of ResNet-20 and ResNet-38, plain and
  compressed at 4 bits."""
  return {(rblocks, bits): _kept(rblocks, bits)
          for rblocks in (2, 4) for bits in (None, 4)}


@pytest.mark.parametrize('rblocks', [2, 4])
def test_compressed_keeps_only_codes(resnets, rblocks):
  kept, reported = resnets[(rblocks, 4)]
  assert kept['by_dtype'].get('float32', 0) <= SMALL_FLOAT, kept['tensors'][:5]
  largest_float = max(r[-1] for r in kept['tensors'] if r[2] == 'float32')
  assert largest_float <= BATCH * 256 * 4, kept['tensors'][:5]
  assert kept['by_dtype']['uint8'] == pytest.approx(reported, rel=0.01)


def test_depth_doubling_adds_codes_not_activations(resnets):
  """ResNet-20 -> ResNet-38: the compressed step keeps the added layers'
  4-bit codes (report's growth); plain Keras keeps their activations."""
  (k2, r2), (k4, r4) = resnets[(2, 4)], resnets[(4, 4)]
  growth = k4['total'] - k2['total']
  assert growth == pytest.approx(r4 - r2, rel=0.02, abs=SMALL_FLOAT)
  plain = resnets[(4, None)][0]['total'] - resnets[(2, None)][0]['total']
  assert plain > 12 * growth, (plain, growth)


def test_plain_keras_keeps_float_activations(resnets):
  plain = resnets[(2, None)][0]
  assert plain['by_dtype']['float32'] > 10 * resnets[(2, 4)][0]['total']
  # The largest kept tensors are full-size activations (16x32x32x16).
  assert plain['tensors'][0][-1] >= BATCH * 32 * 32 * 16 * 4


def test_eight_bits_keep_twice_the_codes_of_four():
  kept8, reported8 = _kept(2, 8)
  assert kept8['by_dtype']['uint8'] == pytest.approx(reported8, rel=0.01)
  assert reported8 == pytest.approx(2 * _kept(2, 4)[1], rel=0.01)


def test_bad_arguments_name_the_problem():
  model = keras.Sequential([keras.Input((None, None, 3)),
                            keras.layers.Conv2D(2, 3)])
  with pytest.raises(ValueError, match='unknown dimension.*input_shapes='):
    kept_bytes(model, 4)
  with pytest.raises(ValueError, match='batch_size'):
    kept_bytes(model, 0)
  # Shapes given for the unknown dimensions: counted.
  assert kept_bytes(model, 4, input_shapes=(8, 8, 3))['total'] == \
      kept_bytes(model, 4, inputs=np.zeros((1, 8, 8, 3), 'float32'))['total']

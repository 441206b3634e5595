"""Shared helpers for the tests: small networks and random batches."""

import json
import os

import numpy as np

from blpa import graph
from blpa.layers import NLDef

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                      'golden')


def golden_config():
  """The golden run's description (golden.json)."""
  with open(os.path.join(GOLDEN, 'golden.json')) as f:
    return json.load(f)


def golden_specs():
  """Layer specs of the golden 11-layer network."""
  return [(k, o, s, p, NLDef(*nl)) for k, o, s, p, nl in
          golden_config()['spec']]


def build(specs, input_shape, qtype=0, wd=2e-4, multi=False):
  """A closed Graph from specs."""
  net = graph.Graph(graph.SimpleData(input_shape), graph.LogLoss())
  for spec in specs:
    net.add(*spec)
  net.close(qtype, wd, multi)
  return net


def batch(shape, classes, seed=0):
  """A random float batch and integer labels [B, 1, 1, 1]."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  y = rng.integers(0, classes, size=(shape[0], 1, 1, 1)).astype(np.int32)
  return x, y


def every_kind_specs(classes=5):
  """A small network with every layer kind.

  Stem, max-pool block with res_out=2, odd channel counts, a join with
  channel padding and res_out=1, a downsampling join (2x2 box, padding),
  global average pool and a VALID final layer.  Input 16x16x3.
  """
  body = NLDef(True, True, False, None, False)
  return [
      (3, 8, 1, 'SAME', NLDef(False, False, False, None, False)),
      (1, 8, 1, 'SAME', NLDef(True, True, False, 2, False, maxpool=True)),
      (3, 7, 1, 'SAME', body),
      (1, 16, 1, 'SAME', body),
      (1, 12, 2, 'SAME', NLDef(True, True, True, 1, False)),
      (3, 9, 1, 'SAME', body),
      (1, 32, 1, 'SAME', body),
      (1, classes, 1, 'VALID', NLDef(True, True, True, None, True)),
  ]

"""Peak training memory stays nearly flat in depth at qtype 4.

Each measurement runs ``python -m blpa.memory`` in a fresh process with
``TF_CPU_ALLOCATOR_USE_BFC=true`` (TensorFlow's CPU allocator then keeps
peak statistics) and one inter-op thread (so that the executor's schedule,
and with it the peak, is repeatable).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _measure(method, rblocks, batch=16, size=32):
  env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC='true',
             TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=ROOT)
  out = subprocess.run(
      [sys.executable, '-m', 'blpa.memory', '--method', method, '--rblocks',
       str(rblocks), '--batch', str(batch), '--size', str(size), '--qtype',
       '4'], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def peaks():
  return {(m, r): _measure(m, r) for m in ('blpa', 'autodiff') for r in (2, 8)}


def test_blpa_peak_grows_only_by_stored_copies_and_weights(peaks):
  """From rblocks 2 to 8 the peak grows by about what must be resident.

  What must grow: the 4-bit copies of the added layers and their weights
  with momentum (two copies of the weights).  The step's working set (one
  layer's full-size temporaries) does not depend on depth.
  """
  small, deep = peaks['blpa', 2], peaks['blpa', 8]
  growth = deep['peak_bytes'] - small['peak_bytes']
  resident = (deep['saved_bytes'] - small['saved_bytes'] +
              2 * (deep['weight_bytes'] - small['weight_bytes']))
  assert 0 < growth <= 1.5 * resident, (
      f'peak grew by {growth / 1e6:.1f} MB for {resident / 1e6:.1f} MB more '
      'stored copies and weights')


def test_autodiff_peak_grows_with_depth(peaks):
  blpa = peaks['blpa', 8]['peak_bytes'] - peaks['blpa', 2]['peak_bytes']
  autodiff = (peaks['autodiff', 8]['peak_bytes'] -
              peaks['autodiff', 2]['peak_bytes'])
  assert autodiff >= 5 * blpa, (
      f'autodiff grew by {autodiff / 1e6:.1f} MB, blpa by {blpa / 1e6:.1f} MB')
  assert peaks['autodiff', 8]['peak_bytes'] >= 4 * peaks['blpa', 8][
      'peak_bytes']

"""The benchmark's own logic (bench/): batch search, report, naive baseline.

Marked slow: the benchmark is not part of the default suite.
"""

import json

import numpy as np
import pytest
import tensorflow as tf

from bench import common, report, run
from blpa import autodiff, models

pytestmark = pytest.mark.slow


class FakeRunner:
  """Peaks that grow linearly in the batch: ``fixed + per_image * batch``."""

  def __init__(self, fixed, per_image):
    self.fixed, self.per_image, self.calls = fixed, per_image, []

  def peak(self, key, rblocks, batch, repeats=None):
    del key, rblocks, repeats
    self.calls.append(batch)
    return {'peak_bytes': self.fixed + self.per_image * batch}


@pytest.mark.parametrize('fixed,per_image', [(100, 7), (5000, 3), (0, 50)])
def test_max_batch_finds_the_largest_fitting_batch(fixed, per_image):
  cap = 10_000
  runner = FakeRunner(fixed, per_image)
  points = [(b, fixed + per_image * b) for b in (4, 8, 16)]
  found = run.max_batch_one(runner, 'x', cap, 2, points)
  best = (cap - fixed) // per_image
  assert found['best']['batch'] >= 0.98 * best
  assert found['best']['peak_bytes'] <= cap
  assert len(runner.calls) <= 4


def test_max_batch_recovers_from_an_overshoot():
  """Peaks that grow faster than the sweep suggested: step down."""

  class Convex(FakeRunner):

    def peak(self, key, rblocks, batch, repeats=None):
      self.calls.append(batch)
      return {'peak_bytes': 10 * batch + batch**2 // 50}

  runner = Convex(0, 0)
  points = [(b, 10 * b + b**2 // 50) for b in (4, 8, 16)]
  found = run.max_batch_one(runner, 'x', 10_000, 2, points)
  assert found['best']['peak_bytes'] <= 10_000
  assert any(not t['fits'] for t in found['trials'])


def test_dumps_round_trips():
  obj = {'a': [1.234567891, 2, 'x'], 'b': {'c': [[1, 2], [3]]}, 'd': {}}
  back = json.loads(run._dumps(obj))  # pylint: disable=protected-access
  assert back['a'] == [1.23457, 2, 'x'] and back['b'] == obj['b']


def _layer_list(n, value):
  return {'layer_cosine': [value] * n, 'layer_relative_error': [0.1] * n,
          'cosine': [value] * n, 'relative_error': [0.1] * n}


def test_report_writes_tables_charts_and_verdicts(tmp_path):
  cfg = dict(run.CONFIGS['quick'])
  runs = [{'method_key': k, 'rblocks': r, 'batch': b,
           'peak_bytes': (10 if k == 'autodiff' else 1) * b * r * common.MIB,
           'saved_bytes': b * r * common.MIB // 2, 'weight_bytes': 1}
          for k, _, _, _ in common.METHODS
          for r, b in [(r, cfg['depth_batch']) for r in cfg['depth_rblocks']] +
          [(cfg['batch_rblocks'], b) for b in cfg['batches']]]
  fid_state = {'layers': [0, 1, 2], **{v: _layer_list(3, 0.995)
                                       for v in report.VARIANT_LABELS}}
  fid_state['naive_q4'] = _layer_list(3, 0.2)
  results = {
      'mode': 'quick', 'config': cfg, 'date': 'now', 'duration_s': 60,
      'machine': {'cpu': 'cpu', 'cores': 2, 'ram_gib': 8, 'device': 'CPU:0',
                  'tensorflow': tf.__version__, 'python': '3'},
      'memory': {'runs': runs, 'skipped': []},
      'timing': {'summary': {k: {'median_s': 1.0, 'time_ratio': 1.05,
                                 'images_per_s': 32, 'throughput_ratio': 0.95}
                             for k, _, _, _ in common.METHODS}},
      'max_batch': {'cap_bytes': common.GIB, 'rblocks': 2, 'methods': {
          k: {'best': {'batch': 70 if k == 'blpa_q4' else 10}}
          for k, _, _, _ in common.METHODS}},
      'fidelity': {'digits': {'data': 'digits', 'rblocks': 2, 'batch': 8,
                              'states': {'init': fid_state}}},
  }
  verdicts = {t['name']: t['met'] for t in report.targets(results)}
  assert verdicts == {'peak memory': True, 'largest batch': True,
                      'step time': True,
                      'gradient cosine at init (digits)': True}
  report.write(results, str(tmp_path))
  text = (tmp_path / 'results.md').read_text()
  assert 'blpa qtype 4' in text and 'MISSED' not in text
  for name in ('memory_depth', 'memory_batch', 'time_ratio', 'max_batch',
               'grad_fidelity'):
    assert (tmp_path / f'{name}.png').stat().st_size < 300_000


def test_naive_bits_zero_is_exact_and_four_bits_perturbs():
  shape = [4, 8, 8, 3]
  tf.random.set_seed(0)
  net = models.build(models.cifar_resnet(1), shape, qtype=0)
  x = tf.random.normal(shape)
  weights = [w.read_value() for w in net.weights]
  exact = autodiff.logits(net.layers, weights, x).numpy()
  np.testing.assert_array_equal(
      autodiff.logits(net.layers, weights, x, naive_bits=0).numpy(), exact)
  naive = autodiff.logits(net.layers, weights, x, naive_bits=4).numpy()
  assert not np.allclose(naive, exact)
  y = tf.constant([0, 1, 2, 3])
  grads = autodiff.gradients(net.layers, weights, x, y, 0.0, naive_bits=4)
  assert all(g is not None and np.all(np.isfinite(g)) for g in grads)
  with pytest.raises(ValueError, match='naive_bits'):
    autodiff.logits(net.layers, weights, x, naive_bits=2)

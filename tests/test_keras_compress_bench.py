"""bench/keras_compress.py's tables: how a largest-batch search reads."""

import pytest

from bench import keras_compress


def _row(best, trials, line=None):
  return {'blpa_max_batch': best, 'blpa_max_line': line,
          'blpa_max_trials': [{'batch': b, 'fits': f} for b, f in trials]}


@pytest.mark.parametrize('best,trials,line,text', [
    (2212, [(2619, False), (2258, False), (2212, True)], 2247,
     '2212 to 2257 (line 2247)'),
    (74, [(74, True), (75, False)], 75, '74 (line 75)'),
    (1026, [(853, True), (969, True), (1026, True)], 1076,
     '≥ 1026 (line 1076)'),
    (512, [(512, True), (300, False)], 512, '≥ 512'),
    (None, [(64, False)], None, 'n/a'),
])
def test_largest_batch_says_what_the_probes_bound(best, trials, line, text):
  """A verified batch reads as exact, bracketed by the smallest failing
  probe above it, or a lower bound when no probe above it failed."""
  assert keras_compress._max_batch(_row(best, trials, line), 'blpa') == text


def test_time_only_writes_the_step_time_table(tmp_path, monkeypatch):
  """--time-only times plain, bits 4 and bits 8 in one process and writes
  the table (a ResNet-8 at batch 4, one round)."""
  monkeypatch.setattr(keras_compress, 'RESULTS', str(tmp_path))
  rows = keras_compress.main(['--time-only', '--models', 'resnet164',
                              '--batches', '4', '--rblocks', '1',
                              '--rounds', '1'])
  assert [r['model'] for r in rows] == ['resnet164']
  assert all(rows[0][k] > 0 for k in ('plain_s', 'bits4_s', 'bits8_s'))
  table = (tmp_path / 'keras_step_time.md').read_text()
  assert '| resnet164 | 4 |' in table
  assert (tmp_path / 'keras_step_time.json').exists()

"""bench/keras_transformers.py at a tiny size: its code path and its output."""

import json

from bench import keras_transformers as kt


def test_quick_run_writes_the_tables_and_compressed_peak_is_lower(
    tmp_path, monkeypatch):
  """The --quick configuration (1-layer BERT, sequence 32, batch 2): peaks
  of plain Keras and compress(4) in fresh BFC processes, the interleaved
  step times, and the .md and .json. Plain keeps the float32 attention
  scores, probabilities and dropout masks of the layer for backward,
  compress(4) 4-bit copies, so its peak must be lower."""
  monkeypatch.setattr(kt, 'RESULTS', str(tmp_path))
  rows = kt.main(['--quick', '--models', 'bert', '--dropouts', '0.1',
                  '--configs', 'plain,bits4', '--no-max-batch',
                  '--rounds', '1', '--jobs', '2'])
  assert len(rows) == 1
  r = rows[0]
  assert (r['model'], r['dropout'], r['batch']) == ('bert', 0.1, 2)
  assert not r.get('errors'), r.get('errors')
  assert not r.get('time_errors'), r.get('time_errors')
  assert 0 < r['peaks']['bits4'] < r['peaks']['plain'], r['peaks']
  assert set(r['step_s']) == {'plain', 'bits4'}
  assert all(t > 0 for t in r['step_s'].values())
  assert r['targets']['peak_ratio'] > 1
  saved = json.loads((tmp_path / 'keras_transformers.json').read_text())
  assert saved['results'][0]['peaks'] == r['peaks']
  assert saved['machine'] and saved['date'] and saved['command']
  table = (tmp_path / 'keras_transformers.md').read_text()
  assert '| bert | 0.1 | 2 |' in table
  assert "RematScope('full') MiB" in table
  assert 'Targets for compress(4)' in table
  assert 'not measured in this run (--no-max-batch)' in table
  assert 'Date 20' in table and 'Machine: ' in table
  (tmp_path / 'keras_transformers.md').unlink()
  kt.main(['--rewrite'])  # the .md again, from the .json
  assert (tmp_path / 'keras_transformers.md').read_text() == table


def test_largest_batch_cell_says_what_the_probes_bound():
  """A verified batch reads as exact, bracketed by the smallest failing
  probe above it, or a lower bound when no probe above it failed."""
  def row(best, trials, line):
    return {'max_batch': {'bits4': {
        'best': best, 'line': line,
        'trials': [{'batch': b, 'fits': f} for b, f in trials]}}}
  assert kt._max_batch(row(190, [(200, False), (190, True)], 200),
                       'bits4') == '190 to 199 (line 200)'
  assert kt._max_batch(row(45, [(45, True), (46, False)], None),
                       'bits4') == '45'
  assert kt._max_batch(row(45, [(45, True)], 47),
                       'bits4') == '≥ 45 (line 47)'
  assert kt._max_batch({}, 'bits4') == 'n/a'


def test_remat_scope_builds_the_layers_inside_the_scope():
  """RematScope applies to layers created in it: every layer of the model
  built under the scope records the mode, none of the plain one does."""
  plain = kt.build('vit', 0.0, quick=True)
  remat = kt.build('vit', 0.0, quick=True, remat='activations')
  def modes(model):
    return {getattr(l, '_remat_mode', None) and l._remat_mode.mode
            for l in model._flatten_layers(include_self=True)}  # pylint: disable=protected-access
  assert modes(plain) == {None}
  assert modes(remat) == {'activations'}

"""The README and docs against what they describe: the op list, the
programs' flags, figures against the committed results files they cite."""

import glob
import os
import re

from tests import programs
from tests.conftest import ROOT


def _read(*path):
  with open(os.path.join(ROOT, *path), encoding='utf-8') as f:
    return f.read()


def _table_rows(text):
  return [l for l in text.splitlines() if l.startswith('|')]


def test_readme_names_every_registered_op():
  ops = set()
  for path in glob.glob(os.path.join(ROOT, 'ops', '*_ops.cc')):
    with open(path, encoding='utf-8') as f:
      ops |= set(re.findall(r'REGISTER_OP\("(\w+)"\)', f.read()))
  assert len(ops) >= 15, ops
  section = _read('README.md').split('## Building the ops', 1)[1]
  section = section.split('\n## ', 1)[0]
  missing = sorted(op for op in ops if f'`{op}`' not in section)
  assert not missing, f'README "Building the ops" does not name {missing}'


def test_fixed_point_table_is_the_committed_run():
  results = _read('bench', 'results', 'fixedpoint_demo.md')
  for what in ('Command: `python -m blpa.fixedpoint.demo', 'Date: ',
               'Machine: '):
    assert what in results, what
  table = _table_rows(results)
  assert len(table) == 2 + 7  # header, rule, float32 and six word lengths
  readme = _read('README.md')
  start = readme.index(table[0])
  assert _table_rows(readme[start:])[:len(table)] == table
  assert 'bench/results/fixedpoint_demo.md' in readme


def test_both_training_programs_accept_eval_only():
  """The README says the programs accept --eval-only."""
  assert '`--eval-only`' in _read('README.md')
  cifar = programs.load_program('cifar/train.py')
  imagenet = programs.load_program('imagenet/train.py')
  assert cifar.parse_args(['-save', 'm.npz', '--eval-only']).eval_only
  assert imagenet.parse_args(['-save', 'm.npz', '--eval-only']).eval_only


def test_algorithm_page_replaces_the_missing_design_file():
  algorithm = _read('docs', 'algorithm.md')
  for what in ('## The idea', 'shift = clamp(n/2', '## The backward pass',
               'Faults of the reference'):
    assert what in algorithm, what
  for path in (('blpa', 'layers.py'), ('tests', 'data', 'golden',
                                       'README.md')):
    text = _read(*path)
    assert 'DESIGN.md' not in text and 'docs/algorithm.md' in text, path


def test_memory_table_is_the_committed_benchmark():
  """README's ResNet-164 table: the numbers of bench/results/results.json
  (peaks, ratios to keras, step-time ratios, largest batches)."""
  import json  # pylint: disable=import-outside-toplevel
  results = json.loads(_read('bench', 'results', 'results.json'))
  rblocks, batch = (results['config']['time_rblocks'],
                    results['config']['time_batch'])
  peaks = {r['method_key']: r['peak_bytes'] / 2**20
           for r in results['memory']['runs']
           if (r['rblocks'], r['batch']) == (rblocks, batch)}
  ratio = {k: v['time_ratio'] for k, v in
           results['timing']['summary'].items()}
  best = {k: (v.get('best') or {}).get('batch')
          for k, v in results['max_batch']['methods'].items()}

  def cells(*keys):
    return [' / '.join(f'{peaks[k]:.0f}' for k in keys),
            ' / '.join(f'{peaks["keras"] / peaks[k]:.1f}' for k in keys),
            ' / '.join(f'{ratio[k]:.2f}' for k in keys)]

  want = {
      '`tf.keras` model': cells('keras') + [str(best['keras'])],
      '`tf.keras` + `recompute_grad` per block':
          cells('keras_recompute') + [''],
      'autodiff twin (`blpa.autodiff`, gradient reference)':
          cells('autodiff') + [''],
      'blpa qtype 0 / 8 / 4': cells('blpa_q0', 'blpa_q8', 'blpa_q4') + [
          ' / '.join(str(best.get(k) or '—')
                     for k in ('blpa_q0', 'blpa_q8', 'blpa_q4'))],
  }
  readme = _read('README.md')
  start = readme.index('| ResNet-164, batch 128 | peak MiB |')
  rows = _table_rows(readme[start:])[2:]
  got = {}
  for row in rows[:len(want)]:
    parts = [p.strip() for p in row.strip('|').split('|')]
    got[parts[0]] = parts[1:]
  assert got == want


def test_committed_results_say_when_where_and_how():
  """Each results file the README cites names its date, machine and
  command; the approx_step speed-ups the README quotes are its figures."""
  for name in ('approx_step.md', 'fixedpoint_demo.md', 'approx.md',
               'results.md'):
    text = _read('bench', 'results', name)
    assert re.search(r'(Date|Run) 2026-\d\d-\d\d|Date: 2026-\d\d-\d\d',
                     text), name
    assert 'Machine' in text, name
    assert 'ommand' in text or 'bench/run.py' in _read('README.md'), name
  step = _read('bench', 'results', 'approx_step.md')
  readme = _read('README.md')
  for figure in re.findall(r'\| (\d\.\d\d)× \|', step):
    assert f'{figure}×' in readme, figure


#: The Markdown files whose figures and images these tests check.
DOC_FILES = ('README.md', 'bench/README.md', *sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs',
                                                             '*.md'))))


def test_every_image_is_shown_and_every_shown_image_exists():
  """Each PNG under docs/ is shown by a Markdown file (none left without a
  place that says where it comes from), and each image a Markdown file
  shows exists."""
  shown = set()
  for name in DOC_FILES:
    folder = os.path.dirname(os.path.join(ROOT, name))
    for target in re.findall(r'!\[[^\]]*\]\(([^)\s]+)\)', _read(name)):
      path = os.path.normpath(os.path.join(folder, target))
      assert os.path.exists(path), f'{name} shows {target}: no such file'
      shown.add(path)
  unshown = sorted(os.path.relpath(p, ROOT) for p in glob.glob(
      os.path.join(ROOT, 'docs', '*.png')) if os.path.normpath(p) not in shown)
  assert not unshown, f'images under docs/ that no Markdown file shows: ' \
      f'{unshown}'


def test_no_figure_is_from_an_output_that_was_not_kept():
  """The README and docs/ cite committed outputs; a figure whose output
  was "not kept" has no source."""
  for name in DOC_FILES:
    found = re.findall(r'[^.]*\bnot\s+kept\b[^.]*', _read(name))
    assert not found, f'{name}: {found}'


def test_demo_curves_come_from_the_committed_logs():
  """docs/demo_curves.png is plotted from bench/results/demo_q0.jsonl and
  demo_q4.jsonl (README, demo.md), whose final running-statistics
  accuracies are the README's 0.9944 (exact) and 0.9917 (4 bits)."""
  import json  # pylint: disable=import-outside-toplevel
  final = {}
  for q in (0, 4):
    rows = [json.loads(l) for l in _read(
        'bench', 'results', f'demo_q{q}.jsonl').splitlines() if l.strip()]
    final[q] = [r for r in rows if 'val_acc_running' in r][-1]
    assert final[q]['iter'] == 600
  readme = _read('README.md')
  assert (f"(test accuracy {final[0]['val_acc_running']:.4f} and "
          f"{final[4]['val_acc_running']:.4f} with running BN statistics"
          ) in readme
  assert 'bench/results/demo_q0.jsonl' in readme
  demo = _read('bench', 'results', 'demo.md')
  assert ('python -m blpa.plot bench/results/demo_q0.jsonl '
          'bench/results/demo_q4.jsonl') in demo
  assert '-o docs/demo_curves.png' in demo

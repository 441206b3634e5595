"""The benchmark's own logic (bench/): batch search, report, baselines,
and each section's and script's code path in a tiny configuration.

These run in the default suite (ResNet-5 or ResNet-11 on 8×8 or 32×32
images, batches of 2 to 4; the memory section's one measurement is a fresh
process); the benchmark itself is not run here. Marked slow: timing one
real approx_step configuration, and the fidelity section with its
training run (its at-init half runs here).
"""

import contextlib
import importlib
import io
import json

import numpy as np
import pytest
import tensorflow as tf

from bench import common, report, run
from blpa import autodiff, memory, models


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


def _fake_results(cfg):
  """Results of every method: keras 10x blpa's peak, blpa q4 1.04x its time."""
  rows = [(r, cfg['depth_batch']) for r in cfg['depth_rblocks']] + [
      (cfg['batch_rblocks'], b) for b in cfg['batches']]
  runs = [{'method_key': k, 'rblocks': r, 'batch': b,
           'peak_bytes': (10 if k == 'keras' else 1) * b * r * common.MIB,
           'saved_bytes': b * r * common.MIB // 2, 'weight_bytes': 1}
          for k, _, _, _ in common.METHODS for r, b in rows]
  head = next(r for r in runs if r['method_key'] == 'blpa_q4' and (
      r['rblocks'], r['batch']) == (cfg['time_rblocks'], cfg['time_batch']))
  head['breakdown'] = {name: common.MIB for name, _ in
                       report.BREAKDOWN_LABELS}
  head['phase_peak_bytes'] = {'forward': common.MIB, 'backward': 2 * common.MIB}
  ratios = {'blpa_q4': 1.04, 'blpa_q0': 1.02}
  fid_state = {'layers': [0, 1, 2], **{v: _layer_list(3, 0.995)
                                       for v in report.VARIANT_LABELS}}
  fid_state['naive_q4'] = _layer_list(3, 0.2)
  return {
      'mode': 'quick', 'config': cfg, 'date': 'now', 'duration_s': 60,
      'machine': {'cpu': 'cpu', 'cores': 2, 'ram_gib': 8, 'device': 'CPU:0',
                  'onednn': '1', 'tensorflow': tf.__version__, 'python': '3'},
      'memory': {'runs': runs, 'skipped': []},
      'timing': {'summary': {k: {'median_s': 1.0,
                                 'time_ratio': ratios.get(k, 1.0),
                                 'images_per_s': 32, 'throughput_ratio': 0.95}
                             for k, _, _, _ in common.METHODS}},
      'max_batch': {'cap_bytes': common.GIB, 'rblocks': 2, 'methods': {
          k: {'best': {'batch': 70 if k == 'blpa_q4' else 10}}
          for k, _, _, _ in common.METHODS}},
      'fidelity': {'digits': {'data': 'digits', 'rblocks': 2, 'batch': 8,
                              'states': {'init': fid_state}}},
  }


def test_report_writes_tables_charts_and_verdicts(tmp_path):
  results = _fake_results(dict(run.CONFIGS['quick']))
  results['targets'] = report.targets(results)
  verdicts = {t['name']: t['met'] for t in results['targets']}
  assert verdicts == {'peak memory': True, 'largest batch': True,
                      'step time blpa qtype 4': True,
                      'step time blpa qtype 0': False,
                      'gradient cosine at init (digits)': True}
  report.write(results, str(tmp_path))
  text = (tmp_path / 'results.md').read_text()
  assert 'keras ÷ peak' in text and 'time × keras' in text
  assert 'What blpa holds at its peak' in text and '1 / 2' in text
  assert text.count('MISSED') == 1  # blpa qtype 0 at 1.02x keras
  for name in ('memory_depth', 'memory_batch', 'time_ratio', 'max_batch',
               'grad_fidelity'):
    assert (tmp_path / f'{name}.png').stat().st_size < 300_000


def test_headline_rows_replace_only_what_was_measured_again():
  old = {'runs': [{'method_key': 'keras', 'rblocks': 18, 'batch': 128,
                   'peak_bytes': 1},
                  {'method_key': 'keras', 'rblocks': 18, 'batch': 16,
                   'peak_bytes': 2}], 'skipped': []}
  new = {'runs': [{'method_key': 'keras', 'rblocks': 18, 'batch': 128,
                   'peak_bytes': 3}], 'skipped': []}
  merged = run.merge_memory(old, new)
  assert sorted(r['peak_bytes'] for r in merged['runs']) == [2, 3]
  assert run.memory_configs(run.CONFIGS['full'], headline=True) == [(18, 128)]


def test_keras_recompute_segments_give_the_same_gradients():
  """keras_recompute is the keras model cut at its joins, not another net."""
  shape = [4, 8, 8, 3]
  tf.random.set_seed(0)
  plain = memory.KerasTrainer(1, shape)
  cut = memory.KerasTrainer(1, shape, recompute=True)
  for a, b in zip(plain.model.variables, cut.model.variables):
    b.assign(a)
  x = tf.random.normal(shape)
  y = tf.constant([0, 1, 2, 3])
  grads = []
  for trainer in (plain, cut):
    with tf.GradientTape() as tape:
      out = trainer.logits(x)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=y, logits=out))
    grads.append(tape.gradient(loss, trainer.model.trainable_variables))
  assert len(memory.keras_segments(plain.model)) == 3 + 2  # stem, blocks, head
  for a, b in zip(*grads):
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)
  # The same number of weights as blpa's network (same architecture).
  net = models.build(models.cifar_resnet(1), shape)
  assert sum(int(np.prod(w.shape)) for w in net.weights) == sum(
      int(np.prod(v.shape)) for v in plain.model.trainable_variables)
  acc, xent = plain.step(x, y)
  assert 0 <= float(acc) <= 1 and np.isfinite(float(xent))


def test_peak_breakdown_adds_up_to_the_peak():
  shape = [16, 32, 32, 3]
  net = models.build(models.cifar_resnet(1), shape, qtype=4)
  parts = memory.peak_breakdown(net, 16, peak=50 * common.MIB)
  assert parts['compact_copies'] + parts['full_copies'] == sum(
      b for _, _, b in net.saved_bytes(16))
  assert parts['widest_activation'] == 16 * 32 * 32 * 64 * 4
  kinds = [k for k, _ in report.BREAKDOWN_LABELS]
  assert sum(parts[k] for k in kinds) == 50 * common.MIB
  assert parts['total_explained'] + parts['unexplained'] == 50 * common.MIB


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


@pytest.mark.slow
def test_approx_step_times_every_model():
  from bench import approx_step
  got = approx_step.measure(ratios=(0.5, 0.33), depth=10, width=1, batch=4,
                            rounds=2, warmup=1)
  assert got['network'] == 'WRN-10-1' and got['exact_ms'] > 0
  assert set(got['speedup']) == {'0.5', '0.33'}
  assert got['channel_ops'] in ('native', 'python')
  with pytest.raises(ValueError, match='ratios must lie in'):
    approx_step.measure(ratios=(1.0,))


def test_approx_step_tiny():
  """bench/approx_step.py's code path on the smallest WRN, one round."""
  from bench import approx_step  # pylint: disable=import-outside-toplevel
  got = approx_step.measure(ratios=(0.5,), depth=10, width=1, batch=2,
                            rounds=1, warmup=0)
  assert got['network'] == 'WRN-10-1' and got['exact_ms'] > 0
  assert set(got['speedup']) == {'0.5'} and got['speedup']['0.5'] > 0


class InProcessRunner(run.Runner):
  """Runs a section's measuring module in this process (no cache): its
  ``main(argv)``, whose printed JSON line is the result."""

  def __init__(self, config):  # pylint: disable=super-init-not-called
    self.config, self.fresh, self.cache, self.modules = config, True, {}, []
    self.ram_limit = 64 * common.GIB

  def run(self, key, args, environ):
    del key, environ
    assert args[0] == '-m'
    self.modules.append(args[1])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      importlib.import_module(args[1]).main(args[2:])
    return json.loads(out.getvalue().strip().splitlines()[-1])


#: A tiny configuration: ResNet-5 (rblocks 1) on 8×8 images, batch 2-4.
TINY = dict(run.CONFIGS['quick'], size=8, time_rblocks=1, time_batch=2,
            time_steps=1, time_warmup=0, fid_rblocks=1, fid_batch=4,
            fid_train_iters=1, fid_train_batch=2, fid_data=['synthetic'],
            quant_shape=[2, 2, 2, 8], quant_reps=1,
            methods=['keras', 'blpa_q4'])


def _tiny_results(runner, **sections):
  results = {'mode': 'quick', 'config': runner.config, 'date': 'now',
             'duration_s': 1, 'machine': run.machine(),
             'memory': {'runs': [], 'skipped': []}, **sections}
  results['targets'] = report.targets(results)
  return results


def test_timing_and_quant_ops_sections_in_a_tiny_configuration(tmp_path):
  """The timing and quantization-op sections run their measuring modules
  (bench.timing, bench.quantops) on a tiny network and tensor, in this
  process, and the report is written from their results. (The memory and
  max-batch sections need a fresh process with the BFC allocator per
  measurement: their logic is checked with fake peaks above.)"""
  runner = InProcessRunner(TINY)
  timing = run.timing_section(runner, TINY)
  assert set(timing['summary']) == {'keras', 'blpa_q4'}, timing
  assert timing['summary']['keras']['time_ratio'] == 1.0
  assert all(t > 0 for t in timing['step_times']['blpa_q4'])
  quant_ops = run.quant_ops_section(runner, TINY)
  assert quant_ops['native']['q4']['save_function_ms'] > 0
  assert quant_ops['python']['q8']['restore_eager_ms'] > 0
  assert runner.modules == ['bench.timing', 'bench.quantops']
  results = _tiny_results(runner, timing=timing, quant_ops=quant_ops)
  names = {t['name'] for t in results['targets']}
  assert {'step time blpa qtype 4', 'quantization kernels'} <= names, names
  report.write(results, str(tmp_path))
  text = (tmp_path / 'results.md').read_text()
  assert 'Quantization ops' in text and 'blpa qtype 4' in text


@pytest.mark.slow
def test_fidelity_section_in_a_tiny_configuration(tmp_path):
  """bench.fidelity on ResNet-5, 8×8 synthetic images: every variant's
  per-layer cosines, at init and after one training step, and the report.
  (About a minute on a loaded 2-core machine: slow.)"""
  runner = InProcessRunner(TINY)
  fidelity = run.fidelity_section(runner, TINY)
  states = fidelity['synthetic']['states']
  assert set(states) == {'init', 'trained'}
  cos = states['init']['blpa_q8']['layer_cosine']
  assert len(cos) > 0 and all(-1 <= c <= 1.0001 for c in cos)
  results = _tiny_results(runner, fidelity=fidelity)
  assert 'gradient cosine at init (synthetic)' in {
      t['name'] for t in results['targets']}
  report.write(results, str(tmp_path))
  assert 'Gradient fidelity' in (tmp_path / 'results.md').read_text()


def test_breakdown_rows_add_up_to_the_peak_and_steps_are_counted():
  """A stored breakdown with a kind the table does not list (an older
  blpa.memory's) still adds up to the measured peak; the timing sentence
  counts the steps that were timed, not the configuration's."""
  cfg = dict(run.CONFIGS['quick'])
  results = _fake_results(cfg)
  head = next(r for r in results['memory']['runs']
              if 'breakdown' in r)
  head['breakdown']['widest_gradient_in'] = 5 * common.MIB  # not listed
  head['peak_bytes'] = 20 * common.MIB
  results['timing']['step_times'] = {'keras': [1.0] * 3}
  results['timing']['warmup'] = 1
  parts = report._breakdown(head)  # pylint: disable=protected-access
  assert sum(parts.values()) == 20 * common.MIB
  text = report.markdown(results)
  assert 'median of 3 interleaved steps after 1 warm-up steps' in text
  assert f'| **{20:.1f}** |' in text


def test_memory_section_measures_in_a_fresh_process(tmp_path):
  """The memory section's real path: run.Runner starts ``python -m
  blpa.memory`` with the BFC allocator (ResNet-5, 8×8 images, batch 2),
  and the row holds what the process measured for that configuration.
  (max_batch_section measures through the same Runner.peak; its search is
  checked with fake peaks above.)"""
  cfg = dict(TINY, methods=['blpa_q4'], repeats=1, timeout_s=300)
  runner = run.Runner(str(tmp_path), cfg, fresh=True)
  out = run.memory_section(runner, cfg, [(1, 2)])
  assert out['skipped'] == [], out
  (row,) = out['runs']
  net = models.build(models.cifar_resnet(1), [2, 8, 8, 3], qtype=4)
  assert (row['method_key'], row['rblocks'], row['batch']) == (
      'blpa_q4', 1, 2)
  assert row['saved_bytes'] == sum(b for _, _, b in net.saved_bytes(2))
  assert row['weight_bytes'] == memory.weight_bytes(net)
  assert row['peak_bytes'] >= 2 * row['weight_bytes'] + row['saved_bytes']
  assert sum(row['breakdown'][k] for k, _ in report.BREAKDOWN_LABELS) == (
      row['peak_bytes'])
  assert set(row['phase_peak_bytes']) == {'forward', 'backward'}
  cached = json.loads((tmp_path / 'cache.json').read_text())
  assert cached['peak/blpa_q4/r1/b2/s8']['peak_bytes'] == row['peak_bytes']


def test_fidelity_section_at_init_in_a_tiny_configuration(tmp_path):
  """The fidelity section without its training run (fid_train_iters 0),
  the slow test's other half: every variant against the exact gradient at
  init on ResNet-5, 8×8 synthetic images, and the report. Autodiff of the
  same network is the exact gradient; blpa at 8 bits is close to it."""
  cfg = dict(TINY, fid_train_iters=0)
  runner = InProcessRunner(cfg)
  fidelity = run.fidelity_section(runner, cfg)
  assert runner.modules == ['bench.fidelity']
  states = fidelity['synthetic']['states']
  assert set(states) == {'init'}
  init = states['init']
  assert min(init['autodiff_exact']['layer_cosine']) > 0.9999
  assert max(init['autodiff_exact']['layer_relative_error']) < 1e-4
  assert min(init['blpa_q8']['layer_cosine']) > 0.99
  results = _tiny_results(runner, fidelity=fidelity)
  report.write(results, str(tmp_path))
  assert 'Gradient fidelity' in (tmp_path / 'results.md').read_text()


def test_quantizer_range_six_is_blpas_quantizer():
  """bench/quantizer_range.py: its quantizer at range 6 gives blpa.quant's
  codes and restored values (what makes its other ranges comparable), and
  main prints the cosines of each range (ResNet-5, 8×8, batch 2)."""
  from bench import quantizer_range  # pylint: disable=import-outside-toplevel
  from blpa import quant  # pylint: disable=import-outside-toplevel
  save, restore = quantizer_range.ranged_ops(6.0)
  act = tf.random.normal([2, 3, 3, 8]) * 2
  offset = tf.random.normal([8])
  for bits in (4, 8):
    codes = quant.save_act(act, offset, bits)
    np.testing.assert_array_equal(save(act, offset, bits).numpy(),
                                  codes.numpy())
    for got, want in zip(restore(codes, offset, bits),
                         quant.restore_act(codes, offset, bits)):
      np.testing.assert_array_equal(got.numpy(), want.numpy())
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    quantizer_range.main(['--rblocks', '1', '--batch', '2', '--size', '8',
                          '--ranges', '6'])
  got = json.loads(out.getvalue().strip().splitlines()[-1])
  for q in ('q8', 'q4'):
    cosines = got['ranges']['6.0'][q]
    assert -1 <= cosines['min_cosine'] <= cosines['median_cosine'] <= 1.0001


def test_profile_step_tables_in_a_tiny_configuration(tmp_path):
  """bench/profile_step.py on ResNet-11 at batch 2, one round: a section per
  title (a second run replaces its own section, keeps the other), op time
  by kind for every method, blpa's native ops only in blpa's steps."""
  from bench import profile_step  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'profile.md'
  profile_step.write_section(str(path), 'before', '## before\n\nold\n')
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    profile_step.main(['--rblocks', '1', '--batch', '2', '--rounds', '1',
                       '--methods', 'keras', 'blpa_q4', '--title', 'after',
                       '--out', str(path)])
  text = path.read_text()
  assert text.index('## before') < text.index('## after')
  assert 'old' in text and 'ResNet-11, batch 2' in text
  native = next(l for l in text.splitlines()
                if l.startswith('| blpa native ops |'))
  keras_s, blpa_s = (float(c) for c in native.strip('|').split('|')[1:])
  assert keras_s == 0 and blpa_s > 0
  assert profile_step.op_kind('Conv2DBackpropFilter') == 'conv'
  assert profile_step.op_kind('BlpaBnReluGrad') == 'blpa native ops'

"""Benchmarks blpa against what users would use instead.

Compares, on the same CIFAR ResNet and batch, the same network as a
``tf.keras`` model trained as a Keras user would (``keras``, the baseline of
every ratio), the same with ``tf.recompute_grad`` per block
(``keras_recompute``), blpa's op-by-op GradientTape twin (``autodiff``, the
gradient reference) with and without ``tf.recompute_grad`` (``recompute``)
and blpa at qtype 0, 8 and 4:

* peak memory of a training step (each configuration in its own process,
  BFC allocator statistics, one inter-op thread), against depth and batch,
  the bytes of saved activations blpa predicts per layer, and what blpa
  holds at its peak by kind;
* step time and images/s, as ratios to keras measured in the same run;
* the largest batch under a memory cap (extrapolate, then verify);
* gradient fidelity per layer of blpa qtype 8/4 and of naive K-bit
  backprop, against the exact gradient, at init and after training;
* throughput of the quantization ops (C++ kernels, pure-TF fallback, copy).

Usage (from the repository root)::

    python bench/run.py            # full: ResNet-164, batch 128 (about 1 h)
    python bench/run.py --quick    # small depth and batch (a few minutes)
    python bench/run.py --headline # only the ResNet-164 batch-128 rows

Writes ``results.json``, ``results.md`` and PNG charts to ``--out``
(default ``bench/results/``; ``--quick`` defaults to
``bench/results/quick/``).  Raw measurements are cached in
``OUT/cache.json`` so that an interrupted run resumes; ``--fresh`` measures
again.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

if __package__ in (None, ''):  # run as a script: python bench/run.py
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

import numpy as np  # pylint: disable=wrong-import-position

from bench import common  # pylint: disable=wrong-import-position
from bench import report  # pylint: disable=wrong-import-position

CONFIGS = {
    'full': {
        'size': 32,
        'depth_rblocks': [2, 6, 18], 'depth_batch': 128,
        'batch_rblocks': 18, 'batches': [16, 32, 64, 128],
        'repeats': 2,
        'time_rblocks': 18, 'time_batch': 128, 'time_steps': 10,
        'time_warmup': 2,
        'cap_bytes': 2 * common.GIB, 'cap_rblocks': 18,
        'fid_rblocks': 18, 'fid_batch': 128, 'fid_train_iters': 300,
        'fid_train_batch': 32,
        'fid_data': ['synthetic', 'digits', 'patches'],
        'quant_shape': [128, 32, 32, 64], 'quant_reps': 30,
        'timeout_s': 3600,
    },
    'quick': {
        'size': 32,
        'depth_rblocks': [1, 2, 3], 'depth_batch': 16,
        'batch_rblocks': 2, 'batches': [8, 16, 32],
        'repeats': 2,
        'time_rblocks': 2, 'time_batch': 32, 'time_steps': 8,
        'time_warmup': 2,
        'cap_bytes': 128 * common.MIB, 'cap_rblocks': 2,
        'fid_rblocks': 2, 'fid_batch': 64, 'fid_train_iters': 40,
        'fid_train_batch': 32, 'fid_data': ['digits'],
        'quant_shape': [128, 32, 32, 64], 'quant_reps': 10,
        'timeout_s': 900,
    },
}
SECTIONS = ('memory', 'timing', 'max_batch', 'fidelity', 'quant_ops')


def log(msg):
  print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


class Runner:
  """Runs measurement subprocesses, with a cache and a RAM guard."""

  def __init__(self, out_dir, config, fresh):
    self.config = config
    self.path = os.path.join(out_dir, 'cache.json')
    self.fresh = fresh
    self.cache = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.cache = json.load(f)
    self.ram_limit = 0.8 * _total_ram()

  def run(self, key, args, environ):
    """``run_json`` of ``args``, cached under ``key``."""
    hit = None if self.fresh else self.cache.get(key)
    if hit is not None:
      return hit
    result = common.run_json(args, environ, self.config['timeout_s'], log)
    if 'error' in result:
      log(f'  failed: {result["error"]}')
    self.cache[key] = result
    with open(self.path + '.tmp', 'w') as f:
      json.dump(self.cache, f)
    os.replace(self.path + '.tmp', self.path)
    return result

  def peak(self, method_key, rblocks, batch, repeats=None):
    """Peak bytes of one training step, in a fresh BFC process."""
    _, _, method, qtype = _method(method_key)
    repeats = repeats or self.config['repeats']
    key = f'peak/{method_key}/r{rblocks}/b{batch}/s{self.config["size"]}'
    if repeats != self.config['repeats']:
      key += f'/x{repeats}'
    args = ['-m', 'blpa.memory', '--method', method, '--rblocks',
            str(rblocks), '--batch', str(batch), '--qtype', str(qtype),
            '--size', str(self.config['size']), '--repeats', str(repeats)]
    return self.run(key, args, common.env(bfc=True))

  def estimate(self, method_key, rblocks, batch, runs):
    """Peak bytes expected from earlier runs (None if nothing to go by)."""
    same = [r for r in runs if r['method_key'] == method_key
            and 'peak_bytes' in r]
    rows = [r for r in same if r['rblocks'] == rblocks]
    if rows:
      r = max(rows, key=lambda r: r['batch'])
      return r['peak_bytes'] * batch / r['batch']
    rows = [r for r in same if r['batch'] == batch]
    if rows:
      r = max(rows, key=lambda r: r['rblocks'])
      return r['peak_bytes'] * common.depth(rblocks) / common.depth(
          r['rblocks'])
    return None


def method_keys(cfg):
  """The methods measured: ``cfg['methods']`` if set, else all of them."""
  return cfg.get('methods') or [key for key, _, _, _ in common.METHODS]


def _method(key):
  return next(m for m in common.METHODS if m[0] == key)


def _total_ram():
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return 16 * common.GIB


# ----------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------


def memory_configs(cfg, headline=False):
  """``(rblocks, batch)`` pairs of the memory section, smallest first.

  Args:
    cfg: the mode's configuration.
    headline: only the headline configuration (the timing depth and batch).
  """
  if headline:
    return [(cfg['time_rblocks'], cfg['time_batch'])]
  return sorted({(r, cfg['depth_batch']) for r in cfg['depth_rblocks']} |
                {(cfg['batch_rblocks'], b) for b in cfg['batches']})


def merge_memory(old, new):
  """``old``'s memory runs with those of ``new`` measured again replaced."""
  if not old:
    return new
  ident = lambda r: (r['method_key'], r['rblocks'], r['batch'])
  fresh = {ident(r) for r in new['runs']} | {ident(s) for s in new['skipped']}
  return {k: [r for r in old[k] if ident(r) not in fresh] + new[k]
          for k in ('runs', 'skipped')}


def memory_section(runner, cfg, configs):
  """Peaks of every method at ``configs``; skips what would not fit in RAM."""
  runs, skipped = [], []
  for rblocks, batch in configs:
    for key in method_keys(cfg):
      est = runner.estimate(key, rblocks, batch, runs)
      if est is not None and est > runner.ram_limit:
        why = (f'estimated peak {est / common.GIB:.1f} GiB exceeds 80% of '
               f'RAM ({runner.ram_limit / common.GIB:.1f} GiB)')
        skipped.append({'method_key': key, 'rblocks': rblocks,
                        'batch': batch, 'reason': why})
        log(f'skip {key} r{rblocks} b{batch}: {why}')
        continue
      log(f'memory {key} ResNet-{common.depth(rblocks)} batch {batch}')
      result = runner.peak(key, rblocks, batch)
      row = {'method_key': key, 'rblocks': rblocks, 'batch': batch}
      row.update({k: result[k] for k in (
          'peak_bytes', 'saved_bytes', 'weight_bytes', 'phase_peak_bytes',
          'breakdown', 'error', 'wall_s') if k in result})
      if 'error' in result:
        skipped.append({'method_key': key, 'rblocks': rblocks,
                        'batch': batch, 'reason': result['error']})
      runs.append(row)
  return {'runs': runs, 'skipped': skipped}


def predicted_saved(cfg):
  """Per-layer bytes blpa keeps between forward and backward (no step run).

  For each qtype at the headline configuration (the time depth and batch).
  """
  from blpa import models  # pylint: disable=import-outside-toplevel
  specs = models.cifar_resnet(cfg['time_rblocks'])
  shape = [cfg['time_batch'], cfg['size'], cfg['size'], 3]
  out = {}
  for qtype in (0, 8, 4):
    net = models.build(specs, shape, qtype=qtype)
    out[f'blpa_q{qtype}'] = [
        {'layer': i, 'bits': bits, 'bytes': b}
        for i, bits, b in net.saved_bytes(cfg['time_batch'])]
  return out


def timing_section(runner, cfg):
  """Interleaved step times of every method in one process."""
  log(f'timing ResNet-{common.depth(cfg["time_rblocks"])} batch '
      f'{cfg["time_batch"]}, {cfg["time_steps"]} rounds')
  keys = method_keys(cfg)
  key = (f'time/r{cfg["time_rblocks"]}/b{cfg["time_batch"]}/'
         f's{cfg["size"]}/n{cfg["time_steps"]}/' + ','.join(keys))
  result = runner.run(key, [
      '-m', 'bench.timing', '--rblocks', str(cfg['time_rblocks']),
      '--batch', str(cfg['time_batch']), '--size', str(cfg['size']),
      '--steps', str(cfg['time_steps']), '--warmup',
      str(cfg['time_warmup']), '--methods'] + keys, common.env())
  if 'error' in result:
    return result
  if common.BASELINE not in result['step_times']:
    return dict(result, error=f'{common.BASELINE} was not timed: no ratios')
  base = float(np.median(result['step_times'][common.BASELINE]))
  summary = {}
  for k, times in result['step_times'].items():
    med = float(np.median(times))
    summary[k] = {'median_s': med, 'min_s': float(np.min(times)),
                  'max_s': float(np.max(times)),
                  'images_per_s': cfg['time_batch'] / med,
                  'time_ratio': med / base, 'throughput_ratio': base / med}
  result['summary'] = summary
  return result


def _fit(points):
  """Least-squares line ``peak = a + b·batch`` through (batch, peak)."""
  batches = np.array([p[0] for p in points], float)
  peaks = np.array([p[1] for p in points], float)
  if len(set(batches)) < 2:
    return 0.0, peaks[0] / batches[0]
  slope, intercept = np.polyfit(batches, peaks, 1)
  return float(intercept), float(slope)


def max_batch_one(runner, key, cap, rblocks, points, tries=4):
  """Largest batch whose measured peak is under ``cap``.

  Extrapolates the line through the largest measured (batch, peak) points
  to the cap and measures there; after a miss, also scales the batch down
  in proportion (conservative, since part of the peak does not grow with
  the batch), and by at least 2%.  Refits with each new point and stops
  when the estimate no longer moves past the largest batch verified to fit
  (by more than 2%).
  """
  points = sorted(points)
  trials, best, tried = [], None, set()
  for _ in range(tries):
    a, b = _fit(points[-3:])
    if b <= 0:
      break
    guess = int((cap - a) // b)
    if trials and not trials[-1].get('fits', True):
      last = trials[-1]
      guess = min(guess, int(last['batch'] * cap / last['peak_bytes']),
                  int(0.98 * last['batch']))
    floor = best['batch'] if best else 0
    if guess <= floor or guess < 1 or guess in tried or (
        best and guess <= 1.02 * floor):
      break
    tried.add(guess)
    log(f'max batch {key}: try {guess}')
    result = runner.peak(key, rblocks, guess, repeats=1)
    if 'error' in result:
      trials.append({'batch': guess, 'error': result['error']})
      break
    peak = result['peak_bytes']
    trials.append({'batch': guess, 'peak_bytes': peak, 'fits': peak <= cap})
    points = sorted(points + [(guess, peak)])
    if peak <= cap:
      best = {'batch': guess, 'peak_bytes': peak}
  fits = [p for p in points if p[1] <= cap]
  if fits and (best is None or max(fits)[0] > best['batch']):
    best = {'batch': max(fits)[0], 'peak_bytes': max(fits)[1]}
  return {'best': best, 'trials': trials}


def max_batch_section(runner, cfg, memory):
  cap, rblocks = cfg['cap_bytes'], cfg['cap_rblocks']
  out = {'cap_bytes': cap, 'rblocks': rblocks, 'methods': {}}
  for key in method_keys(cfg):
    points = [(r['batch'], r['peak_bytes']) for r in memory['runs']
              if r['method_key'] == key and r['rblocks'] == rblocks
              and 'peak_bytes' in r]
    if not points:
      out['methods'][key] = {'best': None, 'trials': [],
                             'note': 'no memory measurement to start from'}
      continue
    out['methods'][key] = max_batch_one(runner, key, cap, rblocks, points)
  return out


def fidelity_section(runner, cfg):
  """One fidelity run per data set, keyed by the data set."""
  out = {}
  for data in cfg['fid_data']:
    log(f'gradient fidelity ResNet-{common.depth(cfg["fid_rblocks"])} batch '
        f'{cfg["fid_batch"]}, {data}, {cfg["fid_train_iters"]} training '
        'iterations')
    args = ['-m', 'bench.fidelity', '--rblocks', str(cfg['fid_rblocks']),
            '--batch', str(cfg['fid_batch']), '--size', str(cfg['size']),
            '--train-iters', str(cfg['fid_train_iters']), '--train-batch',
            str(cfg['fid_train_batch']), '--data', data]
    out[data] = runner.run('fidelity/' + '/'.join(args[2:]), args,
                           common.env())
  return out


def quant_ops_section(runner, cfg):
  """C++ kernels and pure-TF fallback, interleaved in one process."""
  shape = [str(s) for s in cfg['quant_shape']]
  log('quantization ops')
  return runner.run(
      f'quant/{"x".join(shape)}/n{cfg["quant_reps"]}',
      ['-m', 'bench.quantops', '--shape'] + shape +
      ['--reps', str(cfg['quant_reps'])], common.env())


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def machine():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  cpu = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f
                 if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  gpus = tf.config.list_physical_devices('GPU')
  return {'cpu': cpu, 'cores': os.cpu_count(),
          'ram_gib': round(_total_ram() / common.GIB, 1),
          'gpu': [g.name for g in gpus], 'device': 'GPU:0' if gpus else
          'CPU:0', 'onednn': common.onednn(), 'tensorflow': tf.__version__,
          'python': platform.python_version(), 'platform': platform.platform()}


def _dumps(obj, depth=0):
  """JSON with one line per list of numbers, floats to 6 digits."""
  pad = ' ' * (depth + 1)
  if isinstance(obj, float):
    return json.dumps(float(f'{obj:.6g}'))
  if isinstance(obj, dict):
    if not obj:
      return '{}'
    items = [f'{pad}{json.dumps(str(k))}: {_dumps(v, depth + 1)}'
             for k, v in obj.items()]
    return '{\n' + ',\n'.join(items) + '\n' + pad[:-1] + '}'
  if isinstance(obj, (list, tuple)):
    if all(not isinstance(v, (dict, list, tuple)) for v in obj):
      return '[' + ', '.join(_dumps(v) for v in obj) + ']'
    return ('[\n' + ',\n'.join(pad + _dumps(v, depth + 1) for v in obj) +
            '\n' + pad[:-1] + ']')
  return json.dumps(obj)


def write_json(results, path):
  with open(path + '.tmp', 'w') as f:
    f.write(_dumps(results) + '\n')
  os.replace(path + '.tmp', path)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n', maxsplit=1)[0])
  parser.add_argument('--quick', action='store_true',
                      help='small depth and batch (a few minutes)')
  parser.add_argument('--out', help='output folder (default bench/results/, '
                      'bench/results/quick/ with --quick)')
  parser.add_argument('--fresh', action='store_true',
                      help='measure again what OUT/cache.json holds (for the '
                      'sections run)')
  parser.add_argument('--only', nargs='+', choices=SECTIONS,
                      help='run only these sections (others are kept from '
                      'an earlier results.json in OUT)')
  parser.add_argument('--report-only', action='store_true',
                      help='rewrite results.md and the charts from '
                      'OUT/results.json')
  parser.add_argument('--headline', action='store_true',
                      help='measure memory only at the headline depth and '
                      'batch (merged into OUT/results.json); with no --only, '
                      'run the memory and timing sections')
  parser.add_argument('--methods', nargs='+',
                      choices=[key for key, _, _, _ in common.METHODS],
                      help='measure only these methods (memory, timing and '
                      'max batch; the headline mode merges their rows)')
  parser.add_argument('--time-steps', type=int,
                      help='interleaved timing rounds (default: the mode\'s)')
  args = parser.parse_args(argv)
  mode = 'quick' if args.quick else 'full'
  out_dir = args.out or os.path.join(common.ROOT, 'bench', 'results',
                                     *(['quick'] if args.quick else []))
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, 'results.json')
  if args.report_only:
    with open(json_path) as f:
      results = json.load(f)
    results['targets'] = report.targets(results)
    write_json(results, json_path)
    report.write(results, out_dir)
    return
  cfg = dict(CONFIGS[mode])
  if args.time_steps:
    cfg['time_steps'] = args.time_steps
  if args.methods:
    cfg['methods'] = args.methods
  results = {}
  if (args.only or args.headline or args.methods) and os.path.exists(
      json_path):
    with open(json_path) as f:
      results = json.load(f)
  sections = args.only or (('memory', 'timing') if args.headline
                           else SECTIONS)
  previous_date = results.get('date')
  results.update({'mode': mode, 'config': cfg, 'machine': machine(),
                  'date': datetime.datetime.now().isoformat(
                      timespec='seconds')})
  runner = Runner(out_dir, cfg, args.fresh)
  seconds = results.setdefault('section_seconds', {})

  dates = results.setdefault('section_dates', {})

  def timed(name, fn, *fn_args):
    start = time.time()
    dates[name] = datetime.datetime.now().isoformat(timespec='seconds')
    out = fn(*fn_args)
    seconds[name] = time.time() - start
    return out

  if 'memory' in sections or ('max_batch' in sections and
                              'memory' not in results):
    measured = timed('memory', memory_section, runner, cfg,
                     memory_configs(cfg, args.headline))
    partial = args.headline or args.methods
    if args.headline and results.get('memory'):
      results.setdefault('sweep_date', previous_date)
      results['headline_memory_date'] = dates['memory']
    elif args.methods and results.get('memory'):
      results.setdefault('sweep_date', previous_date)
      results.setdefault('methods_memory_dates', {}).update(
          {key: dates['memory'] for key in args.methods})
    elif not partial:
      for key in ('sweep_date', 'headline_memory_date',
                  'methods_memory_dates'):
        results.pop(key, None)
    results['memory'] = (merge_memory(results.get('memory'), measured)
                         if partial else measured)
    results['predicted_saved'] = predicted_saved(cfg)
  if 'timing' in sections:
    results['timing'] = timed('timing', timing_section, runner, cfg)
  if 'max_batch' in sections:
    found = timed('max_batch', max_batch_section, runner, cfg,
                  results['memory'])
    if args.methods and results.get('max_batch'):
      found['methods'] = dict(results['max_batch']['methods'],
                              **found['methods'])
    results['max_batch'] = found
  if 'fidelity' in sections:
    results['fidelity'] = timed('fidelity', fidelity_section, runner, cfg)
  if 'quant_ops' in sections:
    results['quant_ops'] = timed('quant_ops', quant_ops_section, runner, cfg)
  results['duration_s'] = sum(seconds.values())
  results['targets'] = report.targets(results)
  write_json(results, json_path)
  report.write(results, out_dir)
  log(f'wrote {out_dir}')
  for t in results['targets']:
    log(f'{"MET " if t["met"] else "MISSED" if t["met"] is False else "n/a "}'
        f' {t["name"]}: {t["measured"]}')


if __name__ == '__main__':
  main()

"""blpa.keras.compress of keras-hub transformers: peak memory, step time, batch.

One command::

  python bench/keras_transformers.py           # writes bench/results/keras_transformers.{md,json}
  python bench/keras_transformers.py --quick   # tiny sizes (the test's smoke run)
  python bench/keras_transformers.py --models vit --no-max-batch

Models (random weights, nothing downloaded), each with dropout 0.1 and 0:

* ``bert``: ``keras_hub.models.BertBackbone`` (vocabulary 8000, 4 layers,
  4 heads, hidden 256, intermediate 1024, sequence 256) and a ``Dense(2)``
  head on ``pooled_output``;
* ``vit``: ``keras_hub.models.ViTBackbone`` (64x64x3 images, patch 4,
  4 layers, 4 heads, hidden 256, MLP 1024) and a ``Dense(2)`` head on the
  class token.

Configurations: plain Keras, ``compress(model, 4)``, ``compress(model, 8)``,
and Keras's own rematerialization, the model *built* inside
``keras.RematScope(mode='full')`` or ``mode='activations'`` (the scope
applies to layers created in it: ``Operation.__init__`` records the mode).

Peak memory: one training step (GradientTape + SGD momentum in
``tf.function``), each figure in a fresh process with the BFC allocator
(``blpa.memory.peak_bytes``). Step time: the five configurations' steps
interleaved in one process per model (``bench.timing.interleaved_times``),
medians of ``--rounds`` rounds after a warm-up, taken after every peak.
Largest batch under the cap (plain and bits 4): the line through the peaks
at the batch and half of it extrapolated to the cap and checked in fresh
processes (``bench.run.max_batch_one``, at most ``--tries`` probes).
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ''):  # run as a script: python bench/keras_transformers.py
  sys.path.insert(0, ROOT)

from bench import common  # pylint: disable=wrong-import-position
from bench import keras_compress  # pylint: disable=wrong-import-position

RESULTS = os.path.join(ROOT, 'bench', 'results')
NAME = 'keras_transformers'
MODELS = ('bert', 'vit')
DROPOUTS = (0.1, 0.0)
#: Configurations of one peak figure: key -> (bits of compress, RematScope
#: mode); bits None: no compress.
CONFIGS = {
    'plain': (None, None),
    'bits4': (4, None),
    'bits8': (8, None),
    'remat_full': (None, 'full'),
    'remat_act': (None, 'activations'),
}
LABELS = {'plain': 'plain', 'bits4': 'compress(4)', 'bits8': 'compress(8)',
          'remat_full': "RematScope('full')",
          'remat_act': "RematScope('activations')"}
#: Targets of bits 4 against plain: peak at least this many times below,
#: step at most this many times, largest batch at least this many times.
TARGETS = {'peak': 3.0, 'time': 1.25, 'batch': 4.0}


def sizes(quick):
  """The models' dimensions: full (issue 23) or tiny (``--quick``)."""
  if quick:
    return dict(layers=1, heads=4, hidden=64, inner=128, vocab=100, seq=32,
                image=24, patch=4)
  return dict(layers=4, heads=4, hidden=256, inner=1024, vocab=8000, seq=256,
              image=64, patch=4)


def build(name, dropout, quick=False, remat=None):
  """The model ``name`` with a Dense(2) head, built (inside
  ``keras.RematScope(remat)`` when ``remat`` is given)."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  import keras_hub  # pylint: disable=import-outside-toplevel
  s = sizes(quick)
  scope = (keras.RematScope(mode=remat) if remat
           else contextlib.nullcontext())
  with scope:
    if name == 'bert':
      backbone = keras_hub.models.BertBackbone(
          vocabulary_size=s['vocab'], num_layers=s['layers'],
          num_heads=s['heads'], hidden_dim=s['hidden'],
          intermediate_dim=s['inner'], max_sequence_length=s['seq'],
          dropout=dropout)
      inputs = {k: keras.Input((s['seq'],), dtype='int32', name=k)
                for k in ('token_ids', 'segment_ids', 'padding_mask')}
      features = backbone(inputs)['pooled_output']
    elif name == 'vit':
      backbone = keras_hub.models.ViTBackbone(
          image_shape=(s['image'], s['image'], 3), patch_size=s['patch'],
          num_layers=s['layers'], num_heads=s['heads'],
          hidden_dim=s['hidden'], mlp_dim=s['inner'], dropout_rate=dropout,
          attention_dropout=dropout)
      inputs = keras.Input((s['image'], s['image'], 3))
      features = backbone(inputs)[:, 0]
    else:
      raise ValueError(f'unknown model {name!r}; one of {MODELS}')
    return keras.Model(inputs, keras.layers.Dense(2)(features))


def batch_data(name, batch, quick=False, seed=0):
  """A random batch ``(x, y)`` for ``name``."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  s = sizes(quick)
  rng = np.random.default_rng(seed)
  if name == 'bert':
    x = {'token_ids': tf.constant(rng.integers(1, s['vocab'],
                                               [batch, s['seq']]), tf.int32),
         'segment_ids': tf.zeros([batch, s['seq']], tf.int32),
         'padding_mask': tf.ones([batch, s['seq']], tf.int32)}
  else:
    x = tf.constant(rng.uniform(size=[batch, s['image'], s['image'], 3]),
                    tf.float32)
  y = tf.constant(rng.integers(0, 2, size=[batch]), tf.int32)
  return x, y


def config_model(name, dropout, key, quick=False, plain=None):
  """The model of configuration ``key`` (see :data:`CONFIGS`); ``plain``:
  an already built plain model to compress."""
  bits, remat = CONFIGS[key]
  model = build(name, dropout, quick, remat) if plain is None or remat \
      else plain
  if bits is not None:
    from blpa.keras import compress  # pylint: disable=import-outside-toplevel
    model = compress(model, bits)
  return model


def peak_main(args):
  """In a fresh process: peak bytes of one step, printed as JSON."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from blpa import memory  # pylint: disable=import-outside-toplevel
  tf.config.threading.set_inter_op_parallelism_threads(1)
  try:
    model = config_model(args.peak_of, args.dropout, args.config,
                         args.quick)
    step = keras_compress.step_on(
        model, *batch_data(args.peak_of, args.batch, args.quick))
    weights = sum(int(v.numpy().size) * 4 for v in model.weights)
    peak = memory.peak_bytes(step, repeats=1)
  except Exception as e:  # pylint: disable=broad-except
    # Not a crash of the benchmark: the configuration does not train.
    common.print_json(dict(model=args.peak_of, dropout=args.dropout,
                           config=args.config, batch=args.batch,
                           error=_short_error(e)))
    return
  common.print_json(dict(model=args.peak_of, dropout=args.dropout,
                         config=args.config, batch=args.batch,
                         peak_bytes=int(peak), weight_bytes=weights))


def measure_peak(name, dropout, key, batch, quick=False, timeout=900):
  """Peak bytes of one step in a fresh BFC process: the worker's JSON
  (``peak_bytes``, ``weight_bytes``), or a dict with ``error``."""
  cmd = [os.path.abspath(__file__), '--peak-of', name, '--dropout',
         str(dropout), '--config', key, '--batch', str(batch)]
  if quick:
    cmd.append('--quick')
  got = common.run_json(cmd, common.env(bfc=True), timeout)
  what = f'peak {name} dropout={dropout} {key} batch={batch}'
  print(f'{what}: {got["peak_bytes"] / 2**20:.1f} MiB' if 'peak_bytes' in got
        else f'{what}: {got["error"]}', file=sys.stderr, flush=True)
  return got


class _PeakRunner:
  """The runner :func:`bench.run.max_batch_one` asks for peaks."""

  def __init__(self, name, dropout, key, args):
    self.name, self.dropout, self.key, self.args = name, dropout, key, args

  def peak(self, key, rblocks, batch, repeats=None):
    del key, rblocks, repeats
    return measure_peak(self.name, self.dropout, self.key, batch,
                        self.args.quick, self.args.probe_timeout)


def step_times(name, dropout, batch, rounds, quick=False, warmup=1,
               configs=None):
  """Median step seconds of every configuration, all steps interleaved in
  one process (plain, bits 4 and bits 8 share the plain model's weights)."""
  from bench.timing import interleaved_times  # pylint: disable=import-outside-toplevel
  x, y = batch_data(name, batch, quick)
  plain = build(name, dropout, quick)
  steps, errors = {}, {}
  for key in configs or CONFIGS:
    try:  # the first call traces; a configuration that fails is left out
      model = config_model(name, dropout, key, quick, plain)
      step = keras_compress.step_on(model, x, y)
      step()
      steps[key] = step
    except Exception as e:  # pylint: disable=broad-except
      errors[key] = _short_error(e)
  times = interleaved_times(steps, rounds, warmup=warmup)
  return ({key: statistics.median(t) for key, t in times.items()}, times,
          errors)


def _short_error(e):
  """The type and the informative lines of an exception's message."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  keep = [l for l in lines if 'Error' in l or 'supports' in l] or lines[:1]
  text = ' '.join(keep)
  if not text.startswith(type(e).__name__):
    text = f'{type(e).__name__}: {text}'
  return text[:400].replace('\x1b[1m', '') \
      .replace('\x1b[0m', '')


def _ratio(num, den):
  return num / den if num and den else None


def largest(name, dropout, key, row, args):
  """Largest batch of configuration ``key`` under the cap, from the peaks
  at the batch and half of it (at most ``--tries`` fresh-process probes)."""
  from bench import run  # pylint: disable=import-outside-toplevel
  cap = int(args.cap_gib * 2**30)
  points = [(b, p) for b, p in ((row['half_batch'], row['half_peaks'][key]),
                                (row['batch'], row['peaks'][key])) if p]
  line = keras_compress.line_batch(points, cap)
  found = run.max_batch_one(_PeakRunner(name, dropout, key, args), key, cap,
                            0, points, tries=args.tries)
  best = found['best']
  return dict(line=line, best=best and best['batch'],
              best_peak=best and best['peak_bytes'], trials=found['trials'])


def _parallel(jobs, calls):
  """Results of ``calls`` (argument-less callables), ``jobs`` at a time."""
  with concurrent.futures.ThreadPoolExecutor(max(jobs, 1)) as pool:
    return list(pool.map(lambda f: f(), calls))


def run_all(args):
  """Every measurement; returns the rows (one per model and dropout)."""
  names = args.models.split(',')
  dropouts = [float(d) for d in args.dropouts.split(',')]
  half = max(args.batch // 2, 1)
  rows = [dict(model=n, dropout=d, batch=args.batch, half_batch=half,
               peaks={}, half_peaks={}) for n in names for d in dropouts]
  args.start_other_jobs = _others()  # saved with the args
  args.start_loadavg = os.getloadavg()
  # Peaks at the batch: every configuration; at half of it: what the
  # largest-batch lines need.
  line_keys = () if args.no_max_batch else ('plain', 'bits4')
  line_drop = set(dropouts if args.max_batch_dropout0 else
                  [d for d in dropouts if d > 0] or dropouts)
  jobs = []
  for r in rows:
    for key in args.configs.split(','):
      jobs.append((r, 'peaks', key, args.batch))
      if key in line_keys and r['dropout'] in line_drop:
        jobs.append((r, 'half_peaks', key, half))
  got = _parallel(args.jobs, [
      (lambda r=r, k=k, b=b: measure_peak(r['model'], r['dropout'], k, b,
                                          args.quick, args.probe_timeout))
      for r, _, k, b in jobs])
  for (r, where, key, _), g in zip(jobs, got):
    r[where][key] = g.get('peak_bytes')
    if 'error' in g:
      r.setdefault('errors', {})[f'{where}.{key}'] = g['error']
    if g.get('weight_bytes') and key == 'plain':
      r['weight_bytes'] = g['weight_bytes']
  _checkpoint(rows, args)
  # Largest batches: one search per (row, key), run ``--jobs`` at a time.
  searches = [(r, k) for r in rows if r['dropout'] in line_drop
              for k in line_keys]
  found = _parallel(args.jobs, [
      (lambda r=r, k=k: largest(r['model'], r['dropout'], k, r, args))
      for r, k in searches])
  for (r, key), f in zip(searches, found):
    r.setdefault('max_batch', {})[key] = f
  _checkpoint(rows, args)
  # Step times last (the latest, most comparable load).
  if not args.no_time:
    for r in rows:
      load = os.getloadavg()
      med, times, errors = step_times(r['model'], r['dropout'], args.batch,
                                      args.rounds, args.quick,
                                      configs=args.configs.split(','))
      r.update(step_s=med, step_times=times, loadavg_before=load,
               loadavg_after=os.getloadavg())
      if errors:
        r['time_errors'] = errors
      print(json.dumps({k: r[k] for k in ('model', 'dropout', 'step_s')}),
            file=sys.stderr, flush=True)
  for r in rows:
    r['targets'] = targets(r)
  return rows


def _checkpoint(rows, args):
  """Writes the rows measured so far to the .json (a crash later keeps
  them); :func:`write_results` overwrites it at the end."""
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f'{NAME}.json'), 'w') as f:
    json.dump(dict(partial=True, args=vars(args), results=rows), f, indent=1)


def targets(r):
  """Which targets of :data:`TARGETS` bits 4 meets (None: not measured)."""
  peak = _ratio(r['peaks'].get('plain'), r['peaks'].get('bits4'))
  step = r.get('step_s') or {}
  time_ratio = _ratio(step.get('bits4'), step.get('plain'))
  mb = r.get('max_batch') or {}
  batch = _ratio((mb.get('bits4') or {}).get('best'),
                 (mb.get('plain') or {}).get('best'))
  return dict(
      peak_ratio=peak, peak_met=None if peak is None else
      peak >= TARGETS['peak'],
      time_ratio=time_ratio, time_met=None if time_ratio is None else
      time_ratio <= TARGETS['time'],
      batch_ratio=batch, batch_met=None if batch is None else
      batch >= TARGETS['batch'])


def _slope(r, key):
  """MiB per sample between the peaks at the batch and half of it."""
  a, b = r['half_peaks'].get(key), r['peaks'].get(key)
  if not a or not b or r['batch'] == r['half_batch']:
    return 'n/a'
  return f"{(b - a) / (r['batch'] - r['half_batch']) / 2**20:.1f}"


def _mib(b):
  if not b:
    return 'n/a'
  return f'{b / 2**20:.0f}' if b >= 100 * 2**20 else f'{b / 2**20:.1f}'


def _fmt(v, spec='{:.2f}'):
  return spec.format(v) if v is not None else 'n/a'


def _max_batch(r, key):
  """A largest-batch cell: the verified batch, bracketed by the smallest
  failing probe above it, and the line's estimate."""
  f = (r.get('max_batch') or {}).get(key)
  if not f or not f['best']:
    return 'n/a' if not f else f"n/a (line {f['line']})"
  over = [t['batch'] for t in f['trials']
          if not t.get('fits', False) and t['batch'] > f['best']]
  text = (f"{f['best']}" if over and min(over) == f['best'] + 1 else
          f"{f['best']} to {min(over) - 1}" if over else f"≥ {f['best']}")
  return f"{text} (line {f['line']})" if f['line'] else text


def _machine():
  """CPU model and count, from ``lscpu``."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True,
                         check=False).stdout
  except OSError:
    return 'unknown'
  info = dict(l.split(':', 1) for l in out.splitlines() if ':' in l)
  hyper = info.get('Hypervisor vendor', '').strip()
  return (f"{info.get('Model name', '?').strip()}, "
          f"{info.get('CPU(s)', '?').strip()} CPUs"
          + (f' ({hyper} virtual machine)' if hyper else ''))


def _others(pid=None):
  """Other Python processes running now (other engineers' jobs)."""
  me = {os.getpid(), os.getppid(), pid}
  try:
    out = subprocess.run(['ps', '-eo', 'pid,ppid,pcpu,args'],
                         capture_output=True, text=True, check=False).stdout
  except OSError:
    return []
  busy = []
  for line in out.splitlines()[1:]:
    parts = line.split(None, 3)
    if len(parts) == 4 and 'python' in parts[3] and \
        int(parts[0]) not in me and int(parts[1]) not in me:
      busy.append(parts[3][:120])
  return busy


def run_meta(args, command):
  """When, where and how the results were measured (the .json's header)."""
  import keras  # pylint: disable=import-outside-toplevel
  import keras_hub  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return dict(date=datetime.datetime.now().strftime('%Y-%m-%d %H:%M'),
              machine=_machine(), command=command,
              loadavg=os.getloadavg(), other_jobs=_others(),
              versions=dict(tensorflow=tf.__version__,
                            keras=keras.__version__,
                            keras_hub=keras_hub.__version__),
              onednn=common.onednn(), sizes=sizes(args.quick),
              targets=TARGETS, cap_bytes=int(args.cap_gib * 2**30))


def rewrite(path=None, note=None):
  """Rewrites the .md from a results .json (no measurement)."""
  with open(path or os.path.join(RESULTS, f'{NAME}.json')) as f:
    saved = json.load(f)
  meta = {k: v for k, v in saved.items() if k not in ('args', 'results')}
  if note:
    meta['note'] = note
  write_results(saved['results'], argparse.Namespace(**saved['args']),
                meta['command'], meta)
  return saved['results']


def write_results(rows, args, command, meta=None):
  """Writes ``keras_transformers.{json,md}``; ``meta``: the header of a
  saved run (default: :func:`run_meta` now)."""
  os.makedirs(RESULTS, exist_ok=True)
  meta = meta or run_meta(args, command)
  meta.setdefault('start_other_jobs', getattr(args, 'start_other_jobs',
                                               None))
  others = meta['other_jobs']
  with open(os.path.join(RESULTS, f'{NAME}.json'), 'w') as f:
    json.dump(dict(meta, args=vars(args), results=rows), f, indent=1)
  s = sizes(args.quick)
  keys = list(CONFIGS)
  v = meta['versions']
  lines = [
      '# blpa.keras.compress on keras-hub transformers', '',
      f"Date {meta['date']}. Machine: {meta['machine']}. TensorFlow "
      f"{v['tensorflow']}, Keras {v['keras']}, keras-hub {v['keras_hub']}; "
      f"oneDNN {meta['onednn']}.", '',
      f'Command: `{command}`', '',
      f"Models (random weights): BertBackbone (vocabulary {s['vocab']}, "
      f"{s['layers']} layers, {s['heads']} heads, hidden {s['hidden']}, "
      f"intermediate {s['inner']}, sequence {s['seq']}) + Dense(2) on "
      f"pooled_output; ViTBackbone ({s['image']}x{s['image']}x3, patch "
      f"{s['patch']}, {s['layers']} layers, {s['heads']} heads, hidden "
      f"{s['hidden']}, MLP {s['inner']}) + Dense(2) on the class token. "
      'RematScope rows: the whole model built inside '
      "`keras.RematScope(mode=...)`.", '',
      'Peak: BFC allocator peak of one training step (GradientTape + SGD '
      'momentum, tf.function), MiB, each figure a fresh process; "plain/X": '
      'plain peak over X\'s. Step: X\'s step time over plain\'s, medians of '
      f'{args.rounds} interleaved rounds (all five configurations in one '
      'process per model, after a warm-up step).', '',
      '| model | dropout | batch | ' + ' | '.join(
          f'{LABELS[k]} MiB' for k in keys) + ' | ' + ' | '.join(
              f'plain/{LABELS[k]}' for k in keys[1:]) + ' | plain step s | '
      + ' | '.join(f'{LABELS[k]} step' for k in keys[1:]) + ' |',
      '|' + '---|' * (3 + len(keys) * 3 - 1)]
  for r in rows:
    p, t = r['peaks'], r.get('step_s') or {}
    failed = set(k.split('.')[-1] for k in r.get('errors', {}))
    lines.append(
        f"| {r['model']} | {r['dropout']:g} | {r['batch']} | "
        + ' | '.join('fails' if k in failed and not p.get(k)
                     else _mib(p.get(k)) for k in keys) + ' | '
        + ' | '.join(_fmt(_ratio(p.get('plain'), p.get(k))) for k in keys[1:])
        + f" | {_fmt(t.get('plain'), '{:.3f}')} | "
        + ' | '.join(_fmt(_ratio(t.get(k), t.get('plain'))) for k in keys[1:])
        + ' |')
  searched = [r for r in rows if r.get('max_batch')]
  if searched:
    lines += ['', f'Largest batch with the step peak <= {args.cap_gib:g} GiB '
              '(each probe a fresh process; the line through the peaks at '
              f'batch {args.batch} and {max(args.batch // 2, 1)} '
              'extrapolated to the cap, then at most '
              f'{args.tries} probes, refitting; "A to B": A fitted, B + 1 '
              'did not; "≥ A": no probe above A failed; "(line N)": the '
              'first extrapolation):', '',
              '| model | dropout | plain | compress(4) | x plain |',
              '|---|---|---|---|---|']
    for r in searched:
      lines.append(f"| {r['model']} | {r['dropout']:g} | "
                   f"{_max_batch(r, 'plain')} | {_max_batch(r, 'bits4')} | "
                   f"{_fmt(r['targets']['batch_ratio'])} |")
  else:
    lines += ['', 'Largest batch: not measured in this run (--no-max-batch).']
  lines += ['', f"Targets for compress(4): peak >= {TARGETS['peak']:g}x below "
            f"plain, step <= {TARGETS['time']:g}x plain, largest batch >= "
            f"{TARGETS['batch']:g}x plain's.", '']
  word = {True: 'met', False: 'NOT met', None: 'not measured'}
  for r in rows:
    g = r['targets']
    lines.append(
        f"- {r['model']} dropout {r['dropout']:g}: peak "
        f"{_fmt(g['peak_ratio'])}x ({word[g['peak_met']]}), step "
        f"{_fmt(g['time_ratio'])}x ({word[g['time_met']]}), largest batch "
        + (f"{g['batch_ratio']:.2f}x ({word[g['batch_met']]})."
           if g['batch_ratio'] else 'not measured.'))
  slopes = [f"{r['model']} {r['dropout']:g}: plain {_slope(r, 'plain')}, "
            f"compress(4) {_slope(r, 'bits4')}" for r in rows
            if r['half_peaks'].get('plain') or r['half_peaks'].get('bits4')]
  if slopes:
    lines += ['', 'Per sample (MiB/sample, between the peaks at batch '
              f"{args.batch} and {max(args.batch // 2, 1)}): "
              + '; '.join(slopes) + '.']
  loads = [(r['model'], r['dropout'], r.get('loadavg_before'))
           for r in rows if r.get('loadavg_before')]
  start = meta.get('start_other_jobs')
  lines += ['', 'Load: the 2 CPUs are shared with other engineers\' jobs; '
            + (f'{len(start)} other Python processes at the start of the '
               'run, ' if start is not None else '')
            + f'{len(others)} other Python processes when the results were '
            'written; 1-minute load '
            'averages at the start of each timing process: '
            + (', '.join(f'{m} {d:g}: {l[0]:.1f}' for m, d, l in loads)
               or 'n/a') + '. Peaks do not depend on the load; step times '
            'do, which is why the configurations are interleaved in one '
            'process and only their ratios are meant to be read.']
  if meta.get('note'):
    lines += ['', meta['note']]
  errors = {}
  for r in rows:
    for where, e in list(r.get('errors', {}).items()) + [
        (f'step.{k}', e) for k, e in r.get('time_errors', {}).items()]:
      errors.setdefault((where.split('.')[-1], e), []).append(
          f"{r['model']} {r['dropout']:g} {where.split('.')[0]}")
  if errors:
    lines += ['', 'Configurations that failed ("fails", "n/a"):', '']
    lines += [f'- {LABELS[k]} ({", ".join(w)}): {e}'
              for (k, e), w in errors.items()]
    if any('custom_gradient' in e for _, e in errors):
      lines += ['', "Why: RematScope('full') gives every Operation created "
                'in the scope (the Functional models, the keras-hub '
                'encoder blocks, every layer) a call wrapped in '
                '`tf.recompute_grad` (`Operation.rematerialized_call`); '
                "Keras calls layers with keyword arguments (`training=`, "
                '`mask=`), which `tf.custom_gradient` accepts only in eager '
                'execution, so on the TensorFlow backend the model fails '
                'when traced in tf.function (keras-team/keras#21207, open), '
                'and ViTBackbone already fails while it is built (a '
                'symbolic call of ViTEncoder).']
  with open(os.path.join(RESULTS, f'{NAME}.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--peak-of', choices=MODELS, help=argparse.SUPPRESS)
  parser.add_argument('--config', choices=list(CONFIGS), default='plain',
                      help=argparse.SUPPRESS)
  parser.add_argument('--dropout', type=float, default=0.1,
                      help=argparse.SUPPRESS)
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--configs', default=','.join(CONFIGS),
                      help='comma-separated configurations (columns): '
                      + ', '.join(CONFIGS))
  parser.add_argument('--dropouts', default=','.join(map(str, DROPOUTS)),
                      help='comma-separated dropout rates (rows)')
  parser.add_argument('--batch', type=int, default=None,
                      help='batch (default 16; --quick: 2)')
  parser.add_argument('--rounds', type=int, default=5,
                      help='interleaved timing rounds')
  parser.add_argument('--quick', action='store_true',
                      help='tiny models: 1 layer, sequence 32, batch 2')
  parser.add_argument('--no-max-batch', action='store_true',
                      help='skip the largest-batch search')
  parser.add_argument('--max-batch-dropout0', action='store_true',
                      help='search the largest batch of the dropout-0 rows '
                      'too (default: dropout > 0 rows only)')
  parser.add_argument('--no-time', action='store_true',
                      help='skip the step times')
  parser.add_argument('--cap-gib', type=float, default=2.0)
  parser.add_argument('--tries', type=int, default=2,
                      help='largest-batch probes per model and configuration')
  parser.add_argument('--probe-timeout', type=int, default=900,
                      help='seconds per fresh-process peak')
  parser.add_argument('--jobs', type=int, default=2,
                      help='peak processes at a time (peaks do not depend '
                      'on the load)')
  parser.add_argument('--rewrite', action='store_true',
                      help='only rewrite the .md from the saved .json')
  parser.add_argument('--note', default=None,
                      help='with --rewrite: a paragraph added under the '
                      'table (e.g. what else ran on the machine)')
  args = parser.parse_args(argv)
  if args.batch is None:
    args.batch = 2 if args.quick else 16
  if args.peak_of:
    return peak_main(args)
  if args.rewrite:
    return rewrite(note=args.note)
  rows = run_all(args)
  command = 'python bench/keras_transformers.py ' + ' '.join(
      argv if argv is not None else sys.argv[1:])
  write_results(rows, args, command.strip())
  return rows


if __name__ == '__main__':
  main()

"""blpa.keras.compress against plain Keras: peak memory, step time, batch.

One command::

  python bench/keras_compress.py            # writes bench/results/keras_compress.{md,json}
  python bench/keras_compress.py --quick    # smaller sizes, for a smoke run
  python bench/keras_compress.py --time-only --rounds 7   # step times, 4 and 8 bits

Peak memory: one training step (GradientTape + SGD momentum in tf.function,
what ``fit`` runs), each configuration in a fresh process with the BFC
allocator (``blpa.memory.peak_bytes``). Step time: plain and compressed
steps interleaved in one process, medians. Largest batch under the cap:
the line through the peaks at the batch and half of it, extrapolated to
the cap and checked in fresh processes (``bench.run.max_batch_one``), a
bounded number of probes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ''):  # run as a script: python bench/keras_compress.py
  sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, 'bench', 'results')
MODELS = ('resnet164', 'resnet50v2', 'mobilenetv2')


def build_model(name, rblocks=18):
  """A Keras model by name, and its input size."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from blpa import models  # pylint: disable=import-outside-toplevel
  apps = tf.keras.applications
  if name == 'resnet164':
    return models.keras_cifar_resnet(rblocks), 32
  if name == 'resnet50v2':
    return apps.ResNet50V2(weights=None, input_shape=(64, 64, 3),
                           classes=10, classifier_activation=None), 64
  if name == 'mobilenetv2':
    return apps.MobileNetV2(weights=None, input_shape=(64, 64, 3),
                            classes=10, classifier_activation=None), 64
  raise ValueError(f'unknown model {name!r}; one of {MODELS}')


def train_step(model, batch, size, seed=0):
  """A callable running one SGD-momentum training step of ``model`` on a
  random image batch."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.standard_normal([batch, size, size, 3]), tf.float32)
  y = tf.constant(rng.integers(0, 10, size=[batch]), tf.int32)
  return step_on(model, x, y)


def step_on(model, x, y):
  """A callable running one SGD-momentum training step of ``model`` on
  ``(x, y)`` (any input structure)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  variables = model.trainable_variables

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True))
      if model.losses:
        loss = loss + tf.add_n(model.losses)
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  return lambda: step().numpy()


def _model_for(name, bits, rblocks):
  model, size = build_model(name, rblocks)
  if bits is not None:
    from blpa.keras import compress  # pylint: disable=import-outside-toplevel
    model = compress(model, bits)
  return model, size


def peak_main(args):
  """In a fresh process: peak bytes of one step, printed as JSON."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from blpa import memory  # pylint: disable=import-outside-toplevel
  tf.config.threading.set_inter_op_parallelism_threads(1)
  model, size = _model_for(args.model, args.bits, args.rblocks)
  step = train_step(model, args.batch, size)
  weights = sum(int(v.numpy().size) * 4 for v in model.weights)
  peak = memory.peak_bytes(step, repeats=1)
  print(json.dumps(dict(model=args.model, bits=args.bits, batch=args.batch,
                        peak_bytes=int(peak), weight_bytes=weights)))


def measure_peak(model, bits, batch, rblocks=18, timeout=900):
  """Peak bytes of one step in a fresh BFC process (None if it failed)."""
  cmd = [sys.executable, os.path.abspath(__file__), '--peak-of', model,
         '--batch', str(batch), '--rblocks', str(rblocks)]
  if bits is not None:
    cmd += ['--bits', str(bits)]
  env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC='true',
             TF_ENABLE_ONEDNN_OPTS='0', TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONPATH=ROOT)
  try:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return None
  lines = [l for l in done.stdout.splitlines() if l.startswith('{')]
  got = json.loads(lines[-1]) if lines else None
  print(f'peak {model} bits={bits} batch={batch}: '
        f'{got and got["peak_bytes"] / 2**20:.1f} MiB' if got else
        f'peak {model} bits={bits} batch={batch}: no result', file=sys.stderr,
        flush=True)
  return got


def step_times(name, bits_list, batch, rblocks=18, rounds=5):
  """Median step seconds of plain Keras and of ``compress(model, bits)``
  for each bits in ``bits_list``, all steps interleaved in one process.

  Returns:
    dict: ``'plain'`` and each bits (int) → median seconds.
  """
  plain_model, size = build_model(name, rblocks)
  from blpa.keras import compress  # pylint: disable=import-outside-toplevel
  steps = {'plain': train_step(plain_model, batch, size)}
  for bits in bits_list:
    steps[bits] = train_step(compress(plain_model, bits), batch, size)
  from bench.timing import interleaved_times  # pylint: disable=import-outside-toplevel
  times = interleaved_times(steps, rounds, warmup=1)  # warm-up: the trace
  return {k: statistics.median(v) for k, v in times.items()}


def step_time_ratio(name, bits, batch, rblocks=18, rounds=5):
  """Median step seconds of plain and compressed steps, interleaved."""
  med = step_times(name, [bits], batch, rblocks, rounds)
  return med['plain'], med[bits]


def _model_batches(args, names, default):
  """The batch of each model: ``--batches``, else ``default(name)``."""
  if args.batches:
    return [int(b) for b in args.batches.split(',')]
  return [default(n) for n in names]


def time_all(args):
  """``--time-only``: plain, compress(4) and compress(8) step times of each
  model, interleaved in one process per model; writes
  ``keras_step_time.{md,json}``."""
  names = args.models.split(',')
  batches = _model_batches(args, names, lambda n: 16 if args.quick else 64)
  rows = []
  for name, batch in zip(names, batches):
    med = step_times(name, (4, 8), batch, args.rblocks, args.rounds)
    rows.append(dict(model=name, batch=batch, rounds=args.rounds,
                     plain_s=med['plain'], bits4_s=med[4], bits8_s=med[8]))
    print(json.dumps(rows[-1]), flush=True)
  write_step_times(rows, args)
  return rows


def write_step_times(rows, args):
  """Writes ``keras_step_time.{json,md}`` (rows of :func:`time_all`)."""
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, 'keras_step_time.json'), 'w') as f:
    json.dump(dict(args=vars(args), results=rows), f, indent=1)
  onednn = os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default (on)')
  lines = ['# blpa.keras.compress step time vs plain Keras', '',
           'One training step (GradientTape + SGD momentum, tf.function), '
           'CPU; plain, bits 4 and bits 8 steps interleaved in one process '
           f'per model, medians of {args.rounds} rounds after a warm-up; '
           f'oneDNN {onednn}.', '',
           '| model | batch | plain s | bits 4 s | × plain | bits 8 s | '
           '× plain |', '|---|---|---|---|---|---|---|']
  for r in rows:
    ratio = lambda key: _ratio(r[key], r['plain_s'], '{:.2f}')
    lines.append(f"| {r['model']} | {r['batch']} | {r['plain_s']:.3f} | "
                 f"{r['bits4_s']:.3f} | {ratio('bits4_s')} | "
                 f"{r['bits8_s']:.3f} | {ratio('bits8_s')} |")
  with open(os.path.join(RESULTS, 'keras_step_time.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


class _PeakRunner:
  """The runner :func:`bench.run.max_batch_one` asks for peaks: one fresh
  BFC process per batch."""

  def __init__(self, name, bits, rblocks, timeout):
    self.name, self.bits, self.rblocks = name, bits, rblocks
    self.timeout = timeout

  def peak(self, key, rblocks, batch, repeats=None):
    del key, rblocks, repeats
    got = measure_peak(self.name, self.bits, batch, self.rblocks,
                       self.timeout)
    return got if got else {'error': f'batch {batch}: no result (out of '
                            f'memory or over {self.timeout} s)'}


def line_batch(points, cap):
  """The batch at which the line through ``(batch, peak)`` points reaches
  ``cap`` (None without two points)."""
  if len({p[0] for p in points}) < 2:
    return None
  from bench import run  # pylint: disable=import-outside-toplevel
  intercept, slope = run._fit(points)  # pylint: disable=protected-access
  return int((cap - intercept) // slope) if slope > 0 else None


def largest_batch(name, bits, cap, points, rblocks=18, tries=3,
                  timeout=900):
  """Largest batch whose step peaks under ``cap`` bytes.

  The line through the measured ``(batch, peak)`` points is extrapolated
  to the cap and checked there in a fresh process, then refitted
  (:func:`bench.run.max_batch_one`); at most ``tries`` probes of at most
  ``timeout`` seconds each bound the run time.

  Args:
    name: model name (see :data:`MODELS`).
    bits: None for plain Keras, else the bits of ``compress``.
    cap: bytes.
    points: measured ``(batch, peak_bytes)`` pairs (two or more).
    rblocks: blocks per stage of the Keras ResNet.
    tries: probes at most.
    timeout: seconds per probe.

  Returns:
    dict: ``best`` (``{'batch', 'peak_bytes'}`` or None) and ``trials``.
  """
  from bench import run  # pylint: disable=import-outside-toplevel
  runner = _PeakRunner(name, bits, rblocks, timeout)
  return run.max_batch_one(runner, name, cap, rblocks, points, tries=tries)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--peak-of', choices=MODELS, help=argparse.SUPPRESS)
  parser.add_argument('--bits', type=int, default=None)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--rblocks', type=int, default=18)
  parser.add_argument('--quick', action='store_true',
                      help='small batches (a smoke run, minutes)')
  parser.add_argument('--cap-gib', type=float, default=2.0)
  parser.add_argument('--no-largest', action='store_true',
                      help='skip the largest-batch search')
  parser.add_argument('--models', default=','.join(MODELS),
                      help='comma-separated models to run')
  parser.add_argument('--batches', default='',
                      help='comma-separated batch per model (default: 128 '
                      'for resnet164, 64 for the others; --quick: 32, 16)')
  parser.add_argument('--rounds', type=int, default=5,
                      help='interleaved timing rounds')
  parser.add_argument('--no-time', action='store_true',
                      help='skip the step-time comparison')
  parser.add_argument('--time-only', action='store_true',
                      help='only step times: plain, bits 4 and bits 8 '
                      'interleaved (default batch 64; --rounds), written to '
                      'keras_step_time.{md,json}')
  parser.add_argument('--tries', type=int, default=3,
                      help='probes (fresh processes) per largest-batch search')
  parser.add_argument('--probe-timeout', type=int, default=900,
                      help='seconds per largest-batch probe')
  parser.add_argument('--max-probe-batch', type=int, default=1024,
                      help='largest batch probed; beyond it only this batch '
                      'is checked (a lower bound)')
  args = parser.parse_args(argv)
  if args.peak_of:
    args.model = args.peak_of
    return peak_main(args)
  if args.time_only:
    return time_all(args)
  return run_all(args)


def run_all(args):
  """Runs every measurement and writes the .md and .json results."""
  names = args.models.split(',')
  default = {'resnet164': 32 if args.quick else 128}
  batches = _model_batches(args, names,
                     lambda n: default.get(n, 16 if args.quick else 64))
  configs = [(n, b, 4) for n, b in zip(names, batches)]
  results = []
  for name, batch, bits in configs:
    row = measure_row(name, batch, bits, args)
    print(json.dumps(row), flush=True)
    results.append(row)
  write_results(results, args)


def _checked_at(name, bits, cap, batch, args):
  """One probe at ``batch`` (a lower bound on the largest batch), for a
  line that meets the cap beyond ``--max-probe-batch``."""
  got = measure_peak(name, bits, batch, args.rblocks, args.probe_timeout)
  peak = got and got['peak_bytes']
  fits = bool(peak) and peak <= cap
  return {'best': {'batch': batch, 'peak_bytes': peak} if fits else None,
          'trials': [{'batch': batch, 'peak_bytes': peak, 'fits': fits}]}


def measure_row(name, batch, bits, args):
  """Peaks (at ``batch`` and half of it), step times and largest batches of
  one model: a row of the results."""
  row = dict(model=name, batch=batch, bits=bits)
  half = max(batch // 2, 1)
  for key, b in (('plain', None), ('blpa', bits), ('blpa0', 0)):
    got = measure_peak(name, b, batch, args.rblocks)
    row[f'{key}_peak'] = got and got['peak_bytes']
    row['weight_bytes'] = got and got['weight_bytes']
    if key != 'blpa0':
      got = measure_peak(name, b, half, args.rblocks)
      row[f'{key}_half_peak'] = got and got['peak_bytes']
  row['half_batch'] = half
  if not args.no_time:
    row['plain_s'], row['blpa_s'] = step_time_ratio(name, bits, batch,
                                                    args.rblocks, args.rounds)
  if not args.no_largest:
    cap = int(args.cap_gib * 2**30)
    for key, b in (('plain', None), ('blpa', bits)):
      points = [(p, row[k]) for p, k in ((half, f'{key}_half_peak'),
                                          (batch, f'{key}_peak')) if row[k]]
      line = line_batch(points, cap)
      if line and line > args.max_probe_batch:
        found = _checked_at(name, b, cap, args.max_probe_batch, args)
      else:
        found = largest_batch(name, b, cap, points, args.rblocks, args.tries,
                              args.probe_timeout)
      row[f'{key}_max_batch'] = found['best'] and found['best']['batch']
      row[f'{key}_max_trials'] = found['trials']
      row[f'{key}_max_line'] = line_batch(measured_points(row, key), cap)
    row['cap_bytes'] = cap
  return row


def _mib(n):
  return f'{n / 2**20:.0f}' if n else 'n/a'


def _merged(results):
  """Earlier rows of other (model, batch) pairs, then the new rows."""
  path = os.path.join(RESULTS, 'keras_compress.json')
  if not os.path.exists(path):
    return results
  with open(path) as f:
    old = json.load(f).get('results', [])
  new = {(r['model'], r['batch']) for r in results}
  return [r for r in old if (r['model'], r['batch']) not in new] + results


def _ratio(num, den, fmt='{:.1f}'):
  return fmt.format(num / den) if num and den else 'n/a'


def _seconds(r, key):
  return f'{r[key]:.2f}' if r.get(key) else 'n/a'


def _max_batch(r, key):
  """The largest batch verified to fit, bounded by the smallest probe above
  it that did not ('≥' when none did), and where the line meets the cap."""
  best, line = r.get(f'{key}_max_batch'), r.get(f'{key}_max_line')
  if not best:
    return 'n/a'
  over = [t['batch'] for t in r.get(f'{key}_max_trials', [])
          if not t['fits'] and t['batch'] > best]
  if not over:
    found = f'≥ {best}'
  elif min(over) == best + 1:
    found = f'{best}'
  else:
    found = f'{best} to {min(over) - 1}'
  return f'{found} (line {line})' if line and line != best else found


def _table_line(r):
  """One row of the Markdown table."""
  time_ratio = _ratio(r.get('blpa_s'), r.get('plain_s'), '{:.2f}')
  return (f"| {r['model']} | {r['batch']} | {r['bits']} | "
          f"{_mib(r['plain_peak'])} | {_mib(r['blpa_peak'])} | "
          f"1/{_ratio(r['plain_peak'], r['blpa_peak'])} | "
          f"{_mib(r['blpa0_peak'])} | {_seconds(r, 'plain_s')} | "
          f"{_seconds(r, 'blpa_s')} | {time_ratio} | "
          f"{_max_batch(r, 'plain')} | {_max_batch(r, 'blpa')} | "
          f"{_ratio(r.get('blpa_max_batch'), r.get('plain_max_batch'))} |")


def measured_points(r, key):
  """Every ``(batch, peak_bytes)`` a row measured for ``key`` ('plain' or
  'blpa'): the batch, half of it, and the largest-batch probes."""
  points = [(r.get('half_batch'), r.get(f'{key}_half_peak')),
            (r['batch'], r.get(f'{key}_peak'))]
  points += [(t['batch'], t.get('peak_bytes'))
             for t in r.get(f'{key}_max_trials', [])]
  return sorted({(b, p) for b, p in points if b and p})


def per_sample(r, key):
  """MiB per sample: the slope of the line through the measured peaks
  (None with fewer than two batches)."""
  points = measured_points(r, key)
  if len({b for b, _ in points}) < 2:
    return None
  from bench import run  # pylint: disable=import-outside-toplevel
  return run._fit(points)[1] / 2**20  # pylint: disable=protected-access


def _batches(r, key):
  return ', '.join(str(b) for b, _ in measured_points(r, key))


def _notes(results):
  """The lines under the table: per-sample costs and weights."""
  slopes = [f"{r['model']} plain {per_sample(r, 'plain'):.2f} (batches "
            f"{_batches(r, 'plain')}), blpa {per_sample(r, 'blpa'):.2f} "
            f"({_batches(r, 'blpa')})" for r in results
            if per_sample(r, 'plain') and per_sample(r, 'blpa')]
  lines = ['']
  if slopes:
    lines += ['Per sample (MiB/sample: slope of the least-squares line '
              'through the peaks measured at these batches; one peak varies '
              'from run to run, so a slope needs a wide span): '
              + '; '.join(slopes) + '.', '']
  newest = {r['model']: r for r in results}
  lines.append('Weights (MiB; a step also holds their gradients and '
               'momentum): ' + ', '.join(
                   f"{m} {_mib(r['weight_bytes'])}" for m, r in newest.items())
               + '.')
  caps = {r['cap_bytes'] for r in results if r.get('cap_bytes')}
  if caps:
    lines.append(f'Largest batch: BFC peak of one step <= '
                 f'{max(caps) / 2**30:.0f} GiB, each probe a fresh process, '
                 'the line through the measured peaks extrapolated to the cap '
                 'and refitted (trials in the .json); "(line N)": where the '
                 'line through all the peaks measured meets the cap, when it '
                 'is not the batch verified; "A to B": A fitted, B + 1 did '
                 'not; "≥ A": no probe above A was tried (probes: at most '
                 '--tries, none above --max-probe-batch). "x plain": of the '
                 'verified batches.')
  else:
    lines.append('Largest batch under the cap: not measured in this run '
                 '(--no-largest).')
  return lines


def write_results(results, args):
  """Writes the .json and the .md table (keeping rows of other runs)."""
  os.makedirs(RESULTS, exist_ok=True)
  results = _merged(results)
  with open(os.path.join(RESULTS, 'keras_compress.json'), 'w') as f:
    json.dump(dict(args=vars(args), results=results), f, indent=1)
  lines = ['# blpa.keras.compress vs plain Keras', '',
           'One training step (GradientTape + SGD momentum, tf.function), '
           'CPU, BFC allocator peak, fresh process per figure; times: '
           'medians of interleaved steps in one process (shared 2-core '
           'machine).', '',
           '| model | batch | bits | plain MiB | blpa MiB | ratio | '
           'blpa bits=0 MiB | step plain s | step blpa s | time ratio | '
           'max batch plain | max batch blpa | max batch x plain |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  lines += [_table_line(r) for r in results] + _notes(results)
  with open(os.path.join(RESULTS, 'keras_compress.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()

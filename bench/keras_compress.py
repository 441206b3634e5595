"""blpa.keras.compress against plain Keras: peak memory, step time, batch.

One command::

  python bench/keras_compress.py            # writes bench/results/keras_compress.{md,json}
  python bench/keras_compress.py --quick    # smaller sizes, for a smoke run

Peak memory: one training step (GradientTape + SGD momentum in tf.function,
what ``fit`` runs), each configuration in a fresh process with the BFC
allocator (``blpa.memory.peak_bytes``). Step time: plain and compressed
steps interleaved in one process, medians. Largest batch: doubling, then
bisection, of the batch whose step peaks under the cap.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
  """A callable running one SGD-momentum training step of ``model``."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.standard_normal([batch, size, size, 3]), tf.float32)
  y = tf.constant(rng.integers(0, 10, size=[batch]), tf.int32)
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
  return json.loads(lines[-1]) if lines else None


def step_time_ratio(name, bits, batch, rblocks=18, rounds=5):
  """Median step seconds of plain and compressed steps, interleaved."""
  plain_model, size = build_model(name, rblocks)
  from blpa.keras import compress  # pylint: disable=import-outside-toplevel
  steps = {'plain': train_step(plain_model, batch, size),
           'blpa': train_step(compress(plain_model, bits), batch, size)}
  times = {k: [] for k in steps}
  for fn in steps.values():
    fn()  # trace
  for r in range(rounds):
    order = list(steps) if r % 2 == 0 else list(steps)[::-1]
    for key in order:
      start = time.perf_counter()
      steps[key]()
      times[key].append(time.perf_counter() - start)
  med = {k: statistics.median(v) for k, v in times.items()}
  return med['plain'], med['blpa']


def largest_batch(name, bits, cap, start, rblocks=18, limit=4096):
  """Largest batch whose step peaks under ``cap`` bytes (doubling, bisect)."""
  def fits(b):
    got = measure_peak(name, bits, b, rblocks)
    return got is not None and got['peak_bytes'] <= cap
  lo, hi = 0, start
  while hi <= limit and fits(hi):
    lo, hi = hi, hi * 2
  while hi - lo > max(1, lo // 8):
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo


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
  args = parser.parse_args(argv)
  if args.peak_of:
    args.model = args.peak_of
    return peak_main(args)
  return run_all(args)


def run_all(args):
  """Runs every measurement and writes the .md and .json results."""
  names = args.models.split(',')
  default = {'resnet164': 32 if args.quick else 128}
  batches = ([int(b) for b in args.batches.split(',')] if args.batches else
             [default.get(n, 16 if args.quick else 64) for n in names])
  configs = [(n, b, 4) for n, b in zip(names, batches)]
  results = []
  for name, batch, bits in configs:
    row = dict(model=name, batch=batch, bits=bits)
    for key, b in (('plain', None), ('blpa', bits), ('blpa0', 0)):
      got = measure_peak(name, b, batch, args.rblocks)
      row[f'{key}_peak'] = got and got['peak_bytes']
      row['weight_bytes'] = got and got['weight_bytes']
    row['plain_s'], row['blpa_s'] = step_time_ratio(name, bits, batch,
                                                    args.rblocks, args.rounds)
    if not args.no_largest:
      cap = int(args.cap_gib * 2**30)
      row['plain_max_batch'] = largest_batch(name, None, cap, batch // 2,
                                             args.rblocks)
      row['blpa_max_batch'] = largest_batch(name, bits, cap,
                                            max(row['plain_max_batch'], 8),
                                            args.rblocks)
    print(json.dumps(row), flush=True)
    results.append(row)
  write_results(results, args)


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
           'max batch plain | max batch blpa |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    ratio = (r['plain_peak'] / r['blpa_peak']) if r['plain_peak'] and \
        r['blpa_peak'] else float('nan')
    lines.append(
        f"| {r['model']} | {r['batch']} | {r['bits']} | "
        f"{_mib(r['plain_peak'])} | {_mib(r['blpa_peak'])} | "
        f"1/{ratio:.1f} | {_mib(r['blpa0_peak'])} | {r['plain_s']:.2f} | "
        f"{r['blpa_s']:.2f} | {r['blpa_s'] / r['plain_s']:.2f} | "
        f"{r.get('plain_max_batch', 'n/a')} | "
        f"{r.get('blpa_max_batch', 'n/a')} |")
  lines += ['', 'Weights (MiB; a step also holds their gradients and momentum): '
            + ', '.join(f"{r['model']} {_mib(r['weight_bytes'])}"
                        for r in results) + '.']
  if not any('plain_max_batch' in r for r in results):
    lines.append('Largest batch under the cap: not measured in this run '
                 '(--no-largest).')
  with open(os.path.join(RESULTS, 'keras_compress.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()

"""blpa.keras.compress of a subclassed Keras ResNet-20: peak memory, step time.

One command::

  python bench/keras_subclassed.py          # writes bench/results/keras_subclassed.{md,json}
  python bench/keras_subclassed.py --quick  # tiny sizes (the test's smoke run)

The model is the CIFAR ResNet-20 of He et al. (3 stages of 3 basic blocks,
16/32/64 filters, BN, ReLU; the parameter-free shortcut of
``blpa.models.keras_cifar_resnet``: average-pool by the stride, zero-pad the
channels) written as a *subclassed* model in the style of the Keras guide:
blocks are ``keras.layers.Layer`` subclasses whose sublayers are made in
``__init__``, the residual ``sc + h`` is Python glue in ``call``, then a
``layers.ReLU()``.

Peak memory: one training step (``bench.keras_compress.train_step``:
GradientTape + SGD momentum in ``tf.function``), each figure in a fresh
process with the BFC allocator (``blpa.memory.peak_bytes``), the median of
``--tries`` processes (min and max in the table). Rows: plain Keras (the
subclassed model itself), ``compress(model, 4)``, ``keras.RematScope('full')``
(the Keras-native alternative), and for comparison the functional
``keras_cifar_resnet(rblocks=2)`` (ResNet-20 depth) plain and at 4 bits;
each in float32 and under ``mixed_bfloat16``. Step time: plain and
compressed steps interleaved in one process (one process per precision),
medians of ``--rounds`` rounds after a warm-up.
"""

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ''):  # run as a script: python bench/keras_subclassed.py
  sys.path.insert(0, ROOT)

from bench import common  # pylint: disable=wrong-import-position

RESULTS = os.path.join(ROOT, 'bench', 'results')
NAME = 'keras_subclassed'
SIZE = 32
NUM_CLASSES = 10
PRECISIONS = ('float32', 'mixed_bfloat16')
#: Configurations of one peak figure: (key, label).
CONFIGS = (
    ('plain', 'subclassed ResNet-20, plain Keras'),
    ('blpa4', 'subclassed ResNet-20, compress(model, 4)'),
    ('remat', "subclassed ResNet-20, keras.RematScope(mode='full')"),
    ('func_plain', 'functional keras_cifar_resnet(rblocks=2), plain Keras'),
    ('func_blpa4', 'functional keras_cifar_resnet(rblocks=2), compress(4)'),
)
#: Targets: compressed peak at least this many times below plain, compressed
#: step at most this many times plain.
TARGETS = {'float32': {'peak': 3.5, 'time': 1.1},
           'mixed_bfloat16': {'peak': 3.0, 'time': 1.1}}


def model_classes():
  """The subclassed block and model classes (Keras imported lazily)."""
  import keras  # pylint: disable=import-outside-toplevel
  from keras import layers  # pylint: disable=import-outside-toplevel

  def conv(filters, ksz, stride, reg):
    return layers.Conv2D(
        filters, ksz, stride, padding='same', use_bias=False,
        kernel_initializer=keras.initializers.VarianceScaling(
            2.0, 'fan_in', 'untruncated_normal'),
        kernel_regularizer=reg)

  class BasicBlock(keras.layers.Layer):
    """conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU."""

    def __init__(self, filters, stride=1, weight_decay=1e-4, **kwargs):
      super().__init__(**kwargs)
      reg = keras.regularizers.L2(weight_decay / 2) if weight_decay else None
      self.filters, self.stride = filters, stride
      self.conv1 = conv(filters, 3, stride, reg)
      self.bn1 = layers.BatchNormalization(epsilon=1e-3)
      self.relu1 = layers.ReLU()
      self.conv2 = conv(filters, 3, 1, reg)
      self.bn2 = layers.BatchNormalization(epsilon=1e-3)
      self.pool = layers.AveragePooling2D(stride, stride) if stride > 1 \
          else None
      self.relu2 = layers.ReLU()

    def call(self, x, training=None):
      h = self.relu1(self.bn1(self.conv1(x), training=training))
      h = self.bn2(self.conv2(h), training=training)
      sc = self.pool(x) if self.pool is not None else x
      extra = self.filters - sc.shape[-1]
      if extra:  # zero-pad the channels (keras_cifar_resnet's 'pool_pad')
        sc = keras.ops.pad(sc, [[0, 0], [0, 0], [0, 0],
                                [extra // 2, extra - extra // 2]])
      return self.relu2(sc + h)

  class CifarResNet(keras.Model):
    """CIFAR ResNet-(6n+2) with basic blocks (n=3: ResNet-20)."""

    def __init__(self, blocks=3, num_classes=NUM_CLASSES, weight_decay=1e-4,
                 **kwargs):
      super().__init__(**kwargs)
      reg = keras.regularizers.L2(weight_decay / 2) if weight_decay else None
      self.stem = conv(16, 3, 1, reg)
      self.stem_bn = layers.BatchNormalization(epsilon=1e-3)
      self.stem_relu = layers.ReLU()
      self.stages = []
      for stage, width in enumerate((16, 32, 64)):
        for block in range(blocks):
          stride = 2 if (stage > 0 and block == 0) else 1
          self.stages.append(BasicBlock(width, stride, weight_decay,
                                        name=f'block{stage + 1}_{block + 1}'))
      self.pool = layers.GlobalAveragePooling2D()
      self.classifier = layers.Dense(
          num_classes, kernel_initializer=keras.initializers.VarianceScaling(
              1.0, 'fan_in', 'untruncated_normal'), kernel_regularizer=reg)

    def call(self, x, training=None):
      x = self.stem_relu(self.stem_bn(self.stem(x), training=training))
      for block in self.stages:
        x = block(x, training=training)
      return self.classifier(self.pool(x))

  return BasicBlock, CifarResNet


def subclassed_resnet(blocks=3, weight_decay=1e-4):
  """The subclassed CIFAR ResNet-(6·blocks+2), built on a 32x32x3 batch."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  _, cifar_resnet = model_classes()
  model = cifar_resnet(blocks, weight_decay=weight_decay,
                       name=f'subclassed_resnet{6 * blocks + 2}')
  model(tf.zeros([1, SIZE, SIZE, 3]))
  return model


def build(config, blocks=3):
  """The model of a configuration (see :data:`CONFIGS`), under the current
  global dtype policy."""
  import keras  # pylint: disable=import-outside-toplevel
  from blpa import models  # pylint: disable=import-outside-toplevel
  from blpa.keras import compress  # pylint: disable=import-outside-toplevel
  if config == 'plain':
    return subclassed_resnet(blocks)
  if config == 'blpa4':
    return compress(subclassed_resnet(blocks), 4)
  if config == 'remat':
    with keras.RematScope(mode='full'):
      return subclassed_resnet(blocks)
  # The functional model of the same depth: 9·rblocks+2 = 6·blocks+2.
  rblocks = max(1, round((6 * blocks) / 9))
  model = models.keras_cifar_resnet(rblocks)
  if config == 'func_plain':
    return model
  if config == 'func_blpa4':
    return compress(model, 4)
  raise ValueError(f'unknown config {config!r}; one of '
                   f'{[k for k, _ in CONFIGS]}')


def _set_precision(precision):
  import keras  # pylint: disable=import-outside-toplevel
  keras.mixed_precision.set_global_policy(precision)


def peak_main(args):
  """In a fresh BFC process: peak bytes of one step, printed as JSON."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from bench.keras_compress import train_step  # pylint: disable=import-outside-toplevel
  from blpa import memory  # pylint: disable=import-outside-toplevel
  tf.config.threading.set_inter_op_parallelism_threads(1)
  _set_precision(args.precision)
  try:
    model = build(args.peak_of, args.blocks)
    step = train_step(model, args.batch, SIZE)
    peak = memory.peak_bytes(step, repeats=1)
  except Exception as err:  # pylint: disable=broad-except
    common.print_json(dict(config=args.peak_of, precision=args.precision,
                           batch=args.batch,
                           error=f'{type(err).__name__}: {err}'[:600]))
    return 0  # the error is the result (run_json keeps the printed line)
  weights = sum(int(v.numpy().nbytes) for v in model.weights)
  common.print_json(dict(config=args.peak_of, precision=args.precision,
                         batch=args.batch, peak_bytes=int(peak),
                         weight_bytes=weights))
  return 0


def peak_env(onednn='0'):
  """The environment of a peak process: BFC, and ``TF_ENABLE_ONEDNN_OPTS``
  (``'0'``: TensorFlow's own kernels, as ``bench/keras_compress.py``
  measures; ``'1'``: oneDNN, TensorFlow's default on x86)."""
  env = common.env(bfc=True)
  env['TF_ENABLE_ONEDNN_OPTS'] = onednn
  return env


def measure_peak(config, precision, batch, blocks=3, timeout=900,
                 onednn='0'):
  """One peak figure in a fresh process: the printed dict (``error`` on
  failure)."""
  got = common.run_json(
      [os.path.abspath(__file__), '--peak-of', config, '--precision',
       precision, '--batch', str(batch), '--blocks', str(blocks)],
      peak_env(onednn), timeout)
  msg = (f'{got["peak_bytes"] / 2**20:.1f} MiB' if 'peak_bytes' in got
         else f'no result: {got.get("error")}')
  print(f'peak {config} {precision} oneDNN={onednn} batch={batch}: {msg}',
        file=sys.stderr, flush=True)
  return got


def peaks(configs, precisions, batch, blocks=3, tries=3, parallel=1,
          onednn=('0',)):
  """Peak figures of every (oneDNN setting, precision, config), ``tries``
  fresh processes each (``parallel`` at a time: the figure is the
  process's own allocator statistics).

  Returns:
    list of dicts: ``onednn``, ``precision``, ``config``, ``peaks`` (bytes,
    one per process that gave one), ``median``, ``min``, ``max``,
    ``weight_bytes`` and ``errors``.
  """
  from concurrent.futures import ThreadPoolExecutor  # pylint: disable=import-outside-toplevel
  jobs = [(o, p, c) for o in onednn for p in precisions for c in configs
          for _ in range(tries)]
  with ThreadPoolExecutor(max(1, parallel)) as pool:
    got = list(pool.map(
        lambda j: measure_peak(j[2], j[1], batch, blocks, onednn=j[0]), jobs))
  rows = []
  for o, p, c in dict.fromkeys(jobs):
    runs = [g for j, g in zip(jobs, got) if j == (o, p, c)]
    values = [g['peak_bytes'] for g in runs if 'peak_bytes' in g]
    rows.append(dict(
        onednn=o, precision=p, config=c, batch=batch, peaks=values,
        median=statistics.median(values) if values else None,
        min=min(values) if values else None,
        max=max(values) if values else None,
        weight_bytes=next((g['weight_bytes'] for g in runs
                           if 'weight_bytes' in g), None),
        errors=sorted({g['error'] for g in runs if 'error' in g})))
  return rows


def step_times(precision, batch, rounds=7, blocks=3, configs=('plain',
                                                              'blpa4'),
               cpu=None):
  """Step seconds of plain and compressed steps, interleaved in this
  process (rotating order, after one warm-up step each).

  The compressed model is ``compress`` of the plain model (shared
  variables). Sets the global dtype policy to ``precision`` and restores
  the previous one.

  Args:
    cpu: a dict to fill with config → CPU seconds (all threads of this
      process, ``time.process_time``) of each timed step: less sensitive
      than wall time to other processes' load on a shared machine.

  Returns:
    dict: config → list of ``rounds`` seconds.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from bench.keras_compress import train_step  # pylint: disable=import-outside-toplevel
  from bench.timing import interleaved_times  # pylint: disable=import-outside-toplevel
  from blpa.keras import compress  # pylint: disable=import-outside-toplevel
  before = keras.mixed_precision.global_policy().name
  _set_precision(precision)
  try:
    plain = subclassed_resnet(blocks)
    models = {'plain': plain, 'blpa4': compress(plain, 4)}
    steps = {c: _cpu_timed(train_step(models[c], batch, SIZE), c, cpu)
             for c in configs}
    times = interleaved_times(steps, rounds, warmup=1)
    if cpu is not None:  # without the warm-up step
      for c in configs:
        cpu[c] = cpu[c][1:]
    return times
  finally:
    _set_precision(before)


def _cpu_timed(step, key, cpu):
  """``step`` that appends its CPU seconds to ``cpu[key]`` (when ``cpu`` is
  a dict)."""
  if cpu is None:
    return step

  def timed():
    start = time.process_time()
    step()
    cpu.setdefault(key, []).append(time.process_time() - start)
  return timed


def time_main(args):
  """In one process: interleaved step times of one precision, as JSON."""
  load = os.getloadavg()
  cpu = {}
  times = step_times(args.time_of, args.batch, args.rounds, args.blocks,
                     cpu=cpu)
  common.print_json(dict(precision=args.time_of, batch=args.batch,
                         rounds=args.rounds, times=times, cpu_times=cpu,
                         loadavg_before=load, loadavg_after=os.getloadavg(),
                         onednn=os.environ.get('TF_ENABLE_ONEDNN_OPTS',
                                               'default (on)')))
  return 0


def measure_times(precision, batch, rounds, blocks=3, timeout=3600):
  """Interleaved step times of one precision in a fresh process (TF's
  default allocator and threading)."""
  env = common.env(bfc=False)
  env.pop('TF_ENABLE_ONEDNN_OPTS')  # TensorFlow's default, as users run it
  if 'TF_ENABLE_ONEDNN_OPTS' in os.environ:
    env['TF_ENABLE_ONEDNN_OPTS'] = os.environ['TF_ENABLE_ONEDNN_OPTS']
  got = common.run_json(
      [os.path.abspath(__file__), '--time-of', precision, '--batch',
       str(batch), '--rounds', str(rounds), '--blocks', str(blocks)],
      env, timeout)
  print(f'times {precision} batch={batch}: '
        f'{json.dumps(got.get("times") or got.get("error"))}',
        file=sys.stderr, flush=True)
  return got


def time_row(got):
  """Medians and the compressed/plain ratio of :func:`measure_times`'s
  result (and the per-round ratios' median)."""
  if 'times' not in got:
    return dict(error=got.get('error'))
  t = got['times']
  plain, blpa = statistics.median(t['plain']), statistics.median(t['blpa4'])
  per_round = [b / p for p, b in zip(t['plain'], t['blpa4'])]
  cpu = got.get('cpu_times') or {}
  cpu_ratio = (statistics.median(cpu['blpa4']) /
               statistics.median(cpu['plain'])) if cpu.get('plain') and \
      cpu.get('blpa4') else None
  return dict(plain_s=plain, blpa4_s=blpa, ratio=blpa / plain,
              ratio_per_round_median=statistics.median(per_round),
              ratio_of_minima=min(t['blpa4']) / min(t['plain']),
              cpu_ratio=cpu_ratio, cpu_times=cpu,
              times=t, loadavg_before=got.get('loadavg_before'),
              loadavg_after=got.get('loadavg_after'),
              onednn=got.get('onednn'))


def summarize(peak_rows, time_rows):
  """Targets per precision: the peak ratio plain/compressed and the time
  ratio compressed/plain, and whether each target is met."""
  out = {}
  by = {(_onednn(r), r['precision'], r['config']): r for r in peak_rows}
  keys = sorted({(_onednn(r), r['precision']) for r in peak_rows},
                key=lambda k: (k[0], PRECISIONS.index(k[1])))
  keys += [('', p) for p in time_rows if not any(k[1] == p for k in keys)]
  timed = set()
  for o, p in keys:
    plain, blpa = by.get((o, p, 'plain'), {}), by.get((o, p, 'blpa4'), {})
    fplain = by.get((o, p, 'func_plain'), {})
    fblpa = by.get((o, p, 'func_blpa4'), {})
    remat = by.get((o, p, 'remat'), {})
    ratio = lambda a, b: (a['median'] / b['median']) if a.get('median') and \
        b.get('median') else None
    peak_x = ratio(plain, blpa)
    tr = time_rows.get(p, {})
    target = TARGETS[p]
    out[f'{p}, oneDNN {o}' if o else p] = dict(
        precision=p, onednn=o, peak_x_below=peak_x, peak_target=target['peak'],
        peak_met=None if peak_x is None else peak_x >= target['peak'],
        func_peak_x_below=ratio(fplain, fblpa),
        remat_x_below=ratio(plain, remat),
        time_ratio=tr.get('ratio'), time_target=target['time'],
        time_met=None if tr.get('ratio') is None
        else tr['ratio'] <= target['time'],
        time_listed_before=p in timed)
    timed.add(p)
  return out


def _fmt(x):
  return 'n/a' if x is None else f'{x:.3f}'


def _onednn(row):
  """A peak row's oneDNN setting (rows of the first runs: '0')."""
  return row.get('onednn', '0')


def _mib(n):
  return f'{n / 2**20:.1f}' if n else 'n/a'


def _one_line(text, limit=300):
  """An error message fit for a table cell."""
  text = re.sub(r'\x1b\[[0-9;]*m', '', text)
  text = ' '.join(text.replace('|', '/').split())
  return text if len(text) <= limit else text[:limit] + '…'


def _error_text(error):
  """The gist of a worker's error: Keras's highlighted message when there
  is one (after the exception type), else the start of the text."""
  bold = re.findall(r'\x1b\[1m(.*?)\x1b\[0m', error, re.S)
  if bold:
    return _one_line(error.split(':', 1)[0] + ': ' + bold[-1])
  return _one_line(error)


def _met(flag):
  return {True: 'met', False: '**missed**', None: 'n/a'}[flag]


def lscpu_model():
  """``Model name`` and CPU count from ``lscpu``."""
  try:
    text = subprocess.run(['lscpu'], capture_output=True, text=True,
                          check=False).stdout
  except OSError:
    return 'unknown'
  fields = dict(l.split(':', 1) for l in text.splitlines() if ':' in l)
  return (f"{fields.get('Model name', '?').strip()}, "
          f"{fields.get('CPU(s)', '?').strip()} CPUs, "
          f"{fields.get('Hypervisor vendor', 'bare metal').strip()}")


def write_results(result, results_dir=None):
  """Writes ``keras_subclassed.json`` and ``.md``; returns the Markdown."""
  results_dir = results_dir or RESULTS
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, f'{NAME}.json'), 'w') as f:
    json.dump(result, f, indent=1)
  args, labels = result['args'], dict(CONFIGS)
  lines = [
      '# blpa.keras.compress of a subclassed Keras ResNet-20', '',
      f"Date: {result['date']}. Machine: {result['machine']}. Command: "
      f"`{result['command']}`.", '',
      f"One training step (GradientTape + SGD momentum, tf.function) at "
      f"batch {args['batch']}, 32x32x3 inputs, 10 classes. Peak: BFC "
      f"allocator peak of one step, each figure a fresh process "
      f"(inter-op threads 1; oneDNN as in the column: 0 = TensorFlow's own "
      "kernels, as bench/keras_compress.py measures, 1 = oneDNN, "
      "TensorFlow's x86 default), median of "
      f"{args['tries']} processes [min–max]. Step time: plain and "
      "compress(4) steps "
      f"interleaved in one process per precision, median of "
      f"{args['rounds']} rounds after a warm-up (TensorFlow's default "
      f"allocator; oneDNN {result.get('onednn_timing', 'default (on)')}).",
      '', '| oneDNN | precision | model | peak MiB [min–max] | × below '
      'plain |', '|---|---|---|---|---|']
  by = {(_onednn(r), r['precision'], r['config']): r
        for r in result['peaks']}
  order = lambda r: (_onednn(r), PRECISIONS.index(r['precision']),
                     [k for k, _ in CONFIGS].index(r['config']))
  for r in sorted(result['peaks'], key=order):
    base = by.get((_onednn(r), r['precision'],
                   'func_plain' if r['config'].startswith('func') else
                   'plain'), {})
    below = (f"{base['median'] / r['median']:.2f}" if r['median'] and
             base.get('median') and r['config'] not in ('plain', 'func_plain')
             else '')
    span = f" [{_mib(r['min'])}–{_mib(r['max'])}]" if r['peaks'] else ''
    fig = (_mib(r['median']) + span) if r['median'] else \
        'failed: ' + '; '.join(_error_text(e) for e in r['errors'])
    lines.append(f"| {_onednn(r)} | {r['precision']} | "
                 f"{labels[r['config']]} | {fig} | {below} |")
  lines += ['', '| precision | plain s | compress(4) s | ratio (medians) | '
            'per-round ratio median | ratio of minima | CPU-time ratio '
            '(medians) | load avg before → after |',
            '|---|---|---|---|---|---|---|---|']
  for p, t in result['times'].items():
    if 'error' in t:
      lines.append(f"| {p} | failed: {_one_line(str(t['error']))} "
                   "| | | | | | |")
      continue
    lines.append(
        f"| {p} | {t['plain_s']:.3f} | {t['blpa4_s']:.3f} | "
        f"{t['ratio']:.3f} | {t['ratio_per_round_median']:.3f} | "
        f"{_fmt(t.get('ratio_of_minima'))} | {_fmt(t.get('cpu_ratio'))} | "
        f"{t['loadavg_before'][0]:.1f} → {t['loadavg_after'][0]:.1f} |")
  lines += ['', '| case | target | figure | result |',
            '|---|---|---|---|']
  for p, s in result['summary'].items():
    peak = f"{s['peak_x_below']:.2f}×" if s['peak_x_below'] else 'n/a'
    time_r = f"{s['time_ratio']:.3f}×" if s['time_ratio'] else 'n/a'
    if s.get('peak_x_below') is not None or s.get('onednn', '0'):
      lines.append(f"| {p} | compressed peak ≥ {s['peak_target']}× below "
                   f"plain | {peak} | {_met(s['peak_met'])} |")
    if s.get('time_ratio') is not None and \
        not s.get('time_listed_before'):
      lines.append(f"| {s.get('precision', p)} (step times) | compressed "
                   f"step ≤ {s['time_target']}× plain | {time_r} | "
                   f"{_met(s['time_met'])} |")
  weights = {r['config']: r['weight_bytes'] for r in result['peaks']
             if r['weight_bytes'] and r['precision'] == 'float32'}
  weights.pop('blpa4', None)
  weights.pop('func_blpa4', None)
  lines += ['', 'Weights (MiB; a step also holds their gradients and '
            'momentum): ' + ', '.join(f'{k} {_mib(v)}'
                                      for k, v in weights.items()) + '.']
  if result.get('notes'):
    lines += [''] + list(result['notes'])
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(results_dir, f'{NAME}.md'), 'w') as f:
    f.write(text)
  return text


def run_all(args):
  """Every measurement; writes the results; returns the result dict."""
  configs = [c for c in args.configs.split(',') if c]  # '': step times only
  precisions = args.precisions.split(',')
  start = time.time()
  load = os.getloadavg()
  peak_rows = peaks(configs, precisions, args.batch, args.blocks,
                    args.tries, args.parallel, args.onednn.split(',')) \
      if configs else []
  time_rows = {}
  if not args.no_time:
    for p in precisions:
      time_rows[p] = time_row(measure_times(p, args.batch, args.rounds,
                                            args.blocks))
  command = 'python bench/keras_subclassed.py ' + ' '.join(
      args.argv if args.argv is not None else sys.argv[1:])
  old = _previous(args) if args.merge else None
  if old:
    new = {(_onednn(r), r['precision'], r['config']) for r in peak_rows}
    peak_rows = [r for r in old['peaks'] if (_onednn(r), r['precision'],
                                              r['config']) not in new] + \
        peak_rows
    time_rows = {**old.get('times', {}), **time_rows}
    command = old['command'] + '`, then `' + command
  result = dict(
      date=datetime.datetime.now().isoformat(timespec='minutes'),
      machine=lscpu_model(),
      command=command,
      args={k: v for k, v in vars(args).items() if k != 'argv'},
      peaks=peak_rows, times=time_rows,
      summary=summarize(peak_rows, time_rows),
      onednn_timing=os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default (on)'),
      loadavg_start=load, loadavg_end=os.getloadavg(),
      wall_s=time.time() - start,
      notes=args.note or (old or {}).get('notes') or [])
  if old:
    result['date'] = f"{old['date']} and {result['date']}"
  text = write_results(result, args.results_dir)
  print(text)
  return result


def _previous(args):
  """The results of the last run (for --merge), or None."""
  path = os.path.join(args.results_dir or RESULTS, f'{NAME}.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--peak-of', choices=[k for k, _ in CONFIGS],
                      help=argparse.SUPPRESS)
  parser.add_argument('--time-of', choices=PRECISIONS, help=argparse.SUPPRESS)
  parser.add_argument('--precision', choices=PRECISIONS, default='float32',
                      help=argparse.SUPPRESS)
  parser.add_argument('--batch', type=int, default=None,
                      help='batch size (default 128; --quick: 4)')
  parser.add_argument('--blocks', type=int, default=None,
                      help='basic blocks per stage (default 3: ResNet-20; '
                      '--quick: 1)')
  parser.add_argument('--rounds', type=int, default=None,
                      help='interleaved timing rounds (default 9; --quick: 2)')
  parser.add_argument('--tries', type=int, default=None,
                      help='fresh processes per peak figure (default 3; '
                      '--quick: 1)')
  parser.add_argument('--parallel', type=int, default=1,
                      help='peak processes at a time')
  parser.add_argument('--configs', default=','.join(k for k, _ in CONFIGS))
  parser.add_argument('--precisions', default=','.join(PRECISIONS))
  parser.add_argument('--no-time', action='store_true',
                      help='skip the step times')
  parser.add_argument('--onednn', default='1,0',
                      help="TF_ENABLE_ONEDNN_OPTS of the peak processes, "
                      "comma-separated (default '1,0': both)")
  parser.add_argument('--merge', action='store_true',
                      help='keep the rows of the last results that this run '
                      'does not measure')
  parser.add_argument('--quick', action='store_true',
                      help='tiny sizes: batch 4, ResNet-8, 2 rounds, 1 try')
  parser.add_argument('--results-dir', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--note', action='append',
                      help='a line for the results file (e.g. what else ran)')
  parser.add_argument('--rewrite', action='store_true',
                      help='only rewrite the .md from the .json, with the '
                      '--note lines (if any) replacing its notes')
  args = parser.parse_args(argv)
  args.argv = argv
  defaults = dict(batch=(4, 128), blocks=(1, 3), rounds=(2, 9), tries=(1, 3))
  for key, (quick, full) in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, quick if args.quick else full)
  if args.peak_of:
    return peak_main(args)
  if args.rewrite:
    with open(os.path.join(args.results_dir or RESULTS, f'{NAME}.json')) as f:
      result = json.load(f)
    if args.note:
      result['notes'] = args.note
    print(write_results(result, args.results_dir))
    return result
  if args.time_of:
    return time_main(args)
  return run_all(args)


if __name__ == '__main__':
  sys.exit(main() if '--peak-of' in sys.argv or '--time-of' in sys.argv
           else (main() and 0))

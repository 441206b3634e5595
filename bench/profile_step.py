"""Where a blpa training step spends its time, against the Keras model.

Builds the CIFAR ResNet as blpa graphs (qtype 0 and 4) and as the
``tf.keras`` model of :func:`blpa.models.keras_cifar_resnet` (GradientTape +
SGD momentum 0.9 in ``tf.function``), times interleaved steps in one process
(medians), then traces one step of each with ``tf.profiler`` and sums the
duration of every TensorFlow op by kind (convolutions, batch-norm kernels,
blpa's native ops, elementwise ops, reductions, variable traffic, other).
Op durations are summed over threads, so with the 2 intra-op threads busy a
kind's total can exceed its share of the wall time; the table compares the
methods, not absolute wall time.

    python -m bench.profile_step --rblocks 18 --batch 128 --rounds 3 \\
        --title "after" --out bench/results/profile.md
"""

import argparse
import collections
import glob
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import tensorflow as tf

from blpa import memory, models

METHODS = ('keras', 'blpa_q0', 'blpa_q4')

# Op type -> kind. Checked in order; the first matching prefix wins.
KINDS = (
    ('conv', ('Conv2D', '_FusedConv2D', '_MklConv', '_MklNativeConv',
              '_MklFusedConv', 'DepthwiseConv')),
    ('batch norm (fused kernel)', ('FusedBatchNorm', '_MklFusedBatchNorm',
                                   '_MklNativeFusedBatchNorm')),
    ('blpa native ops', ('Blpa',)),
    ('reductions', ('Mean', 'Sum', 'BiasAddGrad', 'Max', 'Min', 'Prod')),
    ('variables', ('ReadVariableOp', 'AssignVariableOp', 'ResourceApply',
                   'VarHandleOp', 'AssignAdd', 'AssignSub')),
    ('pool / pad / shape', ('AvgPool', 'MaxPool', 'Pad', 'Reshape',
                            'BroadcastTo', 'Shape', 'StridedSlice', 'Tile',
                            'ConcatV2', 'Pack', 'Unpack', 'Slice')),
    ('elementwise', ('Add', 'AddV2', 'AddN', 'Sub', 'Mul', 'RealDiv', 'Div',
                     'Sqrt', 'Rsqrt', 'Relu', 'ReluGrad', 'Maximum',
                     'Minimum', 'SquaredDifference', 'Select', 'SelectV2',
                     'Greater', 'GreaterEqual', 'Cast', 'Square', 'Neg',
                     'Identity', 'Floor', 'Where', 'ZerosLike', 'OnesLike',
                     'Fill', '_MklAdd', '_MklMul', 'BiasAdd', 'Softmax',
                     'SparseSoftmax', 'OneHot', 'ArgMax', 'Equal', 'Sign',
                     'LogSoftmax', 'Exp', 'Log')),
)


def op_kind(op_type):
  """The kind of an op type (see ``KINDS``), ``'other'`` if none fits."""
  for kind, prefixes in KINDS:
    if any(op_type == p or op_type.startswith(p) for p in prefixes):
      return kind
  return 'other'


def build_steps(rblocks, batch, methods, seed=0):
  """One step callable per method."""
  steps = {}
  rng = np.random.default_rng(seed)
  x = rng.standard_normal([batch, 32, 32, 3]).astype(np.float32)
  y = rng.integers(0, 10, size=[batch, 1, 1, 1]).astype(np.int32)
  for key in methods:
    tf.random.set_seed(seed)
    if key == 'keras':
      steps[key] = memory.keras_step_function('keras', rblocks, x, y)
    else:
      net = models.build(models.cifar_resnet(rblocks), [batch, 32, 32, 3],
                         qtype=int(key[-1]))
      steps[key] = memory.step_function('blpa', net, x, y)
  return steps


def interleaved_medians(steps, rounds):
  """Median seconds per step, steps run round-robin in rotating order."""
  keys = list(steps)
  for key in keys:  # warm-up: tracing and first allocations
    steps[key]()
  times = {key: [] for key in keys}
  for r in range(rounds):
    for key in keys[r % len(keys):] + keys[:r % len(keys)]:
      start = time.perf_counter()
      steps[key]()
      times[key].append(time.perf_counter() - start)
  return {key: statistics.median(t) for key, t in times.items()}


def _op_events(path):
  """``(op_type, seconds)`` of every TF op event in one xplane file."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=import-outside-toplevel
  space = xplane_pb2.XSpace()
  with open(path, 'rb') as f:
    space.ParseFromString(f.read())
  for plane in space.planes:
    for line in plane.lines:
      if not line.name.startswith('tf_Compute'):
        continue
      for event in line.events:
        meta = plane.event_metadata[event.metadata_id]
        if ':' in meta.name and meta.display_name:
          yield meta.display_name, event.duration_ps * 1e-12


def profile_step(step):
  """Op-type totals (seconds) of one traced step."""
  logdir = tempfile.mkdtemp(prefix='blpa_profile_')
  try:
    tf.profiler.experimental.start(logdir)
    step()
    tf.profiler.experimental.stop()
    totals = collections.Counter()
    for path in glob.glob(os.path.join(logdir, '**', '*.xplane.pb'),
                          recursive=True):
      for op_type, seconds in _op_events(path):
        totals[op_type] += seconds
    return totals
  finally:
    shutil.rmtree(logdir, ignore_errors=True)


def by_kind(totals):
  out = collections.Counter()
  for op_type, seconds in totals.items():
    out[op_kind(op_type)] += seconds
  return out


def format_tables(title, config, medians, totals):
  """Markdown: step times, op time by kind, and the top op types."""
  keys = list(medians)
  base = medians.get('keras')
  lines = [f'## {title}', '', config, '',
           '| method | median step (s) | vs keras |', '|---|---|---|']
  for key in keys:
    ratio = f'{medians[key] / base:.2f}x' if base else '-'
    lines.append(f'| {key} | {medians[key]:.3f} | {ratio} |')
  kinds = {key: by_kind(totals[key]) for key in keys}
  names = sorted({k for c in kinds.values() for k in c},
                 key=lambda k: -max(c[k] for c in kinds.values()))
  lines += ['', 'Op time per step by kind (s, summed over threads):', '',
            '| kind | ' + ' | '.join(keys) + ' |',
            '|---' * (len(keys) + 1) + '|']
  for name in names + ['total']:
    cells = [sum(kinds[k].values()) if name == 'total' else kinds[k][name]
             for k in keys]
    lines.append(f'| {name} | ' + ' | '.join(f'{c:.3f}' for c in cells) +
                 ' |')
  lines += ['', 'Top op types (s per step):', '']
  for key in keys:
    top = ', '.join(f'{t} {s:.3f}' for t, s in totals[key].most_common(10))
    lines.append(f'- {key}: {top}')
  return '\n'.join(lines) + '\n'


def write_section(path, title, text):
  """Writes ``text`` as the section ``## title`` of ``path`` (replaced)."""
  sections, current = {}, None
  order = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.startswith('## '):
          current = line[3:].strip()
          order.append(current)
          sections[current] = []
        if current is not None:
          sections[current].append(line)
  if title not in sections:
    order.append(title)
  sections[title] = [text + '\n']
  with open(path, 'w') as f:
    f.write('# Profile of one training step (bench/profile_step.py)\n\n')
    for name in order:
      f.write(''.join(sections[name]).rstrip('\n') + '\n\n')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rblocks', type=int, default=18)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--methods', nargs='+', default=list(METHODS))
  parser.add_argument('--title', default='profile')
  parser.add_argument('--out', default=None,
                      help='Markdown file to write the section into')
  args = parser.parse_args(argv)
  steps = build_steps(args.rblocks, args.batch, args.methods)
  load = os.getloadavg()[0]
  medians = interleaved_medians(steps, args.rounds)
  totals = {key: profile_step(step) for key, step in steps.items()}
  config = (f'ResNet-{9 * args.rblocks + 2}, batch {args.batch}, '
            f'{args.rounds} interleaved rounds after a warm-up step, '
            f'{tf.config.threading.get_intra_op_parallelism_threads() or "default"} '
            f'intra-op threads, load average {load:.2f} at start '
            '(machine shared with other jobs).')
  text = format_tables(args.title, config, medians, totals)
  print(text)
  if args.out:
    write_section(args.out, args.title, text)


if __name__ == '__main__':
  main()

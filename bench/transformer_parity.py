"""Training parity of ``blpa.keras.compress`` on a small transformer.

One command::

  python bench/transformer_parity.py          # writes bench/results/transformer_parity.{md,json}
  python bench/transformer_parity.py --quick  # one seed, reverse only, few epochs

Tasks with a known answer, generated here: sequences of ``SEQ`` digits
(0-9, uniform); ``reverse`` predicts the sequence reversed, ``sort`` the
sequence sorted (per position, 10 classes). Model: keras-hub
``TokenAndPositionEmbedding`` (dim 32) -> ``TransformerEncoder``
(intermediate 64, 4 heads, dropout 0.1) -> ``Dense(10, softmax)`` per
position. Training: ``model.fit`` with Adam, ``loss=
'sparse_categorical_crossentropy'`` (the string); the plain model
and ``compress(model, 4)`` start from the same weights and the same state of
*all* variables (seed-generator states included: the dropout masks are the
same until the weights part), and the same global seed (the shuffles).
Accuracy: per position, on a fresh held-out set of the same task.
tests/test_keras_transformers.py runs the reverse task at one seed with
:func:`parity`.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ''):  # run as a script
  sys.path.insert(0, ROOT)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

SEQ, VOCAB, DIM = 8, 10, 32


def task(name, n, seed):
  """``n`` sequences of ``SEQ`` digits and their answers (int32)."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, VOCAB, [n, SEQ]).astype('int32')
  if name == 'reverse':
    y = x[:, ::-1].copy()
  elif name == 'sort':
    y = np.sort(x, axis=1)
  else:
    raise ValueError(f'unknown task {name!r}')
  return x, y


def transformer(layers=1, dropout=0.1):
  """Embedding + ``layers`` keras-hub TransformerEncoder blocks + a
  per-position softmax head."""
  import keras_hub  # pylint: disable=import-outside-toplevel
  inp = keras.Input((SEQ,), dtype='int32')
  h = keras_hub.layers.TokenAndPositionEmbedding(VOCAB, SEQ, DIM)(inp)
  for _ in range(layers):
    h = keras_hub.layers.TransformerEncoder(2 * DIM, 4, dropout=dropout)(h)
  return keras.Model(inp, keras.layers.Dense(VOCAB, activation='softmax')(h))


def parity(task_name='reverse', seed=0, epochs=6, n_train=1024, n_test=1000,
           bits=4, lr=1e-2, batch_size=32, layers=1):
  """Trains the plain model and ``compress(model, bits)`` from the same
  start; returns a dict with each arm's test accuracy, last-epoch training
  accuracy and fit seconds."""
  from blpa.keras import compress  # pylint: disable=import-outside-toplevel
  x, y = task(task_name, n_train, seed=1000 + seed)
  xt, yt = task(task_name, n_test, seed=2000 + seed)
  keras.utils.set_random_seed(seed)
  model = transformer(layers)
  start = [v.numpy() for v in model.variables]
  out = {'task': task_name, 'seed': seed, 'epochs': epochs, 'bits': bits}
  try:
    for arm in ('plain', 'compressed'):
      for v, w in zip(model.variables, start):
        v.assign(w)
      keras.utils.set_random_seed(seed + 100)
      m = model if arm == 'plain' else compress(model, bits)
      m.compile(keras.optimizers.Adam(lr),
                loss='sparse_categorical_crossentropy', metrics=['accuracy'])
      t = time.time()
      hist = m.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0)
      seconds = time.time() - t
      acc = m.evaluate(xt, yt, batch_size=500, verbose=0)[1]
      out[arm] = {'test_accuracy': float(acc),
                  'train_accuracy': float(hist.history['accuracy'][-1]),
                  'fit_seconds': round(seconds, 1)}
  finally:
    for v, w in zip(model.variables, start):
      v.assign(w)
  out['gap_pt'] = 100 * (out['plain']['test_accuracy'] -
                         out['compressed']['test_accuracy'])
  return out


def _machine():
  return (f'{platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} CPU cores, TF {tf.__version__}, '
          f'Keras {keras.__version__}, TF_ENABLE_ONEDNN_OPTS='
          f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}")


def _markdown(results, args, command, started, finished):
  lines = ['# Training parity: plain Keras vs compress(model, 4) on a small '
           'transformer', '',
           f'Date: {started} to {finished}. Machine: {_machine()} (shared; '
           'times are wall-clock and include tracing).', '',
           f'Command: `{command}`', '',
           f'Tasks: digit sequences of length {SEQ}, answer per position '
           '(reverse: the sequence reversed; sort: sorted). Model: '
           f'TokenAndPositionEmbedding({VOCAB}, {SEQ}, {DIM}) -> '
           f'{args.layers} keras-hub TransformerEncoder(intermediate '
           f'{2 * DIM}, 4 heads, dropout 0.1) -> Dense({VOCAB}, softmax). '
           f'fit: Adam {args.lr}, batch {args.batch_size}, '
           f'{args.n_train} training sequences, accuracy per position on '
           f'{args.n_test} fresh ones; plain and compressed from the same '
           'weights, seed-generator states and global seed.', '',
           '| task | epochs | seed | plain test acc | compressed test acc | '
           'gap (pt) | plain train acc | compressed train acc | fit s '
           'plain / compressed |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in results:
    p, c = r['plain'], r['compressed']
    lines.append(
        f"| {r['task']} | {r['epochs']} | {r['seed']} | "
        f"{100 * p['test_accuracy']:.2f} | {100 * c['test_accuracy']:.2f} | "
        f"{r['gap_pt']:+.2f} | {100 * p['train_accuracy']:.2f} | "
        f"{100 * c['train_accuracy']:.2f} | {p['fit_seconds']} / "
        f"{c['fit_seconds']} |")
  lines.append('')
  for name in sorted({r['task'] for r in results}):
    gaps = [r['gap_pt'] for r in results if r['task'] == name]
    lines.append(f'{name}: gap (plain - compressed, points) mean '
                 f'{np.mean(gaps):+.2f}, largest |gap| '
                 f'{max(abs(g) for g in gaps):.2f} over {len(gaps)} seeds.')
  lines.append('')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tasks', default='reverse,sort')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--epochs', default='reverse:8,sort:12',
                      help='per task, name:epochs')
  parser.add_argument('--n-train', type=int, default=2048)
  parser.add_argument('--n-test', type=int, default=2000)
  parser.add_argument('--lr', type=float, default=5e-3)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--layers', type=int, default=1)
  parser.add_argument('--quick', action='store_true',
                      help='reverse, one seed, 2 epochs, no files written')
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results'))
  args = parser.parse_args(argv)
  if args.quick:
    args.tasks, args.seeds, args.epochs = 'reverse', '0', 'reverse:2'
    args.n_train, args.n_test = 256, 200
  epochs = dict(item.split(':') for item in args.epochs.split(','))
  command = 'python bench/transformer_parity.py ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  started = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
  results = []
  for name in args.tasks.split(','):
    for seed in (int(s) for s in args.seeds.split(',')):
      r = parity(name, seed, int(epochs[name]), args.n_train, args.n_test,
                 lr=args.lr, batch_size=args.batch_size, layers=args.layers)
      print(json.dumps(r), flush=True)
      results.append(r)
  finished = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
  if args.quick:
    return results
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'transformer_parity.json'), 'w') as f:
    json.dump({'command': command.strip(), 'started': started,
               'finished': finished, 'machine': _machine(),
               'results': results}, f, indent=1)
  with open(os.path.join(args.out, 'transformer_parity.md'), 'w') as f:
    f.write(_markdown(results, args, command.strip(), started, finished))
  return results


if __name__ == '__main__':
  main()

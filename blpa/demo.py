"""Offline demo: exact vs 4-bit activation training on handwritten digits.

Trains the same small ResNet (same seed, same batches) with exact stored
activations (qtype 0) and with 4-bit ones (qtype 4) on scikit-learn's bundled
digits (1797 8x8 images, upsampled to 16x16), then prints both test
accuracies, the runtime and the memory the stored activations take.  Runs in
about a minute on 2 CPU cores; needs no download::

    python -m blpa.demo
    python -m blpa.demo --iters 600 --out demo_out   # logs, checkpoints, plot
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
import numpy as np  # noqa: E402

from blpa import data, models, plot, training  # noqa: E402

SIZE = 16
TEST = 360
SCHEDULE = [(0.05, 0.01), (0.5, 0.1), (0.75, 0.01), (1.0, 0.001)]


def load_digits():
  """scikit-learn's digits as CIFAR-like arrays.

  Returns:
    ``((train_x, train_y), (test_x, test_y))``: float32 ``[N, 16, 16, 1]``
    images (pixels in [0, 1], 2x nearest-neighbour upsampled, each image's
    mean subtracted) and int32 labels; a fixed split of 360 test images.
  """
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  digits = datasets.load_digits()
  x = digits.images.astype(np.float32) / 16.0
  x = np.kron(x, np.ones((1, 2, 2), np.float32))[..., None]
  x -= x.mean(axis=(1, 2, 3), keepdims=True)
  y = digits.target.astype(np.int32)
  order = np.random.RandomState(0).permutation(len(y))
  test, train = order[:TEST], order[TEST:]
  return (x[train], y[train]), (x[test], y[test])


def train_one(qtype, digits, args, out):
  """Trains one network; returns its summary dict.

  Args:
    qtype: 0, 4 or 8.
    digits: what :func:`load_digits` returned.
    args: parsed options (``iters``, ``bsz``, ``seed``).
    out: folder for the checkpoint and the JSONL log.

  Returns:
    dict with ``result`` (final :func:`training.evaluate` result), ``seconds``,
    ``bytes`` (stored activations per batch), ``full`` (at full precision)
    and ``log`` (the JSONL path); None if training did not finish.
  """
  (train_x, train_y), (test_x, test_y) = digits
  save = os.path.join(out, f'q{qtype}.npz')
  for path in (save, training.log_path(save)):
    if os.path.exists(path):
      os.remove(path)
  net = training.build_graph(models.cifar_resnet(1, 10),
                             [args.bsz, SIZE, SIZE, 1], qtype, 5e-4,
                             seed=args.seed)
  sampler = data.Sampler(len(train_y), args.bsz, args.seed)

  def batches(start, stop):
    for it in range(start, stop):
      idx = sampler.indices(it)
      yield train_x[idx], train_y[idx]

  def evaluate(net, stop=None):
    chunks = ((test_x[i:i + 120], test_y[i:i + 120]) for i in range(0, TEST,
                                                                     120))
    return training.evaluate(net, chunks, stop)

  opts = training.Options(
      save=save, iters=args.iters, val_every=max(args.iters // 8, 1),
      lr=training.step_schedule(args.iters, 1.0, SCHEDULE), ckpt_every=0,
      progress=False)
  began = time.time()
  if training.run(net, opts, batches, evaluate) != 0:
    return None
  return dict(result=evaluate(net), seconds=time.time() - began,
              bytes=sum(b for _, _, b in net.saved_bytes()),
              full=training.full_bytes(net), log=training.log_path(save))


def report(runs, bsz):
  """Prints the comparison of the runs (dict qtype → summary)."""
  print('\nresults on the 360 test digits:')
  for qtype, run in runs.items():
    r = run['result']
    print(f'  qtype {qtype}: test accuracy {r["val_acc_running"]:.4f} '
          f'(running BN stats), {r["val_acc"]:.4f} (batch stats); '
          f'{run["seconds"]:.1f} s')
  q4, q0 = runs[4], runs[0]
  print(f'stored activations per batch of {bsz}: '
        f'{q4["bytes"] / 2**20:.2f} MiB at 4 bits vs {q0["full"] / 2**20:.2f}'
        f' MiB exact: {q0["full"] / q4["bytes"]:.1f}x smaller '
        f'({100 * (1 - q4["bytes"] / q0["full"]):.0f}% saved)')


def main(argv=None):
  """Runs the demo; returns the exit status."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--iters', type=training.positive, default=400,
                      help='iterations per run. Default 400.')
  parser.add_argument('--bsz', type=training.positive, default=32,
                      help='batch size. Default 32.')
  parser.add_argument('--seed', type=int, default=0, help='Default 0.')
  parser.add_argument('--out', default=None, help='keep the JSONL logs, '
                      'checkpoints and curves.png in this folder')
  args = parser.parse_args(argv)
  digits = load_digits()
  print(f'blpa demo: {len(digits[0][1])} training / {TEST} test digits at '
        f'{SIZE}x{SIZE}, ResNet-11, {args.iters} iterations of batch '
        f'{args.bsz}, qtype 0 then qtype 4 (same seed)', flush=True)
  out = args.out or tempfile.mkdtemp(prefix='blpa_demo_')
  try:
    runs = {q: train_one(q, digits, args, out) for q in (0, 4)}
    if None in runs.values():
      return 1
    report(runs, args.bsz)
    if args.out:
      plot.plot([runs[0]['log'], runs[4]['log']],
                os.path.join(out, 'curves.png'), ['qtype 0', 'qtype 4'])
      print(f'logs, checkpoints and curves.png written to {out}')
  finally:
    if not args.out:
      shutil.rmtree(out, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())

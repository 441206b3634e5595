"""Plots training curves from the JSONL logs of the training programs.

Usage::

    python -m blpa.plot runs/c10_q0.jsonl runs/c10_q4.jsonl -o curves.png
    blpa-plot runs/*.jsonl -o curves.png        # once installed

Three panels: training loss, training accuracy, and validation accuracy
(solid: batch statistics, dashed: running statistics), one colour per run.
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use('Agg')
# pylint: disable=wrong-import-position
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path):
  """Reads one JSONL log.

  Args:
    path: the file.

  Returns:
    ``(train, val)``: lists of records (dicts) with ``loss`` and with
    ``val_acc`` respectively, sorted by iteration.

  Raises:
    ValueError: for a line that is not a JSON object with ``iter``.
  """
  train, val = [], []
  with open(path, encoding='utf-8') as f:
    for num, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        record['iter'] = int(record['iter'])
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{path}, line {num}: not a log record ({e})'
                         ) from None
      if 'val_acc' in record:
        val.append(record)
      elif 'loss' in record:
        train.append(record)
  key = lambda r: r['iter']
  return sorted(train, key=key), sorted(val, key=key)


def _series(records, name):
  """Iterations and values of ``name`` over records that have it."""
  pairs = [(r['iter'], r[name]) for r in records if name in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def plot(paths, out, labels=None):
  """Draws the curves of one or more runs into a PNG.

  Args:
    paths: JSONL logs.
    out: output image file.
    labels: legend names (default: the file names without extension).
  """
  labels = labels or [os.path.splitext(os.path.basename(p))[0] for p in paths]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  panels = (('training loss', 'loss'), ('training accuracy', 'acc'),
            ('validation accuracy', 'val_acc'))
  for ax, (title, _) in zip(axes, panels):
    ax.set_title(title)
    ax.set_xlabel('iteration')
    ax.grid(alpha=0.3)
  for i, (path, label) in enumerate(zip(paths, labels)):
    train, val = read_log(path)
    colour = f'C{i % 10}'
    axes[0].plot(*_series(train, 'loss'), color=colour, label=label)
    axes[1].plot(*_series(train, 'acc'), color=colour, label=label)
    axes[2].plot(*_series(val, 'val_acc'), color=colour, marker='.',
                 label=f'{label} (batch stats)')
    axes[2].plot(*_series(val, 'val_acc_running'), color=colour, ls='--',
                 marker='.', label=f'{label} (running stats)')
  for ax in axes:
    if ax.lines:
      ax.legend(fontsize='small')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)


def main(argv=None):
  """Command-line entry point (``blpa-plot``); returns the exit status."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('logs', nargs='+', help='JSONL logs of training runs')
  parser.add_argument('-o', '--out', default='curves.png',
                      help='output PNG. Default curves.png.')
  parser.add_argument('--labels', default=None,
                      help='comma-separated legend names, one per log')
  args = parser.parse_args(argv)
  labels = args.labels.split(',') if args.labels else None
  if labels and len(labels) != len(args.logs):
    parser.error(f'--labels names {len(labels)} runs, but {len(args.logs)} '
                 'logs were given')
  try:
    plot(args.logs, args.out, labels)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())

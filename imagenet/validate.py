#!/usr/bin/env python3
"""10-crop ImageNet evaluation of a checkpoint (top-1 and top-5 accuracy).

Each image's shorter side is scaled to 256; the four corner crops and the
centre crop of 224, and the same of the flipped image, go through the
network, and their softmax probabilities are averaged.  Accuracy is given
with batch statistics (the reference's mode: each forward pass is one crop
position of a batch of images) and with running statistics.  Example::

    python imagenet/validate.py -save runs/im152_q4.npz --data-dir /data/im
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
import numpy as np  # noqa: E402

from blpa import checkpoint, data, models, training  # noqa: E402

MODES = ('batch', 'running')


def parse_args(argv=None):
  """Parses the command line."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('-save', required=True, help='checkpoint to evaluate')
  training.add_imagenet_args(parser)
  parser.add_argument('--bsz', '-bsz', type=training.positive, default=100,
                      help='images per batch. Default 100.')
  parser.add_argument('--limit', type=int, default=0,
                      help='evaluate the first N images only (0: all)')
  return parser.parse_args(argv)


def topk_hits(probs, labels):
  """Top-1 and top-5 hits of a batch.

  Args:
    probs: ``[B, classes]``.
    labels: ``[B]``.

  Returns:
    ``(top1, top5)`` counts (top-5 is top-``classes`` when fewer classes).
  """
  order = np.argsort(-probs, axis=1)
  hit = order[:, :5] == labels[:, None]
  return int(hit[:, 0].sum()), int(hit.any(axis=1).sum())


def main(argv=None):
  """Runs the program; returns the exit status."""
  return training.guarded(_main, parse_args(argv))


def _classes(path):
  """Number of classes of a checkpoint: the size of its last weight."""
  try:
    arrays = checkpoint.read(path)
  except (OSError, ValueError) as e:
    raise data.DataError(str(e)) from None
  last = max(int(k) for k in arrays if k.isdigit())
  return len(arrays[str(last)])


def _main(args):
  paths, labels = data.read_list(os.path.join(args.data_dir, args.val_list),
                                 args.data_dir)
  if args.limit:
    paths, labels = paths[:args.limit], labels[:args.limit]
  classes = args.classes or _classes(args.save)
  size = args.image_size
  net = training.build_graph(models.imagenet_resnet(args.blocks, classes),
                             [args.bsz, size, size, 3], 0, 0.0)
  niter = training.resume(net, args.save)
  hits = {m: np.zeros(2, np.int64) for m in MODES}
  seen = 0
  for b, x, y in data.imagenet_eval_batches(paths, labels, args.bsz, size,
                                            crops=True, log=training.log):
    if x is None:
      continue
    for mode in MODES:
      probs = sum(net.forward(x[:, c], bn=mode) for c in range(x.shape[1]))
      hits[mode] += topk_hits(probs, y)
    seen += len(y)
    batches = -(-len(paths) // args.bsz)
    training.log(f'{b + 1} of {batches}: ' + _line(hits, seen))
  if not seen:
    raise data.DataError('no readable validation image')
  print(f'checkpoint {args.save} (iteration {niter}), {seen} images, '
        f'10 crops: ' + _line(hits, seen), flush=True)
  return 0


def _line(hits, seen):
  """Top-1/top-5 accuracy of each BN mode so far."""
  return ' | '.join(f'{m} stats: top-1 {h[0] / seen:.4f} '
                    f'top-5 {h[1] / seen:.4f}' for m, h in hits.items())


if __name__ == '__main__':
  sys.exit(main())

#!/usr/bin/env python3
"""Trains a pre-activation ResNet (ResNet-152 by default) on ImageNet.

The reference's recipe: batch 256 (split into ``-split`` sub-batches whose
gradients are accumulated, and over ``-ngpu`` devices), momentum 0.9, weight
decay 1e-4, learning rate 0.1 dropping 10x at 160k, 320k and 480k of 640k
iterations (boundaries scale with --iters).  ``--data-dir`` holds
``train.txt`` and ``val.txt`` with one ``relative/path.JPEG,label`` line per
image (paths relative to ``--data-dir``).  Example::

    python imagenet/train.py -save runs/im152_q4.npz -qtype 4 \\
        --data-dir /data/imagenet
    python imagenet/train.py -save runs/im152_q4.npz --data-dir /data/imagenet \\
        --eval-only   # validation loss/accuracy of the checkpoint, no training

(``imagenet/validate.py`` gives the 10-crop top-1/top-5.)

Several machines: run the same command on each, with ``TF_CONFIG`` naming
the workers (``-ngpu`` is then per worker); every worker reads the same
batches and trains its devices' shards, and worker N > 0 writes its
(identical) checkpoint to ``<save>.workerN.npz``.

Unreadable images are reported by file name and left out of their batch.
Exit status: 0 done, 2 bad data or checkpoint, 3 NaN/inf loss, 130/143
stopped by SIGINT/SIGTERM after saving.  See :mod:`blpa.training`.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
from blpa import data, models, training  # noqa: E402

ITERS = 640000
WEIGHT_DECAY = 1e-4
SCHEDULE = [(160000, 0.1), (320000, 0.01), (480000, 0.001), (640000, 1e-4)]


def parse_args(argv=None):
  """Parses the command line (the reference's single-dash flags work)."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  training.add_common_args(parser, ITERS, 1000)
  training.add_imagenet_args(parser)
  add = parser.add_argument
  add('-split', type=training.positive, default=2,
      help='sub-batches per device and update. Default 2.')
  add('-ngpu', type=training.positive, default=1,
      help='devices (per worker when TF_CONFIG names several workers), '
      'trained with blpa.mgraph. Default 1.')
  add('--cpu-devices', type=training.positive, default=None,
      help='split the CPU into N logical devices, to run -ngpu N without '
      'GPUs (for trying multi-device training).')
  add('--bsz', '-bsz', type=training.positive, default=256,
      help='batch size per update. Default 256.')
  add('--train-list', default='train.txt', help='training list, relative '
      'to --data-dir. Default train.txt.')
  add('--val-images', type=int, default=10240, help='validate on the first '
      'N images of the list (0: all). Default 10240, as the reference.')
  add('--eval-only', action='store_true',
      help='validate the checkpoint (centre crops, batch and running BN '
      'statistics) and exit')
  return parser.parse_args(argv)


def main(argv=None):
  """Runs the program; returns the exit status."""
  return training.guarded(_main, parse_args(argv))


def _main(args):
  if args.cpu_devices:
    from blpa import mgraph  # pylint: disable=import-outside-toplevel
    mgraph.split_cpu(args.cpu_devices)
  parts = args.split * args.ngpu
  if args.bsz % parts:
    raise data.DataError(f'--bsz {args.bsz} must be divisible by -split x '
                         f'-ngpu = {parts}')
  paths, labels = data.read_list(os.path.join(args.data_dir, args.train_list),
                                 args.data_dir)
  vpaths, vlabels = data.read_list(os.path.join(args.data_dir, args.val_list),
                                   args.data_dir)
  if args.val_images:
    vpaths, vlabels = vpaths[:args.val_images], vlabels[:args.val_images]
  classes = args.classes or int(max(labels.max(), vlabels.max())) + 1
  training.log(f'{len(paths)} training and {len(vpaths)} validation images, '
               f'{classes} classes')
  size = args.image_size
  specs = models.imagenet_resnet(args.blocks, classes)
  net = _build(args, specs, [args.bsz, size, size, 3])
  if getattr(net, 'worker', 0):  # several workers: one checkpoint each
    root, ext = os.path.splitext(args.save)
    args.save = f'{root}.worker{net.worker}{ext}'
  training.log(f'ResNet-{len(specs)}, qtype {args.qtype}: '
               + training.memory_line(net))
  sampler = data.Sampler(len(paths), args.bsz, args.seed)

  need = args.split * getattr(net, 'replicas', 1)  # an image per device

  def batches(start, stop):
    for _, x, y in data.imagenet_train_batches(paths, labels, sampler, start,
                                               stop, size, training.log):
      yield (x, y) if y is not None and len(y) >= need else (None, None)

  def evaluate(net, stop=None):
    stream = data.imagenet_eval_batches(vpaths, vlabels, args.bsz // args.split,
                                        size, log=training.log)
    return training.evaluate(net, ((x, y) for _, x, y in stream), stop)

  if args.eval_only:
    return training.eval_only(net, args.save, evaluate)
  lr = training.step_schedule(args.iters, ITERS, SCHEDULE)
  return training.run(net, training.options(args, lr, args.split), batches,
                      evaluate)



def _build(args, specs, shape):
  """Builds the graph; devices or batches that cannot work become one error."""
  try:
    return training.build_graph(specs, shape, args.qtype, WEIGHT_DECAY,
                                args.split, args.ngpu, args.seed)
  except (RuntimeError, ValueError) as e:
    raise data.DataError(str(e)) from None


if __name__ == '__main__':
  sys.exit(main())

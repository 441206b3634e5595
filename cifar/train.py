#!/usr/bin/env python3
"""Trains a pre-activation ResNet (ResNet-164 by default) on CIFAR-10/100.

The paper's recipe: batch 128, momentum 0.9, weight decay 2e-4, learning
rate 0.01 for 400 iterations, 0.1 until 32k, 0.01 until 48k and 0.001 until
64k (boundaries scale with --iters), random ±4 pixel translations and
horizontal flips.  Examples::

    python cifar/train.py -save runs/c10_q4.npz -qtype 4 -dset cifar10
    python cifar/train.py -save runs/c10_q4.npz -dset cifar10 --eval-only

``-save`` is both the output and the resume point.  Exit status: 0 done,
2 bad data or checkpoint, 3 NaN/inf loss, 130/143 stopped by SIGINT/SIGTERM
after saving.  See :mod:`blpa.training` for logs and checkpoints and
:mod:`blpa.data` for data formats and preprocessing.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
from blpa import data, models, training  # noqa: E402

ITERS = 64000
WEIGHT_DECAY = 2e-4
SCHEDULE = [(400, 0.01), (32000, 0.1), (48000, 0.01), (64000, 0.001)]


def parse_args(argv=None):
  """Parses the command line (the reference's single-dash flags work)."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  training.add_common_args(parser, ITERS, 400)
  add = parser.add_argument
  add('-dset', default='cifar100', choices=sorted(data.CIFAR_CLASSES),
      help='dataset. Default cifar100.')
  add('-bsz', '--bsz', type=training.positive, default=128,
      help='batch size. Default 128.')
  add('-rblocks', type=training.positive, default=18,
      help='residual blocks per stage; 9*rblocks+2 layers. Default 18.')
  add('--data-dir', default=None, help='folder with the reference files '
      '(cifar10: train.npz, test.npz; cifar100: train, test) or a '
      'tensorflow-datasets copy. Default: data/<dset> or the tfds default.')
  add('--download', action='store_true',
      help='let tensorflow-datasets download a missing copy')
  add('--npz-layout', default='auto', choices=('auto', 'hwc', 'chw'),
      help='pixel order of flat cifar10 npz rows. Default auto.')
  add('--val-bsz', type=training.positive, default=500,
      help='validation batch size (matters for batch statistics). '
      'Default 500.')
  add('--eval-only', action='store_true',
      help='evaluate the checkpoint on the test set and exit')
  return parser.parse_args(argv)


def main(argv=None):
  """Runs the program; returns the exit status."""
  return training.guarded(_main, parse_args(argv))


def _main(args):
  dset = data.load_cifar(args.dset, args.data_dir, args.download,
                         args.npz_layout, training.log)
  (train_x, train_y), (test_x, test_y) = dset['train'], dset['test']
  training.log(f'{args.dset}: {len(train_y)} training and {len(test_y)} test '
               f'images from {dset["source"]}')
  specs = models.cifar_resnet(args.rblocks, dset['classes'])
  net = training.build_graph(specs, [args.bsz, 32, 32, 3], args.qtype,
                             WEIGHT_DECAY, seed=args.seed)
  training.log(f'ResNet-{len(specs)}, qtype {args.qtype}: '
               + training.memory_line(net))

  def evaluate(net, stop=None):
    batches = data.cifar_eval_batches(test_x, test_y, args.val_bsz)
    return training.evaluate(net, batches, stop)

  if args.eval_only:
    return training.eval_only(net, args.save, evaluate)
  sampler = data.Sampler(len(train_y), args.bsz, args.seed)
  lr = training.step_schedule(args.iters, ITERS, SCHEDULE)

  def batches(start, stop):
    return data.cifar_train_batches(train_x, train_y, sampler, start, stop)

  return training.run(net, training.options(args, lr), batches, evaluate)



if __name__ == '__main__':
  sys.exit(main())

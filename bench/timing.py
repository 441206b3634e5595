"""Training-step time of every method, interleaved in one process.

All methods train the same CIFAR ResNet on the same random batch.  After
warm-up, rounds run one step of each method in turn (the order rotating
from round to round), so that load from other processes affects all
methods alike.  TensorFlow's default threading and allocator, as a user
would have them.  Prints one JSON line with each method's step times.

    python -m bench.timing --rblocks 18 --batch 128 --steps 5
"""

import os
import time

import numpy as np
import tensorflow as tf

from bench import common
from blpa import memory, models


def build_steps(keys, rblocks, batch, size, seed=0):
  """One training-step callable per method key (see common.METHODS).

  Every method trains on the same random batch; the blpa graphs and the
  autodiff twins start from the same weights (one graph per qtype, built
  with the same seed), the Keras models from Keras's own initializers.
  """
  shape = [batch, size, size, 3]
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  y = rng.integers(0, 10, size=(batch, 1, 1, 1)).astype(np.int32)
  steps, nets = {}, {}
  for key, _, method, qtype in common.METHODS:
    if key not in keys:
      continue
    tf.random.set_seed(seed)
    if method in memory.KERAS_METHODS:
      steps[key] = memory.keras_step_function(method, rblocks, x, y)
      continue
    if qtype not in nets:
      nets[qtype] = models.build(models.cifar_resnet(rblocks), shape,
                                 qtype=qtype)
    steps[key] = memory.step_function(method, nets[qtype], x, y)
  return steps


def interleaved_times(steps, rounds, warmup):
  """Seconds per step of each callable, measured round-robin."""
  keys = list(steps)
  for key in keys:
    for _ in range(warmup):
      steps[key]()
  common.sync()
  times = {key: [] for key in keys}
  for r in range(rounds):
    for key in keys[r % len(keys):] + keys[:r % len(keys)]:
      start = time.perf_counter()
      steps[key]()
      common.sync()  # GPU: blpa's backward returns before it is done
      times[key].append(time.perf_counter() - start)
  return times


def main(argv=None):
  parser = common.network_parser(__doc__)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--methods', nargs='+',
                      default=[key for key, _, _, _ in common.METHODS])
  args = parser.parse_args(argv)
  steps = build_steps(args.methods, args.rblocks, args.batch, args.size)
  load_before = os.getloadavg()
  times = interleaved_times(steps, args.steps, args.warmup)
  common.print_json({
      'rblocks': args.rblocks, 'batch': args.batch, 'size': args.size,
      'warmup': args.warmup, 'step_times': times,
      'loadavg_before': load_before, 'loadavg_after': os.getloadavg(),
      'device': memory.device_name(),
      'onednn': os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default (on)'),
      'threads': {'intra_op': tf.config.threading
                              .get_intra_op_parallelism_threads(),
                  'inter_op': tf.config.threading
                              .get_inter_op_parallelism_threads()}})


if __name__ == '__main__':
  main()

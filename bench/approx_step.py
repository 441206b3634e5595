"""blpa.approx: a sampled training step against the exact one, side by side.

One command::

  python bench/approx_step.py                 # WRN-16-4, batch 32, ratio 0.5
  BLPA_PY_OPS=1 python bench/approx_step.py   # the same with tf.gather etc.

Builds the pre-activation WRN-16-4 of ``blpa.approx.experiments`` (Keras
layers), and its copy from ``blpa.approx.approximate`` at each ratio (topk,
forward mode, the first convolution and the last dense layer exact). Each
model gets the GradientTape + SGD-momentum step of
``bench.keras_compress.train_step`` on the same random batch; after warm-up
the steps run in rotating order, round after round
(``bench.timing.interleaved_times``), and the medians are compared. ``BLPA_PY_OPS=1`` selects the pure-TF
channel selection (``tf.gather`` and its autodiff scatter) instead of the
native ops of ``blpa.channels``, for the before/after comparison. Prints one
JSON line.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ''):  # run as a script
  sys.path.insert(0, ROOT)


def measure(ratios=(0.5,), depth=16, width=4, batch=32, rounds=25, warmup=3,
            seed=0):
  """Median step times of the exact WRN and its sampled copies.

  Args:
    ratios: sample ratios of the copies (each < 1).
    depth, width: the WRN.
    batch: images per step (32×32×3, random).
    rounds: timed rounds (one step of every model each).
    warmup: untimed steps per model first (tracing).
    seed: weights and data.

  Returns:
    dict: the median step time (ms) of the exact model and of each ratio,
    the speed-ups, the channel-selection backend and the oneDNN setting.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  from bench.keras_compress import train_step  # pylint: disable=import-outside-toplevel
  from bench.timing import interleaved_times  # pylint: disable=import-outside-toplevel
  from blpa import channels  # pylint: disable=import-outside-toplevel
  from blpa.approx import approximate, nets  # pylint: disable=import-outside-toplevel
  if any(not 0 < r < 1 for r in ratios):
    raise ValueError(f'ratios must lie in (0, 1), got {ratios}')
  keras.utils.set_random_seed(seed)
  base = nets.wide_resnet(depth, width)
  models = {1.0: base}
  models.update({r: approximate(base, r, skip='ends') for r in ratios})
  steps = {r: train_step(m, batch, 32, seed) for r, m in models.items()}
  times = interleaved_times(steps, rounds, warmup)
  median = {r: 1e3 * float(np.median(t)) for r, t in times.items()}
  return dict(
      network=f'WRN-{depth}-{width}', batch=batch, rounds=rounds,
      exact_ms=median[1.0],
      sampled_ms={str(r): median[r] for r in ratios},
      speedup={str(r): median[1.0] / median[r] for r in ratios},
      channel_ops=channels.backend(),
      onednn=os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default'),
      load_average=os.getloadavg()[0])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--ratios', type=float, nargs='+', default=[0.5])
  parser.add_argument('--depth', type=int, default=16)
  parser.add_argument('--width', type=int, default=4)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=25)
  args = parser.parse_args(argv)
  print(json.dumps(measure(tuple(args.ratios), args.depth, args.width,
                           args.batch, args.rounds)))
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""Why blpa's K-bit gradients deviate: bin width against clipping.

A diagnostic, not part of ``run.py``.  blpa's quantizer covers about ±3
normalized units with 2^K bins (docs/algorithm.md).  This script swaps in the same
quantizer with another range R (bins of width R/2^K, ``--ranges``), in pure
TF, and measures the gradient cosine against the exact one as
``bench/fidelity.py`` does (at initialization, weight decay 0).  R = 6 is
blpa's quantizer (bit for bit).  If widening the range helps, clipping of
large activations dominates the error; if it hurts, the bin width does.
Prints one JSON line.

    python -m bench.quantizer_range --rblocks 2 --batch 128 --ranges 6 8 12 24
"""

import numpy as np
import tensorflow as tf

from bench import common, fidelity
from blpa import models, quant


def _shift(offset, n, scale):
  return tf.cast(tf.clip_by_value(n // 2 - tf.floor(offset * scale), 1, n),
                 tf.int32)


def ranged_ops(full_range):
  """``(save_act, restore_act)`` of the quantizer with range ``full_range``.

  Same formulas as :mod:`blpa.quant` with ``6`` replaced by ``full_range``
  (NaN handling and subnormal offsets left out: not needed here).
  """

  def save_act(act, offset, nbits):
    n = 1 << nbits
    scale = np.float32(n / full_range)
    q = tf.cast(tf.floor((act - np.float32(1e-6)) * scale), tf.int32)
    q = tf.clip_by_value(q + _shift(offset, n, scale), 0, n - 1)
    if nbits == 4:
      q = tf.reshape(q, tf.concat([tf.shape(q)[:3], [-1, 2]], 0))
      q = q[..., 0] + 16 * q[..., 1]
    return tf.cast(q, tf.uint8)

  def restore_act(codes, offset, nbits):
    n = 1 << nbits
    q = tf.cast(codes, tf.int32)
    if nbits == 4:
      q = tf.reshape(tf.stack([q % 16, q // 16], -1),
                     tf.concat([tf.shape(q)[:3], [-1]], 0))
    shift = _shift(offset, n, np.float32(n / full_range))
    approx = (tf.cast(q - shift, tf.float32) + 0.5) * np.float32(
        full_range / n)
    return approx, q >= shift

  return save_act, restore_act


def gradient_cosines(rblocks, batch, size, data, full_range):
  """Per-layer cosine of blpa q8/q4 gradients vs exact with range R."""
  saved = quant.save_act, quant.restore_act
  quant.save_act, quant.restore_act = ranged_ops(full_range)
  try:
    x, y, _ = fidelity.load_data(size, 0, data)
    x, y = x[:batch], y[:batch]
    tf.random.set_seed(0)
    specs = models.cifar_resnet(rblocks)
    nets = {q: models.build(specs, [batch, size, size, 3], qtype=q,
                            weight_decay=0.0) for q in (0, 8, 4)}
    for q in (8, 4):
      fidelity.copy_weights(nets[q], nets[0])
    exact = nets[0].gradients(x, y)
    out = {}
    for q in (8, 4):
      grads = {'exact': exact, 'q': nets[q].gradients(x, y)}
      layers = fidelity.per_layer_metrics(grads, 'q', nets[0])
      cos = np.array(layers['layer_cosine'])
      out[f'q{q}'] = {'min_cosine': float(cos.min()),
                      'median_cosine': float(np.median(cos)),
                      'median_relative_error': float(np.median(
                          layers['layer_relative_error']))}
    return out
  finally:
    quant.save_act, quant.restore_act = saved


def main(argv=None):
  parser = common.network_parser(__doc__)
  parser.add_argument('--data', default='synthetic',
                      choices=['digits', 'patches', 'synthetic'])
  parser.add_argument('--ranges', type=float, nargs='+',
                      default=[6.0, 8.0, 12.0, 24.0])
  args = parser.parse_args(argv)
  common.print_json({
      'rblocks': args.rblocks, 'batch': args.batch, 'data': args.data,
      'ranges': {str(r): gradient_cosines(args.rblocks, args.batch,
                                          args.size, args.data, r)
                 for r in args.ranges}})


if __name__ == '__main__':
  main()

"""Gradient fidelity: blpa's K-bit gradients and naive K-bit backprop.

On one batch, every weight's gradient is computed

* exactly, by blpa at qtype 0 (and, as a check, by GradientTape),
* by blpa at qtype 8 and 4 (exact forward, K-bit copies for backward),
* by "naive" K-bit backprop (:mod:`blpa.autodiff` with ``naive_bits``:
  each BN+ReLU output is replaced by its K-bit approximation in the forward
  pass, straight-through gradient), the paper's baseline,
* by a second naive baseline, fixed-point activations in the forward pass
  (:func:`blpa.fixedpoint.round_fixed`, ADaPTION's arithmetic): at the same
  layers, the pre-ReLU value is rounded to a K-bit Q(bd.ad) word
  (deterministic or stochastic rounding), then ReLU, straight-through
  gradient; ``bd`` per layer by the conversion tool's rule (at most 1% of
  the exact network's pre-ReLU values on this batch above ``2^(bd-1)``),

and compared with the exact one (cosine similarity, relative error), at
initialization and after training the exact network for a while.  Weight
decay is 0 here, so that the (exact) decay term does not flatter the
comparison.  Data (``--data``): scikit-learn's 8x8 digits upsampled to the
network's size, natural-image crops from scikit-learn's two sample photos,
or synthetic class-dependent Gaussian noise (also the fallback without
scikit-learn).  Also reports, per stored layer, how far the restored K-bit
activation is from the exact one.  Prints one JSON line.

    python -m bench.fidelity --rblocks 18 --batch 128 --train-iters 300
"""

import time

import numpy as np
import tensorflow as tf

from bench import common
from blpa import autodiff, fixedpoint, models, quant
from blpa.fixedpoint import conversion

#: Fixed-point forward baselines: name -> (word bits, rounding).
FIXED_VARIANTS = {
    'fixed_q8_det': (8, 'deterministic'),
    'fixed_q8_sto': (8, 'stochastic'),
    'fixed_q4_det': (4, 'deterministic'),
    'fixed_q4_sto': (4, 'stochastic'),
}

#: Gradient variants compared with the exact one.
VARIANTS = ('blpa_q8', 'blpa_q4', 'naive_q8', 'naive_q4',
            *FIXED_VARIANTS, 'autodiff_exact')

#: Seed of the stochastic fixed-point rounding (plus the layer index).
FIXED_SEED = 1234


def _synthetic(size, seed):
  """Gaussian noise around 10 random class centres (learnable)."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 10, 2000).astype(np.int32)
  centres = rng.standard_normal((10, size, size, 3)).astype(np.float32)
  x = centres[y] + rng.standard_normal((2000, size, size, 3)).astype(
      np.float32)
  return x, y, 'synthetic (10 noisy class centres)'


def _patches(size, seed):
  """Natural-image crops: scikit-learn's two sample photos, cut in 10 strips.

  The label is the strip a crop comes from.
  """
  # pylint: disable-next=import-outside-toplevel
  from sklearn.datasets import load_sample_images
  rng = np.random.default_rng(seed)
  xs, ys = [], []
  for i, image in enumerate(load_sample_images().images):
    image = image.astype(np.float32)
    h, w, _ = image.shape
    strip = w // 5
    for s in range(5):
      for _ in range(400):
        r = rng.integers(0, h - size)
        c = s * strip + rng.integers(0, strip - size)
        xs.append(image[r:r + size, c:c + size])
        ys.append(5 * i + s)
  x = np.stack(xs)
  x = (x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2))
  order = rng.permutation(len(x))
  return (x[order], np.array(ys, np.int32)[order],
          f'natural {size}x{size} crops of the 2 scikit-learn sample photos, '
          'label = which of 10 strips')


def load_data(size, seed=0, kind='digits'):
  """Images ``[N, size, size, 3]`` (normalized) and int32 labels ``[N]``.

  Args:
    size: height and width.
    seed: shuffling seed.
    kind: ``'digits'`` (scikit-learn's 8x8 digits upsampled), ``'patches'``
      (natural-image crops) or ``'synthetic'``; without scikit-learn,
      synthetic.

  Returns:
    ``(x, y, name)``.
  """
  try:
    # pylint: disable-next=import-outside-toplevel
    from sklearn.datasets import load_digits
  except ImportError:
    kind = 'synthetic'
  if kind == 'synthetic':
    return _synthetic(size, seed)
  if kind == 'patches':
    return _patches(size, seed)
  digits = load_digits()
  images = digits.images.astype(np.float32)  # [N, 8, 8], values 0..16
  reps = -(-size // 8)
  images = np.kron(images, np.ones((1, reps, reps), np.float32))
  images = images[:, :size, :size]
  images = (images - images.mean()) / images.std()
  x = np.repeat(images[..., None], 3, axis=-1)
  order = np.random.default_rng(seed).permutation(len(x))
  return (x[order], digits.target.astype(np.int32)[order],
          f'scikit-learn digits (8x8 upsampled to {size}x{size}x3)')


def train(net, x, y, iters, batch, lr, seed=0):
  """Trains ``net`` with momentum SGD (linear warm-up over 10% of iters).

  Returns:
    Dict of the last 20 iterations' mean loss and accuracy, and seconds.
  """
  rng = np.random.default_rng(seed)
  warm = max(1, iters // 10)
  losses, accs = [], []
  start = time.time()
  for it in range(iters):
    idx = rng.integers(0, len(x), batch)
    acc, loss = net.forward(x[idx], y[idx])
    net.backward(lr * min(1.0, (it + 1) / warm))
    losses.append(loss)
    accs.append(acc)
  return {'iters': iters, 'batch': batch, 'lr': lr,
          'final_loss': float(np.mean(losses[-20:])),
          'final_train_acc': float(np.mean(accs[-20:])),
          'seconds': time.time() - start}


def all_gradients(nets, x, y):
  """Gradients of every variant and the exact ones, as numpy lists."""
  exact_net = nets[0]
  weights = exact_net.weights
  xt = tf.constant(x)
  yt = tf.constant(y)

  def tape(bits):
    fn = tf.function(lambda w: autodiff.gradients(
        exact_net.layers, w, xt, yt, 0.0, naive_bits=bits))
    return [g.numpy() for g in fn([w.read_value() for w in weights])]

  out = {'exact': exact_net.gradients(x, y)}
  out['activations'] = activation_errors(exact_net)
  for qtype in (8, 4):
    out[f'blpa_q{qtype}'] = nets[qtype].gradients(x, y)
    out[f'naive_q{qtype}'] = tape(qtype)
  out['autodiff_exact'] = tape(0)
  out.update(fixed_point_gradients(exact_net, weights, xt, yt))
  return out


def fixed_point_formats(net, weights, xt, bits_list):
  """``{bits: {layer index: (bd, ad)}}`` from the exact pre-ReLU values."""
  pre_values = {}

  def record(layer, params, pre, out):
    del params
    pre_values[layer.index] = pre.numpy()
    return out  # exact forward

  autodiff.logits(net.layers, [w.read_value() for w in weights], xt,
                  naive_fn=record)
  return {bits: {i: conversion.activation_format(v, bits)
                 for i, v in pre_values.items()} for bits in bits_list}


def fixed_point_gradients(net, weights, xt, yt):
  """Gradients of the fixed-point forward baselines (FIXED_VARIANTS).

  Returns:
    ``{variant: gradient list}``, plus ``'fixed_formats'``:
    ``{variant: {layer index: [bd, ad]}}``.
  """
  formats = fixed_point_formats(
      net, weights, xt, sorted({b for b, _ in FIXED_VARIANTS.values()}))
  out = {'fixed_formats': {}}
  for name, (bits, rounding) in FIXED_VARIANTS.items():
    layer_formats = formats[bits]

    def fixed(layer, params, pre, out_, fmt=layer_formats, rounding=rounding):
      del params, out_
      return tf.nn.relu(fixedpoint.round_fixed(
          pre, *fmt[layer.index], rounding, seed=FIXED_SEED + layer.index))

    fn = tf.function(lambda w, fixed=fixed: autodiff.gradients(
        net.layers, w, xt, yt, 0.0, naive_fn=fixed))
    out[name] = [g.numpy() for g in fn([w.read_value() for w in weights])]
    out['fixed_formats'][name] = {
        str(i): list(f) for i, f in layer_formats.items()}
  return out


def _layer_groups(net):
  """Layer of each weight (None: loss bias), and the weights of each layer."""
  layer_of = []
  for layer in net.layers:
    layer_of += [layer.index] * len(layer.param_shapes())
  layer_of.append(None)
  layers = sorted({l for l in layer_of if l is not None})
  members = [[i for i, l in enumerate(layer_of) if l == layer]
             for layer in layers]
  return layer_of, layers, members


def per_layer_metrics(grads, name, net):
  """Cosine and relative error of each layer's gradient (all its weights).

  Args:
    grads: dict of gradient lists, with ``'exact'`` and ``name``.
    name: the variant compared with ``'exact'``.
    net: the graph (for the layer of each weight).
  """
  members = _layer_groups(net)[2]

  def flat(grad_list):
    return [np.concatenate([np.ravel(grad_list[i]) for i in m])
            for m in members]

  pairs = list(zip(flat(grads[name]), flat(grads['exact'])))
  return {'layer_cosine': [common.cosine(g, e) for g, e in pairs],
          'layer_relative_error': [common.relative_error(g, e)
                                   for g, e in pairs]}


def compare(grads, net):
  """Per-weight and per-layer cosine and relative error vs exact."""
  exact = grads['exact']
  layer_of, layers, _ = _layer_groups(net)
  result = {'weight_names': net.weight_names, 'layer_of_weight': layer_of,
            'exact_norm': [float(np.linalg.norm(g)) for g in exact],
            'layers': layers, 'activations': grads['activations'],
            'fixed_formats': grads['fixed_formats']}
  for name in VARIANTS:
    result[name] = {
        'cosine': [common.cosine(g, e) for g, e in zip(grads[name], exact)],
        'relative_error': [common.relative_error(g, e)
                           for g, e in zip(grads[name], exact)],
        **per_layer_metrics(grads, name, net)}
  return result


def activation_errors(net):
  """How well K-bit copies restore the activations of the last forward.

  For each layer that keeps a K-bit copy at qtype 4/8 (BN+ReLU, no max
  pool, not the last), from the exact copy ``y`` kept by ``net`` (qtype 0):
  the share of values clipped (``a = y + c`` outside the quantizer's range
  ``[c - 3, c + 3)``, roughly) and the relative error of the restored
  post-ReLU activation ``relu(ã·cs)`` used by the backward pass.

  Returns:
    Dict of per-layer lists: ``layers``, ``clip_fraction``, ``q8_error``,
    ``q4_error``.
  """
  out = {'layers': [], 'clip_fraction': [], 'q8_error': [], 'q4_error': []}
  last = net.layers[-1].index
  for layer, params, saved in zip(net.layers, net.params, net.saved):
    if not (layer.nl.bn and layer.nl.relu and not layer.nl.maxpool and
            layer.index != last):
      continue
    cs = tf.maximum(params['scale'], 1e-8)
    offset = params['bias'] / cs if 'bias' in params else tf.zeros_like(cs)
    act = saved['act'] + offset  # a = y + c
    exact = tf.nn.relu(act * cs)
    out['layers'].append(layer.index)
    for bits in (8, 4):
      approx, _ = quant.restore_act(quant.save_act(act, offset, bits),
                                    offset, bits)
      out[f'q{bits}_error'].append(common.relative_error(
          tf.nn.relu(approx * cs).numpy(), exact.numpy()))
    y = saved['act']
    out['clip_fraction'].append(float(tf.reduce_mean(tf.cast(
        tf.abs(y) >= 3.0, tf.float32))))
  return out


def copy_weights(dst, src):
  for d, s in zip(dst.weights, src.weights):
    d.assign(s)


def main(argv=None):
  parser = common.network_parser(
      __doc__, batch_help='batch on which gradients are compared')
  parser.add_argument('--train-iters', type=int, default=300)
  parser.add_argument('--train-batch', type=int, default=32)
  parser.add_argument('--lr', type=float, default=0.05)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--data', default='digits',
                      choices=['digits', 'patches', 'synthetic'])
  args = parser.parse_args(argv)
  x, y, data_name = load_data(args.size, args.seed, args.data)
  held_x, held_y = x[:args.batch], y[:args.batch]
  train_x, train_y = x[args.batch:], y[args.batch:]
  specs = models.cifar_resnet(args.rblocks)
  shape = [args.batch, args.size, args.size, 3]
  tf.random.set_seed(args.seed)
  nets = {q: models.build(specs, shape, qtype=q, weight_decay=0.0)
          for q in (0, 8, 4)}
  for q in (8, 4):
    copy_weights(nets[q], nets[0])
  result = {'rblocks': args.rblocks, 'batch': args.batch,
            'size': args.size, 'data': data_name, 'states': {}}
  result['states']['init'] = compare(all_gradients(nets, held_x, held_y),
                                     nets[0])
  if not args.train_iters:
    common.print_json(result)
    return
  trainer = models.build(specs, [args.train_batch, args.size, args.size, 3],
                         qtype=0)
  copy_weights(trainer, nets[0])
  result['training'] = train(trainer, train_x, train_y, args.train_iters,
                             args.train_batch, args.lr, args.seed)
  for q in (0, 8, 4):
    copy_weights(nets[q], trainer)
  result['training']['held_out_acc'] = nets[0].forward(
      held_x, held_y, train=False)[0]
  result['states']['trained'] = compare(all_gradients(nets, held_x, held_y),
                                        nets[0])
  common.print_json(result)


if __name__ == '__main__':
  main()

"""The code range of LayerNormalization's codes: per feature or per token.

A diagnostic, not part of ``run.py``. ``blpa.keras.norm`` keeps K-bit codes
of a LayerNormalization's normalized values ``y``; their range is set per
feature (BLPA's fixed ±3, widened to each feature's max |y| at 8 bits:
``'feature'``) or per token (each token's own max |y|: ``'token'``). This
script compresses two small keras-hub models (random weights, dropout 0)
with each range and compares one step's gradients with plain Keras's:
the norm-weighted per-variable cosine, the whole gradient's relative
error, and the weakest and mean cosine of the normalization parameters.

One command (about two minutes on 2 cores)::

  python bench/norm_range.py     # writes bench/results/norm_range.md
"""

import datetime
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ''):  # run as a script: python bench/norm_range.py
  sys.path.insert(0, ROOT)

import keras  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from blpa.keras import compress, norm  # pylint: disable=wrong-import-position
from tests import keras_helpers as kh  # pylint: disable=wrong-import-position

RESULTS = os.path.join(ROOT, 'bench', 'results', 'norm_range.md')
BATCH = 16


def gradients(model, x, y):
  """One step's gradients (crossentropy on logits, tf.function)."""

  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      logits = model(x, training=True)
      loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
          y, logits, from_logits=True))
    return tape.gradient(loss, model.trainable_variables)

  return [tf.convert_to_tensor(g).numpy() for g in step(x, y)]


def vit():
  """A 2-layer keras-hub ViT (32x32 images, patch 4: 65 tokens, hidden
  64) with a Dense(10) on the class token, and a batch."""
  import keras_hub  # pylint: disable=import-outside-toplevel
  backbone = keras_hub.models.ViTBackbone(
      image_shape=(32, 32, 3), patch_size=4, num_layers=2, num_heads=4,
      hidden_dim=64, mlp_dim=256)
  head = keras.layers.Dense(10)(backbone.output[:, 0])
  return keras.Model(backbone.input, head), kh.batch([BATCH, 32, 32, 3],
                                                     seed=1)


def bert():
  """A 2-layer keras-hub BERT (sequence 64, hidden 64) with a Dense(10) on
  the pooled output, and a batch."""
  import keras_hub  # pylint: disable=import-outside-toplevel
  backbone = keras_hub.models.BertBackbone(
      vocabulary_size=500, num_layers=2, num_heads=4, hidden_dim=64,
      intermediate_dim=256, max_sequence_length=64, dropout=0.0)
  rng = np.random.default_rng(1)
  x = {'token_ids': tf.constant(rng.integers(1, 500, [BATCH, 64]), tf.int32),
       'segment_ids': tf.zeros([BATCH, 64], tf.int32),
       'padding_mask': tf.ones([BATCH, 64], tf.int32)}
  y = tf.constant(rng.integers(0, 10, [BATCH]), tf.int32)
  head = keras.layers.Dense(10)(backbone.output['pooled_output'])
  return keras.Model(backbone.input, head), (x, y)


def measure(name, make):
  """Rows ``(model, bits, range, cosine, rel error, LN min, LN mean)``."""
  keras.utils.set_random_seed(2)
  model, (x, y) = make()
  ref = gradients(model, x, y)
  norms = [i for i, v in enumerate(model.trainable_variables)
           if 'norm' in v.path or 'ln_' in v.path]
  rows = []
  saved = norm.DEFAULT_RANGE
  try:
    for bits in (4, 8):
      for code_range in norm.RANGES:
        norm.DEFAULT_RANGE = code_range
        got = gradients(compress(model, bits), x, y)
        ln = [kh.cosines([ref[i]], [got[i]])[0] for i in norms]
        rows.append((name, bits, code_range, kh.weighted_cosine(ref, got),
                     kh.global_rel_error(ref, got), min(ln), float(np.mean(ln))))
        print(rows[-1], flush=True)
  finally:
    norm.DEFAULT_RANGE = saved
  return rows


def main():
  rows = measure('vit', vit) + measure('bert', bert)
  lines = [
      '# Code range of the LayerNormalization codes: per feature or per '
      'token', '',
      f'Date {datetime.datetime.now():%Y-%m-%dT%H:%M}. Machine: '
      f'{platform.machine()}, {os.cpu_count()} CPUs. TensorFlow '
      f'{tf.__version__}, Keras {keras.__version__}.', '',
      'Command: `python bench/norm_range.py`', '',
      'Models (random weights, dropout 0, batch 16): keras-hub ViTBackbone '
      '(32x32x3, patch 4, 2 layers, 4 heads, hidden 64, MLP 256) + Dense(10) '
      'on the class token; BertBackbone (vocabulary 500, 2 layers, 4 heads, '
      'hidden 64, intermediate 256, sequence 64) + Dense(10) on the pooled '
      'output. One step\'s gradients of compress(model, bits) against plain '
      'Keras\'s; "LN": the normalization layers\' gamma and beta.', '',
      '| model | bits | range | norm-weighted cosine | relative error | '
      'LN weakest cosine | LN mean cosine |',
      '|---|---|---|---|---|---|---|']
  for name, bits, code_range, cos, err, low, mean in rows:
    lines.append(f'| {name} | {bits} | {code_range} | {cos:.5f} | {err:.4f} '
                 f'| {low:.4f} | {mean:.5f} |')
  with open(RESULTS, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()

"""A small Keras CNN trained on the bundled digits with compress(model, 4)
reaches the accuracy of the same model trained plainly."""

import numpy as np
import keras
from sklearn.datasets import load_digits

from blpa.keras import compress

L = keras.layers


def _digits():
  digits = load_digits()
  x = (digits.images[..., None] / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  x, y = x[order], y[order]
  return (x[:1437], y[:1437]), (x[1437:], y[1437:])


def _cnn():
  inp = keras.Input((8, 8, 1))
  x = L.Conv2D(32, 3, padding='same', use_bias=False)(inp)
  x = L.ReLU()(L.BatchNormalization(momentum=0.9)(x))
  x = L.Conv2D(32, 3, padding='same', use_bias=False)(x)
  x = L.ReLU()(L.BatchNormalization(momentum=0.9)(x))
  x = L.MaxPooling2D(2)(x)
  x = L.Conv2D(64, 3, padding='same', use_bias=False)(x)
  x = L.ReLU()(L.BatchNormalization(momentum=0.9)(x))
  x = L.GlobalAveragePooling2D()(x)
  return keras.Model(inp, L.Dense(10)(x))


def _train(bits):
  keras.utils.set_random_seed(0)
  model = _cnn()
  trained = model if bits is None else compress(model, bits)
  trained.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True), metrics=['accuracy'])
  (x, y), (xt, yt) = _digits()
  trained.fit(x, y, batch_size=64, epochs=8, shuffle=True, verbose=0)
  return trained.evaluate(xt, yt, verbose=0)[1]


def test_compressed_training_matches_plain_accuracy():
  plain = _train(None)
  blpa4 = _train(4)
  assert plain > 0.9
  print(f"digits test accuracy: plain {plain:.4f}, compress(4) {blpa4:.4f}")
  assert blpa4 >= plain - 0.005, (plain, blpa4)

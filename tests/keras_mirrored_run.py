"""compress() under MirroredStrategy on 2 logical CPU devices: one fit
epoch of the plain and of the bits=0 model from the same weights; prints
the largest weight difference (JSON)."""

import json

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from blpa import models  # noqa: E402
from blpa.keras import compress  # noqa: E402


def fit_once(strategy, bits, start, x, y):
  with strategy.scope():
    model = models.keras_cifar_resnet(1, input_shape=(8, 8, 3))
    for v, w in zip(model.weights, start):
      v.assign(w)
    trained = model if bits is None else compress(model, bits)
    trained.compile(optimizer=keras.optimizers.SGD(0.1),
                    loss=keras.losses.SparseCategoricalCrossentropy(
                        from_logits=True))
  loss = trained.fit(x, y, batch_size=8, epochs=1, shuffle=False,
                     verbose=0).history['loss'][0]
  return [v.numpy() for v in model.weights], loss


def main():
  strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
  rng = np.random.default_rng(0)
  x = rng.standard_normal([16, 8, 8, 3]).astype(np.float32)
  y = rng.integers(0, 10, size=[16]).astype(np.int32)
  start = [v.numpy() for v in
           models.keras_cifar_resnet(1, input_shape=(8, 8, 3)).weights]
  plain, loss0 = fit_once(strategy, None, start, x, y)
  blpa0, loss1 = fit_once(strategy, 0, start, x, y)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(plain, start))
  diff0 = max(float(np.max(np.abs(a - b))) for a, b in zip(plain, blpa0))
  print(json.dumps(dict(replicas=strategy.num_replicas_in_sync, moved=moved,
                        diff0=diff0, losses=[loss0, loss1])))


if __name__ == '__main__':
  main()

"""compress() under MirroredStrategy on 2 logical CPU devices: one fit
epoch of the plain model and of compress(model, bits) for bits 0, 4 and 8
from the same weights; for bits 4 and 8 also on one device, and the spread
between the replicas' copies of each variable. Prints the largest weight
differences (JSON)."""

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
  spread = 0.0  # trained variables: mirrored (BN statistics are per replica)
  for v in model.trainable_weights:
    copies = [c.numpy() for c in getattr(v.value, 'values', [v.value])]
    spread = max([spread] + [float(np.max(np.abs(c - copies[0])))
                             for c in copies])
  return [v.numpy() for v in model.weights], loss, spread


def main():
  strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
  rng = np.random.default_rng(0)
  x = rng.standard_normal([16, 8, 8, 3]).astype(np.float32)
  y = rng.integers(0, 10, size=[16]).astype(np.int32)
  start = [v.numpy() for v in
           models.keras_cifar_resnet(1, input_shape=(8, 8, 3)).weights]
  def diff(a, b):
    return max(float(np.max(np.abs(u - w))) for u, w in zip(a, b))

  plain, loss0, _ = fit_once(strategy, None, start, x, y)
  blpa0, loss1, _ = fit_once(strategy, 0, start, x, y)
  out = dict(replicas=strategy.num_replicas_in_sync, moved=diff(plain, start),
             diff0=diff(plain, blpa0), losses=[loss0, loss1])
  one = tf.distribute.get_strategy()
  out['one_device_plain'] = diff(plain, fit_once(one, None, start, x, y)[0])
  for bits in (4, 8):
    mirrored, _, spread = fit_once(strategy, bits, start, x, y)
    single, _, _ = fit_once(one, bits, start, x, y)
    out[f'spread{bits}'] = spread
    out[f'diff{bits}'] = diff(mirrored, plain)
    out[f'one_device{bits}'] = diff(mirrored, single)
  print(json.dumps(out))


if __name__ == '__main__':
  main()

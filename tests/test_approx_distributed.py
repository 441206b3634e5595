"""Compressed all-reduce (weight_topk) on 2 logical CPU devices.

The check runs in a subprocess (this file as a script) because the logical
devices must be configured before TensorFlow initializes its devices.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_net():
  """Conv-BN-ReLU ×3 (1×1 last), pooling, two Dense: every kind of kernel."""
  import keras  # pylint: disable=import-outside-toplevel
  x = inp = keras.Input((8, 8, 3))
  for filters, size in ((8, 3), (12, 3), (12, 1)):
    x = keras.layers.Conv2D(filters, size, padding="same")(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
  x = keras.layers.GlobalAveragePooling2D()(x)
  x = keras.layers.Dense(6, activation="relu")(x)
  return keras.Model(inp, keras.layers.Dense(3)(x))


def _fit_weights(strategy, compressed):
  """Trainable weights after a short fit, plain or with CompressedModel."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  from blpa.approx import approximate  # pylint: disable=import-outside-toplevel
  from blpa.approx.distributed import CompressedModel  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, 3, 16)
  keras.utils.set_random_seed(0)
  with strategy.scope():
    model = approximate(_small_net(), 1 / 3, sampler="weight_topk")
    if compressed:
      model = CompressedModel(model.inputs, model.outputs)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
  model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
  return [v.numpy() for v in model.trainable_variables]


def _run_check():
  """Compares the compressed and the full all-reduce; returns a dict."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  from blpa.approx import approximate  # pylint: disable=import-outside-toplevel
  from blpa.approx.convert import approximated_layers  # pylint: disable=import-outside-toplevel
  from blpa.approx.distributed import CompressedAllReduce, logical_cpu_strategy  # pylint: disable=import-outside-toplevel

  strategy = logical_cpu_strategy(2)
  keras.utils.set_random_seed(0)
  with strategy.scope():
    model = approximate(_small_net(), 1 / 3, sampler="weight_topk")
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(model.trainable_variables)
  full = CompressedAllReduce(model, compressed=False)
  compressed = CompressedAllReduce(model)

  def replica_step(x):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(tf.square(model(x, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    return full.all_reduce(grads), compressed.apply_gradients(optimizer,
                                                             grads)

  @tf.function
  def step(x):
    return strategy.run(replica_step, (x,))

  rng = np.random.default_rng(0)
  data = [tf.constant(rng.normal(size=(4, 8, 8, 3)), tf.float32)
          for _ in range(2)]
  dist = strategy.experimental_distribute_values_from_function(
      lambda ctx: data[ctx.replica_id_in_sync_group])
  equal, zero_outside = True, True
  kernels = {id(l.kernel): l for l in approximated_layers(model)}
  for _ in range(2):
    want, got = step(dist)
    for w, g, var in zip(want, got, model.trainable_variables):
      for a, b in zip(strategy.experimental_local_results(w),
                      strategy.experimental_local_results(g)):
        equal &= bool(np.array_equal(a.numpy(), b.numpy()))
      if id(var) in kernels:
        axis = kernels[id(var)].kernel_in_axis
        grad = np.moveaxis(w.values[0].numpy(), axis, 0)
        used = np.any(grad.reshape(grad.shape[0], -1) != 0, axis=1)
        zero_outside &= int(used.sum()) <= kernels[id(var)].num_kept()
  saved = sum(4 * np.prod(l.kernel.shape) *
              (1 - l.num_kept() / l.kernel.shape[l.kernel_in_axis])
              for l in kernels.values())
  stats = [v for l in model.layers
           if isinstance(l, keras.layers.BatchNormalization)
           for v in (l.moving_mean, l.moving_variance)]
  stats_synced = all(np.array_equal(v.value.values[0].numpy(),
                                    v.value.values[1].numpy()) for v in stats)
  weights_synced = all(np.array_equal(v.value.values[0].numpy(),
                                      v.value.values[1].numpy())
                       for v in model.trainable_variables)
  params = sum(np.prod(v.shape) for v in model.trainable_variables)
  stat_size = sum(np.prod(v.shape) for v in stats)
  fit_equal = all(np.array_equal(a, b) for a, b in zip(
      _fit_weights(strategy, False), _fit_weights(strategy, True)))
  return dict(equal=equal, zero_outside=bool(zero_outside),
              fit_equal=fit_equal,
              full_bytes=full.bytes_per_step(),
              compressed_bytes=compressed.bytes_per_step(),
              predicted_bytes=float(full.bytes_per_step() - saved),
              param_and_stat_bytes=int(4 * (params + stat_size)),
              approximated=len(kernels), stats_synced=stats_synced,
              weights_synced=weights_synced)


def test_compressed_all_reduce_equals_full():
  env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)],
                        capture_output=True, text=True, env=env, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["approximated"] > 0
  assert result["equal"], result
  assert result["zero_outside"], result
  assert result["full_bytes"] == result["param_and_stat_bytes"], result
  assert result["compressed_bytes"] == result["predicted_bytes"], result
  assert result["compressed_bytes"] < 0.7 * result["full_bytes"], result
  assert result["stats_synced"] and result["weights_synced"], result
  assert result["fit_equal"], result


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  print(json.dumps(_run_check()))

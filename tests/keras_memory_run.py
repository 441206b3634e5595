"""Peak bytes of one training step of the Keras CIFAR ResNet, plain or
compressed, in tf.function (TF's default executor, or its single-threaded
executor: ``single``) or eagerly; run in a fresh process with
TF_CPU_ALLOCATOR_USE_BFC=true. Prints one JSON line."""

import contextlib
import json
import sys

import tensorflow as tf

tf.config.threading.set_inter_op_parallelism_threads(1)

from blpa import memory, models  # noqa: E402
from blpa.keras import compress  # noqa: E402
from blpa.keras.report import rows  # noqa: E402
from bench.keras_compress import train_step  # noqa: E402


def main(bits, rblocks, batch, mode):
  model = models.keras_cifar_resnet(rblocks)
  kept = 0
  if bits >= 0:
    model = compress(model, bits)
    kept = sum(r['bytes'] for r in rows(model, batch))
  if mode == 'eager':
    tf.config.run_functions_eagerly(True)
  executor = (tf.experimental.function_executor_type('SINGLE_THREADED_EXECUTOR')
              if mode == 'single' else contextlib.nullcontext())
  with executor:
    step = train_step(model, batch, 32)
    peak = memory.peak_bytes(step, repeats=2)
  weights = sum(int(v.numpy().size) * 4 for v in model.trainable_variables)
  print(json.dumps(dict(peak=int(peak), kept=kept, weights=weights)))


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

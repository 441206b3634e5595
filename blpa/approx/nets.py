"""The experiments' networks: an MLP and a pre-activation wide ResNet."""

import keras

__all__ = ["mlp", "wide_resnet"]


def mlp(inputs=64, hidden=(500, 500), classes=10, seed=0):
  """The paper's MNIST MLP shape (784-500-500-10), here on `inputs` features.

  Args:
    inputs: number of input features.
    hidden: widths of the hidden ReLU layers.
    classes: number of classes (logits out).
    seed: initializer seed.

  Returns:
    A functional ``keras.Model``.
  """
  x = inp = keras.Input((inputs,))
  for i, width in enumerate(hidden):
    x = keras.layers.Dense(
        width, activation="relu",
        kernel_initializer=keras.initializers.HeNormal(seed + i))(x)
  out = keras.layers.Dense(
      classes, kernel_initializer=keras.initializers.GlorotUniform(seed))(x)
  return keras.Model(inp, out, name="mlp")


def _block(x, width, stride, seed):
  """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut."""
  init = lambda i: keras.initializers.HeNormal(seed + i)
  act = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.9)(x))
  if stride != 1 or x.shape[-1] != width:
    shortcut = keras.layers.Conv2D(width, 1, stride, use_bias=False,
                                   kernel_initializer=init(0))(act)
  else:
    shortcut = x
  y = keras.layers.Conv2D(width, 3, stride, padding="same", use_bias=False,
                          kernel_initializer=init(1))(act)
  y = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.9)(y))
  y = keras.layers.Conv2D(width, 3, 1, padding="same", use_bias=False,
                          kernel_initializer=init(2))(y)
  return keras.layers.Add()([shortcut, y])


def wide_resnet(depth=16, width=4, input_shape=(32, 32, 3), classes=10,
                seed=0):
  """WRN-depth-width (Zagoruyko & Komodakis), pre-activation, for 32×32.

  Args:
    depth: 6·n + 4 (16: two blocks per group).
    width: widening factor (widths 16·width, 32·width, 64·width).
    input_shape: image shape, channels last.
    classes: number of classes (logits out).
    seed: initializer seed.

  Returns:
    A functional ``keras.Model``.
  """
  if (depth - 4) % 6:
    raise ValueError(f"wide_resnet depth must be 6n+4, got {depth}")
  blocks = (depth - 4) // 6
  x = inp = keras.Input(input_shape)
  x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False,
                          kernel_initializer=keras.initializers.HeNormal(
                              seed))(x)
  for group, base in enumerate((16, 32, 64)):
    for b in range(blocks):
      stride = 2 if group > 0 and b == 0 else 1
      x = _block(x, base * width, stride, seed + 10 * (group * blocks + b + 1))
  x = keras.layers.ReLU()(keras.layers.BatchNormalization(momentum=0.9)(x))
  x = keras.layers.GlobalAveragePooling2D()(x)
  out = keras.layers.Dense(classes)(x)
  return keras.Model(inp, out, name=f"wrn_{depth}_{width}")

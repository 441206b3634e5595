"""Small hand-written Keras models for tests/test_keras_conformance.py.

Each builder makes its model under the current global dtype policy and
returns ``(model, make_batch)``; ``make_batch(seed)`` gives ``(x, y)`` with
``y`` the sparse labels (a dict for the multi-output model). Every model
ends in softmax heads (``Dense(activation='softmax')``) and contains
BatchNormalization, so that the training-mode pass updates state.
"""

import numpy as np
import tensorflow as tf
import keras

L = keras.layers
CLASSES = 3
BATCH = 4


def _images(seed, shape=(BATCH, 8, 8, 3)):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.standard_normal(shape), tf.float32)


def _labels(seed, classes=CLASSES):
  rng = np.random.default_rng(seed + 1000)
  return tf.constant(rng.integers(0, classes, size=[BATCH]), tf.int32)


def _image_batch(seed):
  return _images(seed), _labels(seed)


def sequential():
  """Conv, BN, ReLU, max pool, Dropout, Dense softmax."""
  model = keras.Sequential([
      keras.Input((8, 8, 3)),
      L.Conv2D(6, 3, padding='same'),
      L.BatchNormalization(),
      L.ReLU(),
      L.MaxPooling2D(2),
      L.Conv2D(8, 3, padding='same', use_bias=False),
      L.BatchNormalization(),
      L.Activation('relu'),
      L.Flatten(),
      L.Dropout(0.25),
      L.Dense(CLASSES, activation='softmax'),
  ], name='seq')
  return model, _image_batch


def nested():
  """A functional model used as a layer inside another functional model."""
  inner_in = keras.Input((8, 8, 6))
  t = L.Conv2D(6, 3, padding='same')(inner_in)
  t = L.BatchNormalization()(t)
  t = L.ReLU()(t)
  t = L.DepthwiseConv2D(3, padding='same')(t)
  inner = keras.Model(inner_in, t, name='inner')
  inp = keras.Input((8, 8, 3))
  x = L.Conv2D(6, 3, padding='same')(inp)
  x = L.Add()([x, inner(x)])
  x = L.BatchNormalization()(x)
  x = L.ReLU()(x)
  x = L.GlobalAveragePooling2D()(x)
  out = L.Dense(CLASSES, activation='softmax')(x)
  return keras.Model(inp, out, name='nested'), _image_batch


def multi_io():
  """Dict inputs (an image and a feature vector), two softmax outputs (a
  dict), the second head computed in float32."""
  image = keras.Input((8, 8, 3), name='image')
  meta = keras.Input((5,), name='meta')
  x = L.Conv2D(6, 3, padding='same')(image)
  x = L.BatchNormalization()(x)
  x = L.ReLU()(x)
  x = L.GlobalAveragePooling2D()(x)
  m = L.Dense(6, activation='relu')(meta)
  h = L.Concatenate()([x, m])
  cls = L.Dense(CLASSES, activation='softmax', name='cls')(h)
  aux = L.Dense(2, activation='softmax', dtype='float32', name='aux')(m)
  model = keras.Model({'image': image, 'meta': meta},
                      {'cls': cls, 'aux': aux}, name='multi_io')

  def make_batch(seed):
    rng = np.random.default_rng(seed + 7)
    x = {'image': _images(seed),
         'meta': tf.constant(rng.standard_normal([BATCH, 5]), tf.float32)}
    y = {'cls': _labels(seed), 'aux': _labels(seed + 1, classes=2)}
    return x, y

  return model, make_batch


@keras.saving.register_keras_serializable(package='blpa_conformance')
class SubclassedNet(keras.Model):
  """Sublayers in ``__init__``; ``x + h`` and ``keras.ops.relu`` in call."""

  def __init__(self, width=6, classes=CLASSES, **kwargs):
    super().__init__(**kwargs)
    self.width, self.classes = width, classes
    self.stem = L.Conv2D(width, 3, padding='same')
    self.bn0 = L.BatchNormalization()
    self.conv1 = L.Conv2D(width, 3, padding='same', use_bias=False)
    self.bn1 = L.BatchNormalization()
    self.conv2 = L.Conv2D(width, 3, padding='same')
    self.pool = L.GlobalAveragePooling2D()
    self.hidden = L.Dense(8)
    self.head = L.Dense(classes, activation='softmax')

  def call(self, x, training=None):
    x = keras.ops.relu(self.bn0(self.stem(x), training=training))
    h = keras.ops.relu(self.bn1(self.conv1(x), training=training))
    h = self.conv2(h)
    x = keras.ops.relu(x + h)
    x = self.pool(x)
    return self.head(keras.ops.relu(self.hidden(x)))

  def get_config(self):
    config = super().get_config()
    config.update(width=self.width, classes=self.classes)
    return config


def subclassed():
  model = SubclassedNet(name='subclassed')
  model(_images(0), training=False)  # builds it
  return model, _image_batch


@keras.saving.register_keras_serializable(package='blpa_conformance')
class ResidualBlock(keras.layers.Layer):
  """A custom layer with sublayers: conv-BN-ReLU-conv-BN plus identity."""

  def __init__(self, filters, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.conv1 = L.Conv2D(filters, 3, padding='same', use_bias=False)
    self.bn1 = L.BatchNormalization()
    self.conv2 = L.Conv2D(filters, 3, padding='same', use_bias=False)
    self.bn2 = L.BatchNormalization()

  def build(self, input_shape):
    self.conv1.build(input_shape)
    shape = self.conv1.compute_output_shape(input_shape)
    self.bn1.build(shape)
    self.conv2.build(shape)
    self.bn2.build(shape)
    self.built = True

  def call(self, x, training=None):
    h = keras.ops.relu(self.bn1(self.conv1(x), training=training))
    h = self.bn2(self.conv2(h), training=training)
    return keras.ops.relu(x + h)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters)
    return config


def custom_layer():
  """A functional model containing :class:`ResidualBlock`."""
  inp = keras.Input((8, 8, 3))
  x = L.Conv2D(6, 3, padding='same')(inp)
  x = ResidualBlock(6, name='block')(x)
  x = L.GlobalAveragePooling2D()(x)
  out = L.Dense(CLASSES, activation='softmax')(x)
  return keras.Model(inp, out, name='custom_layer'), _image_batch


def softmax_layer_head():
  """A head whose softmax is its own ``Activation`` layer after Dropout
  (as in keras.applications MobileNet / MobileNetV3), and an identity
  ``Activation('linear')`` (as in ConvNeXt)."""
  inp = keras.Input((8, 8, 3))
  x = L.Conv2D(6, 3, padding='same')(inp)
  x = L.BatchNormalization()(x)
  x = L.ReLU()(x)
  x = L.GlobalAveragePooling2D()(x)
  x = L.Activation('linear')(x)
  x = L.Dropout(0.1)(x)
  x = L.Dense(CLASSES)(x)
  out = L.Activation('softmax')(x)
  return keras.Model(inp, out, name='softmax_layer_head'), _image_batch


BUILDERS = {
    'sequential': sequential,
    'nested': nested,
    'multi_io': multi_io,
    'subclassed': subclassed,
    'custom_layer': custom_layer,
    'softmax_layer_head': softmax_layer_head,
}

"""Residual network definitions as lists of layer specs.

A layer spec is the tuple of arguments to :meth:`blpa.graph.Graph.add`:
``(ksz, out_ch, stride, pad, NLDef(...))``.  The networks here are the
pre-activation bottleneck ResNets of the paper: CIFAR ResNet-(9n+2) and
ImageNet ResNet-152.  ``build`` turns a spec list into a closed graph.
"""

from blpa.layers import NLDef

#: Plain convolution on the data: no BN, no ReLU, no residual.
STEM = NLDef(False, False, False, None, False)


def _bottleneck(width, stride, first):
  """Specs of one bottleneck block (1x1 → 3x3 → 1x1, expansion 4).

  Args:
    width: channels of the 1x1/3x3 convolutions; the block outputs 4·width.
    stride: stride of the first 1x1 convolution (2 at a downsampling block).
    first: ``'stem'`` for the network's first block (the residual is the
      post-ReLU input, ``res_out=2``), ``'maxpool'`` for the same after a max
      pool (ImageNet), or ``None`` for a block that joins the pending
      residual (``res_in``) and starts a new one from the sum (``res_out=1``).

  Returns:
    A list of three layer specs.
  """
  if first is None:
    head = NLDef(True, True, True, 1, False)
  else:
    head = NLDef(True, True, False, 2, False, maxpool=(first == 'maxpool'))
  body = NLDef(True, True, False, None, False)
  return [(1, width, stride, 'SAME', head),
          (3, width, 1, 'SAME', body),
          (1, 4 * width, 1, 'SAME', body)]


def _classifier(num_classes):
  """Final layer: join, BN+ReLU, global average pool, 1x1 VALID conv."""
  return [(1, num_classes, 1, 'VALID', NLDef(True, True, True, None, True))]


def cifar_resnet(rblocks=18, num_classes=10):
  """CIFAR pre-activation bottleneck ResNet with 9·rblocks+2 layers.

  Three stages of ``rblocks`` bottleneck blocks with widths 16, 32, 64
  (outputs 64, 128, 256); stages 2 and 3 downsample by 2. ``rblocks=18``
  gives ResNet-164, the paper's CIFAR network; ``rblocks=1`` gives the
  11-layer network of the golden reference runs.

  Args:
    rblocks: bottleneck blocks per stage (≥ 1).
    num_classes: output classes.

  Returns:
    A list of layer specs.
  """
  if rblocks < 1:
    raise ValueError(f'cifar_resnet: rblocks must be >= 1, got {rblocks}')
  specs = [(3, 16, 1, 'SAME', STEM)]
  for stage, width in enumerate((16, 32, 64)):
    for block in range(rblocks):
      stride = 2 if (stage > 0 and block == 0) else 1
      first = 'stem' if (stage == 0 and block == 0) else None
      specs += _bottleneck(width, stride, first)
  return specs + _classifier(num_classes)


def imagenet_resnet(blocks=(3, 8, 36, 3), num_classes=1000):
  """ImageNet pre-activation bottleneck ResNet (ResNet-152 by default).

  7x7/2 stem convolution, then BN+ReLU and a 3x3/2 max pool at the start of
  the first block, then four stages of bottleneck blocks with widths
  64, 128, 256, 512 (outputs ×4), stages 2–4 downsampling by 2.

  Args:
    blocks: bottleneck blocks per stage; (3, 8, 36, 3) is ResNet-152,
      (3, 4, 6, 3) ResNet-50.
    num_classes: output classes.

  Returns:
    A list of layer specs (3·sum(blocks)+2 layers).
  """
  if len(blocks) != 4 or min(blocks) < 1:
    raise ValueError(f'imagenet_resnet: blocks must be 4 positive counts, '
                     f'got {blocks}')
  specs = [(7, 64, 2, 'SAME', STEM)]
  for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks)):
    for block in range(count):
      stride = 2 if (stage > 0 and block == 0) else 1
      first = 'maxpool' if (stage == 0 and block == 0) else None
      specs += _bottleneck(width, stride, first)
  return specs + _classifier(num_classes)


def build(specs, input_shape, qtype=0, weight_decay=1e-4, multi=False):
  """Builds and closes a :class:`blpa.graph.Graph` from layer specs.

  Args:
    specs: list of ``(ksz, out_ch, stride, pad, NLDef)``.
    input_shape: ``[batch, height, width, channels]`` of the data.
    qtype: 0 (exact copies), 8 or 4 (bits per stored activation).
    weight_decay: weight decay on convolution kernels.
    multi: number of sub-batches per update (``False`` for one).

  Returns:
    The closed graph; its number of classes is the last layer's ``out_ch``.
  """
  from blpa import graph  # pylint: disable=import-outside-toplevel
  model = graph.Graph(graph.SimpleData(input_shape), graph.LogLoss())
  for spec in specs:
    model.add(*spec)
  model.close(qtype, weight_decay, multi)
  return model


def keras_cifar_resnet(rblocks=18, num_classes=10, input_shape=(32, 32, 3),
                       weight_decay=1e-4, shortcut='pool_pad'):
  """The CIFAR ResNet of :func:`cifar_resnet`, written with ``tf.keras`` layers.

  This is the model a Keras user would write for the same network, and the
  baseline blpa is compared with: ``Conv2D`` (no bias), fused
  ``BatchNormalization`` (epsilon 1e-3, like blpa), ``ReLU``, ``Add``,
  ``GlobalAveragePooling2D`` and a ``Dense`` classifier (blpa's last 1x1
  conv plus the loss layer's bias). Pre-activation bottleneck blocks, widths
  16, 32, 64, expansion 4; He-normal kernels; weight decay as an L2 kernel
  regularizer of ``weight_decay / 2`` on every conv and the classifier, so
  its gradient is ``weight_decay · kernel`` as in blpa.

  Args:
    rblocks: bottleneck blocks per stage (18: ResNet-164).
    num_classes: output classes (the model outputs logits).
    input_shape: ``(H, W, C)`` of one image.
    weight_decay: L2 weight decay on kernels (0 for none).
    shortcut: ``'pool_pad'`` — the reference's parameter-free shortcut
      (average-pool by the stride, zero-pad the channels), the same network
      as blpa's; ``'projection'`` — a strided 1x1 conv on the pre-activated
      input where the shape changes, as Keras users usually write it.

  Returns:
    An unbuilt-compile ``tf.keras.Model`` mapping images to logits.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if rblocks < 1:
    raise ValueError(f'keras_cifar_resnet: rblocks must be >= 1, got {rblocks}')
  if shortcut not in ('pool_pad', 'projection'):
    raise ValueError("keras_cifar_resnet: shortcut must be 'pool_pad' or "
                     f"'projection', got {shortcut!r}")
  layers = tf.keras.layers
  reg = tf.keras.regularizers.L2(weight_decay / 2) if weight_decay else None
  init = tf.keras.initializers.VarianceScaling(2.0, 'fan_in',
                                               'untruncated_normal')

  def conv(x, filters, ksz, stride=1):
    return layers.Conv2D(filters, ksz, stride, padding='same', use_bias=False,
                         kernel_initializer=init, kernel_regularizer=reg)(x)

  def bn_relu(x):
    x = layers.BatchNormalization(epsilon=1e-3)(x)
    return layers.ReLU()(x)

  def pool_pad(res, out_ch, stride):
    if stride > 1:
      res = layers.AveragePooling2D(stride, stride)(res)
    extra = out_ch - res.shape[-1]
    if extra:
      res = layers.Lambda(lambda t, e=extra: tf.pad(
          t, [[0, 0], [0, 0], [0, 0], [e // 2, e - e // 2]]))(res)
    return res

  inputs = tf.keras.Input(shape=input_shape)
  x = conv(inputs, 16, 3)
  for stage, width in enumerate((16, 32, 64)):
    for block in range(rblocks):
      stride = 2 if (stage > 0 and block == 0) else 1
      pre = bn_relu(x)
      if stage == 0 and block == 0:
        res = pre  # the reference keeps the post-ReLU input here (res_out=2)
      else:
        res = x
      h = conv(pre, width, 1, stride)
      h = conv(bn_relu(h), width, 3)
      h = conv(bn_relu(h), 4 * width, 1)
      if res.shape[-1] != 4 * width or stride > 1:
        if shortcut == 'projection':
          res = conv(pre, 4 * width, 1, stride)
        else:
          res = pool_pad(res, 4 * width, stride)
      x = layers.Add()([h, res])
  x = layers.GlobalAveragePooling2D()(bn_relu(x))
  outputs = layers.Dense(num_classes, kernel_initializer=tf.keras.initializers
                         .VarianceScaling(1.0, 'fan_in', 'untruncated_normal'),
                         kernel_regularizer=reg)(x)
  return tf.keras.Model(inputs, outputs,
                        name=f'keras_cifar_resnet{9 * rblocks + 2}')

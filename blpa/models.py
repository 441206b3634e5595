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

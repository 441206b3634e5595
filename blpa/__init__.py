"""blpa: backprop with approximate activations, for TensorFlow 2.

Memory-efficient training of deep residual networks (Chakrabarti & Moseley,
NeurIPS 2019): the forward pass is exact, and each layer keeps only a 4- or
8-bit copy of its activation for the backward pass.

Public names::

    from blpa import Graph, NLDef, SimpleData, LogLoss   # one device
    from blpa import mgraph                              # several devices
    from blpa import models                              # ResNet layer specs
    from blpa.quant import save_act, restore_act         # the quantizer
    from blpa.keras import compress, report              # any Keras model
    from blpa import approx                              # sampled layers
    from blpa import fixedpoint                          # fixed-point layers
"""

from blpa._version import __version__
from blpa.graph import Graph
from blpa.layers import LogLoss, NLDef, SimpleData

__all__ = ['Graph', 'NLDef', 'SimpleData', 'LogLoss']

"""Fixed-point low-precision layers and the float → fixed-point conversion.

A TensorFlow 2 / Keras 3 version of ADaPTION (Milde et al. 2017): weights
and activations in the fixed-point format Q(bd.ad) (``bd`` bits before the
binary point including the sign, ``ad`` after), float master weights with a
rounded copy at every call, straight-through gradients, and a tool that
chooses formats for a trained float network and builds its fixed-point twin.
The arithmetic is in :mod:`blpa.fixedpoint.rounding`.

    q = round_fixed(x, 8, 8)                          # Q8.8, halves away from 0
    formats = propose_formats(model, x_batch, bits=16)
    fixed = convert(model, formats)                   # fine-tune with fit()
"""

from blpa.fixedpoint.conversion import activation_sparsity, convert, propose_formats
from blpa.fixedpoint.layers import (FixedPointActivation, FixedPointConv2D,
                                    FixedPointDense)
from blpa.fixedpoint.rounding import check_format, max_value, round_fixed

__all__ = [
    "round_fixed", "check_format", "max_value", "FixedPointConv2D",
    "FixedPointDense", "FixedPointActivation", "propose_formats", "convert",
    "activation_sparsity",
]

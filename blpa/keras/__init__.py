"""Train Keras models with compressed activations (BLPA for ``tf.keras``).

``compress(model, bits=4)`` returns a model with the same forward pass and
the same variables that keeps, for the backward pass, only compact copies
of activations; ``report(compressed, batch_size)`` says what each layer
keeps.
"""

from blpa.keras.model import compress
from blpa.keras.report import report

__all__ = ['compress', 'report']

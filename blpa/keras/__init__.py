"""Train Keras models with compressed activations (BLPA for ``tf.keras``).

``compress(model, bits=4)`` returns a model with the same forward pass and
the same variables that keeps, for the backward pass, only compact copies
of activations; ``report(compressed, batch_size)`` says what each layer
keeps; ``kept_bytes(model, batch_size)`` reads from the graph of one
training step what its backward pass keeps, for any Keras model.
"""

from blpa.keras.kept import kept_bytes
from blpa.keras.model import compress
from blpa.keras.report import report

__all__ = ['compress', 'kept_bytes', 'report']

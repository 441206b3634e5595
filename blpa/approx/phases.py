"""An exact final phase: the last steps of a sampled training run exactly.

A network trained with ``topk`` forward sampling fits its *sampled* forward
pass, but is evaluated exactly: channels that were rarely or never selected
keep near-initial weights and add to the exact sums, and the BN moving
statistics describe the sampled activations. Training the last part of the
schedule with exact products lets the weights and the BN statistics adapt
to the exact forward pass (``bench/results/approx.md`` measures the effect;
``docs/approx.md`` says why). It costs the saving of those steps.

- :func:`exact_steps`: how many of the steps are exact, for a fraction.
- :class:`ExactFinalEpochs`: the same for ``Model.fit``, as a callback.
- Custom loops: run the final steps inside
  :func:`blpa.approx.calibrate.exact_layers` with a ``tf.function`` first
  traced there (a function traced while sampling keeps sampling).
"""

import contextlib

import keras

from blpa.approx import calibrate

__all__ = ["exact_steps", "ExactFinalEpochs"]


def exact_steps(total_steps, exact_fraction):
  """Number of final steps that train exactly.

  Args:
    total_steps: steps of the whole schedule (int >= 0).
    exact_fraction: share of the schedule trained exactly, in [0, 1].

  Returns:
    ``round(total_steps * exact_fraction)``.
  """
  if isinstance(total_steps, bool) or not isinstance(total_steps, int) or \
      total_steps < 0:
    raise ValueError(f"total_steps must be an int >= 0, got {total_steps!r}")
  if isinstance(exact_fraction, bool) or not isinstance(
      exact_fraction, (int, float)) or not 0 <= exact_fraction <= 1:
    raise ValueError(f"exact_fraction must be a number in [0, 1], got "
                     f"{exact_fraction!r}")
  return int(round(total_steps * float(exact_fraction)))


class ExactFinalEpochs(keras.callbacks.Callback):
  """Trains the last ``epochs`` epochs of ``fit`` with exact products.

  At the first of those epochs the model's sampled layers switch to exact
  computation and the train function is traced again; at the end of
  ``fit`` they return to sampling.

  Args:
    epochs: number of final epochs trained exactly (int >= 0).
  """

  def __init__(self, epochs):
    super().__init__()
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
      raise ValueError(f"ExactFinalEpochs: epochs must be an int >= 0, got "
                       f"{epochs!r}")
    self.epochs = epochs
    self._exact = None

  def on_epoch_begin(self, epoch, logs=None):
    start = self.params["epochs"] - self.epochs
    if epoch >= start and self._exact is None:
      self._exact = contextlib.ExitStack()
      self._exact.enter_context(calibrate.exact_layers(self.model))
      self.model.make_train_function(force=True)

  def on_train_end(self, logs=None):
    if self._exact is not None:
      self._exact.close()
      self._exact = None
      self.model.make_train_function(force=True)

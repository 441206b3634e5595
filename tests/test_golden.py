"""blpa reproduces reference runs of the original implementation.

``tests/data/golden`` holds runs of the TF1 reference (every layer trained,
deterministic reads): starting weights, three batches with their learning
rates, the (accuracy, loss) of each forward, and the weights after the first
and the last step, for qtype 0, 8 and 4.
"""

import numpy as np
import pytest

from tests import helpers

# Largest allowed weight error, as a fraction of how far that weight moved
# during the run.  Step 1 and qtype 0 agree to float32 rounding. With codes,
# a value on a bin edge may fall in the neighbouring bin when TensorFlow's
# convolutions round differently, which moves the weights by a few
# thousandths of their movement: at qtype 4 in the third step; at qtype 8 on
# an AMD EPYC (AVX2, no AVX-512) with oneDNN off as in these tests, up to
# 6.5e-3 (the same code with oneDNN on: 5.5e-4; forward losses equal to 2e-7
# either way).
TOLERANCE = {'step1': 1e-3, 'q0': 1e-3, 'q8': 1e-2, 'q4': 2e-2}


def _load(name):
  return np.load(f'{helpers.GOLDEN}/{name}.npz')


def _check_weights(net, ref, init, tolerance, what):
  for i, (name, w) in enumerate(zip(net.weight_names, net.weights)):
    moved = np.abs(ref[str(i)] - init[str(i)]).max()
    err = np.abs(w.numpy() - ref[str(i)]).max()
    assert err <= tolerance * moved + 1e-7, (
        f'{what}: weight {i} ({name}) differs by {err:.3g}, '
        f'{err / moved:.3g} of its movement {moved:.3g}')


@pytest.mark.parametrize('qtype', [0, 8, 4])
def test_golden_run(qtype):
  config = helpers.golden_config()
  batches = _load('batches')
  init = _load('init')
  net = helpers.build(helpers.golden_specs(), config['input_shape'], qtype,
                      config['weight_decay'])
  assert net.load(f'{helpers.GOLDEN}/init.npz') == int(init['niter'])
  for step, lr in enumerate(config['lrs']):
    acc, loss = net.forward(batches['x'][step], batches['y'][step])
    want_acc, want_loss = config['runs'][f'q{qtype}'][step]
    assert acc == want_acc
    np.testing.assert_allclose(loss, want_loss, rtol=2e-7,
                               err_msg=f'loss at step {step}')
    net.backward(lr)
    if step == 0:
      _check_weights(net, _load(f'step1_q{qtype}'), init,
                     TOLERANCE['step1'], 'after step 1')
  _check_weights(net, _load(f'final_q{qtype}'), init, TOLERANCE[f'q{qtype}'],
                 'after the last step')


def test_golden_checkpoint_round_trip(tmp_path):
  """Files move both ways: load the reference's file, save, compare keys."""
  config = helpers.golden_config()
  net = helpers.build(helpers.golden_specs(), config['input_shape'])
  niter = net.load(f'{helpers.GOLDEN}/init.npz')
  net.save(str(tmp_path / 'copy.npz'), niter)
  ref, copy = _load('init'), np.load(tmp_path / 'copy.npz')
  assert sorted(ref.files) == sorted(copy.files)
  for key in ref.files:
    np.testing.assert_array_equal(ref[key], copy[key])
    assert ref[key].dtype == copy[key].dtype

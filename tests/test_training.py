"""The shared training loop (blpa.training), with a stand-in network and
with a real graph."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf

from blpa import checkpoint, training
from tests import helpers


class FakeNet:
  """Stands in for a graph: one weight; the loss is NaN at one iteration."""

  input_shape = [1, 1, 1, 1]

  def __init__(self, nan_at):
    self.weight, self.nan_at, self.calls = 0.0, nan_at, []

  def forward(self, x, y, train=True, bn='batch'):
    del y, bn
    self.calls.append(('forward', int(x[0]), train))
    return 0.5, math.nan if train and x[0] == self.nan_at else 1.0

  def backward(self, lr):
    self.weight += lr

  def save(self, path, niter, state=False):
    del state
    checkpoint.write_atomic(path, {'0': np.array([self.weight]),
                                   'niter': np.int64(niter)})

  def load(self, path):
    arrays = checkpoint.read(path)
    self.weight = float(arrays['0'][0])
    return int(arrays['niter'])


def _run(tmp_path, net, iters=8, **kw):
  opts = training.Options(save=str(tmp_path / 'm.npz'), iters=iters,
                          lr=lambda it: 1.0, ckpt_every=2, progress=False,
                          **kw)
  batches = lambda a, b: ((np.array([i]), np.array([0])) for i in range(a, b))
  return training.run(net, opts, batches,
                      lambda net, stop: {'val_loss': 1.0, 'val_acc': 1.0,
                                         'val_loss_running': 1.0,
                                         'val_acc_running': 1.0, 'images': 1})


@pytest.mark.parametrize('nan_at,kept', [(5, 4), (4, 2)])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys,
                                                       nan_at, kept):
  status = _run(tmp_path, FakeNet(nan_at))
  assert status == training.EXIT_NAN
  err = capsys.readouterr().err
  assert f'loss is nan at iteration {nan_at} (lr 1)' in err
  assert f'(iteration {kept}) was kept' in err
  assert int(checkpoint.read(str(tmp_path / 'm.npz'))['niter']) == kept
  assert not list(tmp_path.glob('*.pending*'))


def test_finished_run_saves_validates_and_resumes(tmp_path):
  net = FakeNet(nan_at=-1)
  assert _run(tmp_path, net, iters=6, stop_at=3, val_every=2) == 0
  assert int(checkpoint.read(str(tmp_path / 'm.npz'))['niter']) == 3
  again = FakeNet(nan_at=-1)
  assert _run(tmp_path, again, iters=6, val_every=2) == 0
  assert again.weight == 6.0
  assert [c[1] for c in again.calls if c[2]] == [3, 4, 5]
  records = [json.loads(l) for l in open(tmp_path / 'm.jsonl')]
  assert [r['iter'] for r in records if 'val_acc' in r] == [2, 4, 6]
  assert _run(tmp_path, FakeNet(nan_at=-1), iters=6) == 0  # nothing to do


def test_real_graph_skipped_update_is_counted_and_reported(tmp_path, capsys):
  """A real graph through run(): at iteration 1 the loss is finite but its
  gradient is not (an inf put into the loss gradient after the forward
  pass), so the graph skips that update; the loop goes on, logs the skip,
  counts it in the JSONL record and the summary, and ends with the weights
  of the same training without iteration 1's update."""
  shape = [4, 16, 16, 3]
  rng = np.random.default_rng(0)
  data = [(rng.standard_normal(shape).astype(np.float32),
           rng.integers(0, 5, shape[0])) for _ in range(4)]
  tf.random.set_seed(3)
  net = helpers.build(helpers.every_kind_specs(), shape, qtype=4)
  tf.random.set_seed(3)
  want = helpers.build(helpers.every_kind_specs(), shape, qtype=4)
  forward = net.forward

  def forward_with_inf_gradient(x, y, **kwargs):
    out = forward(x, y, **kwargs)
    if kwargs.get('train', True) and x is data[1][0]:
      net.loss_grad.assign(tf.tensor_scatter_nd_update(
          net.loss_grad.read_value(), [[0, 0, 0, 1]], [np.inf]))
    return out

  net.forward = forward_with_inf_gradient
  opts = training.Options(save=str(tmp_path / 'm.npz'), iters=4,
                          lr=lambda it: 0.05, val_every=0, ckpt_every=0,
                          log_every=2, progress=False)
  with pytest.warns(RuntimeWarning, match='gradient is not finite'):
    status = training.run(net, opts, lambda a, b: iter(data[a:b]),
                          lambda net, stop: None)
  assert status == 0
  out = capsys.readouterr().out
  assert '[000000001] warning: update skipped' in out, out
  assert 'warning: 1 of 4 updates of this run were skipped' in out, out
  records = [json.loads(l) for l in open(tmp_path / 'm.jsonl')]
  assert [r.get('skipped', 0) for r in records] == [1, 0], records
  for i in (0, 2, 3):
    want.forward(*data[i])
    assert want.backward(0.05)
  names = want.weight_names + [f'momentum of {n}' for n in want.weight_names]
  for name, got, w in zip(names, net.weights + net.momentum,
                          want.weights + want.momentum):
    np.testing.assert_array_equal(got.numpy(), w.numpy(), err_msg=name)


def test_run_log_drops_records_past_resume_point(tmp_path):
  path = str(tmp_path / 'r.jsonl')
  with open(path, 'w') as f:
    f.writelines(json.dumps({'iter': i, 'loss': 1.0}) + '\n'
                 for i in (10, 20, 30))
  training.RunLog(path, start=20).write(25, {'loss': 2.0}, 'train')
  assert [json.loads(l)['iter'] for l in open(path)] == [10, 20, 25]


def test_cifar_schedule_and_scaling():
  steps = [(400, 0.01), (32000, 0.1), (48000, 0.01), (64000, 0.001)]
  lr = training.step_schedule(64000, 64000, steps)
  assert [lr(i) for i in (0, 399, 400, 31999, 32000, 47999, 48000, 63999)] \
      == [0.01, 0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
  lr = training.step_schedule(6400, 64000, steps)
  assert [lr(i) for i in (39, 40, 3199, 3200, 4800)] == [0.01, 0.1, 0.1,
                                                          0.01, 0.001]


def test_split_step_accumulates_interleaved_sub_batches():
  calls = []

  class Net:
    def binit(self):
      calls.append('binit')

    def forward(self, x, y):
      calls.append(('forward', list(x), list(y)))
      return 1.0, 2.0

    def hback(self):
      calls.append('hback')

    def cback(self, lr):
      calls.append(('cback', lr))

  x = np.arange(4)
  assert training.train_step(Net(), x, x, 0.5, split=2) == (1.0, 2.0)
  assert calls == ['binit', ('forward', [0, 2], [0, 2]), 'hback',
                   ('forward', [1, 3], [1, 3]), 'hback', ('cback', 0.5)]

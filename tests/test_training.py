"""The shared training loop (blpa.training), with a stand-in network."""

import json
import math

import numpy as np
import pytest

from blpa import checkpoint, training


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

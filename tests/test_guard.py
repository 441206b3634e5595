"""Weights are never lost through the API: non-finite updates, bad saves.

After a forward whose loss is not finite, with a non-finite learning rate,
or with a non-finite gradient, ``backward`` / ``hback`` / ``cback`` leave
weights and momentum bit for bit as they were (skipping with a warning, or
raising with ``on_nonfinite='raise'``); ``save`` to a path it cannot write
names the path and leaves no temporary file.
"""

import errno
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf

from blpa import checkpoint, models
from tests.conftest import ROOT

SHAPE = [8, 8, 8, 3]


def _batch(seed=0, nan=False):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(SHAPE).astype(np.float32)
  if nan:
    x[3, 2, 1, 0] = np.nan  # one NaN pixel
  return x, rng.integers(0, 10, size=SHAPE[0])


@pytest.fixture(scope='module')
def net():
  tf.random.set_seed(0)
  return models.build(models.cifar_resnet(1), SHAPE, qtype=4)


@pytest.fixture(scope='module')
def multi_net():
  tf.random.set_seed(0)
  return models.build(models.cifar_resnet(1), SHAPE, qtype=4, multi=2)


def _state(net):
  return [v.numpy().copy() for v in net.weights + net.momentum]


def _assert_unchanged(net, before):
  after = _state(net)
  assert all(np.array_equal(a, b) for a, b in zip(before, after))


def _skipped(fn, *args, match):
  """Calls ``fn(*args)``, which must warn ``match`` and return False."""
  with pytest.warns(RuntimeWarning, match=match) as record:
    applied = fn(*args)
  assert applied is False
  assert 'weights and momentum are unchanged' in str(record[0].message)


def _good_step(net):
  """A finite step still trains after a skipped one."""
  before = _state(net)
  net.forward(*_batch(1))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert net.backward(0.1) is True
  assert not np.array_equal(before[-1], net.weights[-1].numpy())


def test_nan_pixel_skips_the_update_with_a_warning(net):
  _good_step(net)  # momentum is non-zero from here on
  before = _state(net)
  _, loss = net.forward(*_batch(nan=True))
  assert np.isnan(loss)
  _skipped(net.backward, 0.1, match='loss of the last forward is nan')
  _assert_unchanged(net, before)
  _good_step(net)


@pytest.mark.parametrize('lr', [float('nan'), float('inf')])
def test_non_finite_learning_rate_skips(net, lr):
  before = _state(net)
  net.forward(*_batch())
  _skipped(net.backward, lr, match='learning rate is')
  _assert_unchanged(net, before)


def test_non_finite_gradient_with_finite_loss_skips(net):
  """Checked on the device: the loss is finite, its gradient is not."""
  before = _state(net)
  _, loss = net.forward(*_batch())
  assert np.isfinite(loss)
  grad = net.loss_grad.read_value()
  net.loss_grad.assign(tf.tensor_scatter_nd_update(
      grad, [[0, 0, 0, 1]], [np.inf]))
  _skipped(net.backward, 0.1, match='gradient is not finite')
  _assert_unchanged(net, before)


def test_raise_mode_raises_and_keeps_the_weights(net):
  before = _state(net)
  net.on_nonfinite = 'raise'
  try:
    net.forward(*_batch(nan=True))
    with pytest.raises(FloatingPointError, match='loss .* nan'):
      net.backward(0.1)
    net.forward(*_batch())
    with pytest.raises(FloatingPointError, match='learning rate'):
      net.backward(float('nan'))
  finally:
    net.on_nonfinite = 'skip'
  _assert_unchanged(net, before)


def test_bad_mode_and_learning_rate_are_named(net):
  with pytest.raises(ValueError, match="'skip' or 'raise'"):
    net.on_nonfinite = 'ignore'
  net.forward(*_batch())
  with pytest.raises(ValueError, match='lr must be a number'):
    net.backward('fast')


def _accumulate(net, seeds, spoil=False):
  """binit, then forward + hback per seed (a NaN loss gradient if spoil)."""
  net.binit()
  for seed in seeds:
    net.forward(*_batch(seed))
    if spoil:  # finite loss, non-finite gradients
      net.loss_grad.assign(net.loss_grad.read_value() * np.nan)
    net.hback()


def test_hback_cback_skip_a_non_finite_sub_batch(multi_net):
  net = multi_net
  _accumulate(net, (2, 8))
  assert net.cback(0.1) is True  # momentum is non-zero from here on
  before = _state(net)
  net.binit()
  net.forward(*_batch(nan=True))
  with pytest.warns(RuntimeWarning, match='sub-batch 1 is nan'):
    net.hback()
  net.forward(*_batch(3))
  net.hback()
  _skipped(net.cback, 0.1, match='sub-batch 1 is nan')
  _assert_unchanged(net, before)
  _accumulate(net, (4, 5), spoil=True)
  _skipped(net.cback, 0.1, match='accumulated gradient is not finite')
  _assert_unchanged(net, before)
  _accumulate(net, (6, 7))
  _skipped(net.cback, float('nan'), match='learning rate is nan')
  _assert_unchanged(net, before)


def test_hback_raise_mode_abandons_the_update(multi_net):
  net = multi_net
  before = _state(net)
  net.on_nonfinite = 'raise'
  try:
    net.binit()
    net.forward(*_batch(nan=True))
    with pytest.raises(FloatingPointError, match='call binit'):
      net.hback()
    with pytest.raises(ValueError, match='hback: call binit'):
      net.hback()
  finally:
    net.on_nonfinite = 'skip'
  _assert_unchanged(net, before)


MGRAPH_SCRIPT = r'''
import json, sys, warnings
import numpy as np
sys.path.insert(0, sys.argv[1])
from blpa import graph, mgraph, models
mgraph.split_cpu(2)
net = mgraph.Graph([graph.SimpleData, [[8, 8, 8, 3]]], [graph.LogLoss, []],
                   ngpu=2)
for spec in models.cifar_resnet(1):
  net.add(*spec)
net.close(qtype=4)
rng = np.random.default_rng(0)
x = rng.standard_normal([8, 8, 8, 3]).astype(np.float32)
y = rng.integers(0, 10, size=8)
state = lambda: [np.stack([np.asarray(c) for c in v.values])
                 for v in net.weights + net.momentum]
net.forward(x, y)
out = {'first': net.backward(0.1)}
before = state()
bad = x.copy()
bad[5, 0, 0, 0] = np.nan  # on device 1 only
out['loss'] = net.forward(bad, y)[1]
with warnings.catch_warnings(record=True) as record:
  warnings.simplefilter('always')
  out['applied'] = net.backward(0.1)
out['warnings'] = [str(w.message) for w in record]
after = state()
out['unchanged'] = all(np.array_equal(a, b) for a, b in zip(before, after))
out['replicas_equal'] = all(np.array_equal(a[0], a[1]) for a in after)
net.forward(x, y)
out['again'] = net.backward(0.1)
print(json.dumps(out))
'''


def test_mgraph_skips_on_every_device():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', TF_ENABLE_ONEDNN_OPTS='0')
  proc = subprocess.run([sys.executable, '-c', MGRAPH_SCRIPT, ROOT],
                        capture_output=True, text=True, timeout=180, env=env,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['first'] is True and out['again'] is True
  assert np.isnan(out['loss']) and out['applied'] is False
  assert any('loss of the last forward is nan' in w for w in out['warnings'])
  assert out['unchanged'] and out['replicas_equal']


def _left_over(folder):
  return [n for n in os.listdir(folder) if n.endswith('.tmp')]


def test_save_to_a_directory_names_it_and_leaves_nothing(net, tmp_path):
  folder = tmp_path / 'ckpt.npz'
  folder.mkdir()
  with pytest.raises(IsADirectoryError, match='is a directory') as e:
    net.save(str(folder), 1)
  assert str(folder) in str(e.value)
  assert not _left_over(tmp_path) and not os.listdir(folder)


def test_save_where_it_cannot_write_names_the_path(net, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  path = str(blocker / 'ckpt.npz')
  with pytest.raises(NotADirectoryError, match='is a file') as e:
    net.save(path, 1)
  assert path in str(e.value) and not _left_over(tmp_path)


def test_save_without_permission_names_the_path(net, tmp_path, monkeypatch):
  """A folder that cannot be written (the temporary file cannot be created)
  or a rename that is refused: PermissionError naming the path, no file
  left. Simulated, so that it runs as root too (root writes anywhere)."""

  def refuse(*args, **kwargs):
    raise PermissionError(errno.EACCES, 'Permission denied')

  path = str(tmp_path / 'ckpt.npz')
  with monkeypatch.context() as m:
    m.setattr(checkpoint.tempfile, 'mkstemp', refuse)
    with pytest.raises(PermissionError, match='cannot save a checkpoint') as e:
      net.save(path, 1)
  assert path in str(e.value) and not os.listdir(tmp_path)
  with monkeypatch.context() as m:
    m.setattr(checkpoint.os, 'replace', refuse)
    with pytest.raises(PermissionError, match='cannot save a checkpoint') as e:
      net.save(path, 1)
  assert path in str(e.value) and not os.listdir(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason='runs as root, who may write '
                    'into a read-only folder; simulated in '
                    'test_save_without_permission_names_the_path')
def test_save_into_a_read_only_folder(net, tmp_path):
  locked = tmp_path / 'locked'
  locked.mkdir()
  locked.chmod(0o500)
  try:
    with pytest.raises(PermissionError, match='cannot save a checkpoint'):
      net.save(str(locked / 'ckpt.npz'), 1)
    assert not os.listdir(locked)
  finally:
    locked.chmod(0o700)

"""cifar/train.py end to end on tiny data: resume, signals, NaN, bad data."""

import glob
import json
import os
import shutil
import signal

import numpy as np
import pytest

from blpa import checkpoint
from tests import programs

PROGRAM = 'cifar/train.py'
ITERS = 40


@pytest.fixture(scope='module')
def cifar():
  return programs.load_program(PROGRAM)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp('cifar10')
  programs.write_cifar10(str(folder), n_train=48, n_test=20)
  return str(folder)


def _args(data_dir, save, *extra):
  return ['-save', save, '-dset', 'cifar10', '--data-dir', data_dir,
          '-rblocks', '1', '-bsz', '4', '-qtype', '4', '--iters', str(ITERS),
          '--val-every', '0', '--ckpt-every', '7', '--val-bsz', '10',
          '--log-every', '1'] + [str(e) for e in extra]


@pytest.fixture(scope='module')
def reference(cifar, data_dir, tmp_path_factory):
  """An uninterrupted run of ITERS iterations."""
  save = str(tmp_path_factory.mktemp('ref') / 'ref.npz')
  logdir = str(tmp_path_factory.mktemp('tb'))
  assert cifar.main(_args(data_dir, save, '--no-progress', '--logdir',
                          logdir)) == 0
  assert glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))
  return save


def test_uninterrupted_run_writes_checkpoint_and_log(reference):
  arrays = checkpoint.read(reference)
  assert int(arrays['niter']) == ITERS
  assert any(k.startswith('mom_') for k in arrays)
  records = [json.loads(l) for l in open(reference[:-4] + '.jsonl')]
  assert [r['iter'] for r in records if 'loss' in r] == list(range(1, 41))
  final = [r for r in records if 'val_acc' in r]
  assert [r['iter'] for r in final] == [ITERS]
  assert {'val_acc', 'val_acc_running', 'val_loss', 'val_loss_running'} <= set(
      final[0])


def test_stop_and_resume_gives_identical_weights(cifar, data_dir, reference,
                                                 tmp_path):
  save = str(tmp_path / 'm.npz')
  assert cifar.main(_args(data_dir, save, '--stop-at', 17, '--no-progress')) \
      == 0
  assert int(checkpoint.read(save)['niter']) == 17
  assert cifar.main(_args(data_dir, save, '--no-progress')) == 0
  assert programs.differing_keys(save, reference) == []


def test_sigint_saves_exits_130_and_resumes_identically(cifar, data_dir,
                                                        reference, tmp_path):
  save = str(tmp_path / 'm.npz')
  proc = programs.spawn(PROGRAM, *_args(data_dir, save))
  for line in proc.stdout:
    if 'Train_Loss' in line:
      proc.send_signal(signal.SIGINT)
      break
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert 'SIGINT: stopping after this iteration' in out
  assert 'Traceback' not in err
  stopped = int(checkpoint.read(save)['niter'])
  assert 0 < stopped < ITERS and f'Saved iteration {stopped}' in out
  assert cifar.main(_args(data_dir, save, '--no-progress')) == 0
  assert programs.differing_keys(save, reference) == []


def test_eval_only_reports_both_statistics(cifar, data_dir, reference, capsys):
  assert cifar.main(_args(data_dir, reference, '--eval-only')) == 0
  out = capsys.readouterr().out
  assert f'[{ITERS:09d}] val loss' in out
  assert '(batch stats)' in out and '(running stats)' in out


def test_nan_loss_exits_3_and_keeps_checkpoint(cifar, data_dir, reference,
                                               tmp_path, capsys):
  save = str(tmp_path / 'bad.npz')
  arrays = checkpoint.read(reference)
  arrays['0'] = np.full_like(arrays['0'], np.nan)  # the first kernel
  arrays['niter'] = np.int64(3)
  checkpoint.write_atomic(save, arrays)
  before = open(save, 'rb').read()
  assert cifar.main(_args(data_dir, save, '--no-progress')) == 3
  err = capsys.readouterr().err
  assert 'at iteration 3 (lr 0.1)' in err and 'was kept' in err
  assert open(save, 'rb').read() == before


def test_malformed_dataset_gives_one_clear_message(data_dir, tmp_path):
  bad = tmp_path / 'data'
  shutil.copytree(data_dir, bad)
  np.savez(bad / 'test.npz', pixels=np.zeros(3))
  proc = programs.spawn(PROGRAM, *_args(str(bad), str(tmp_path / 'm.npz')))
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  errors = [l for l in err.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in err
  assert os.path.join(str(bad), 'test.npz') in errors[0]
  assert "'imgs'" in errors[0] and 'pixels' in errors[0]
  assert not os.path.exists(tmp_path / 'm.npz'), out

"""imagenet/train.py and imagenet/validate.py on a tiny folder of images."""


import os

import numpy as np
import pytest

from blpa import checkpoint, data, models, training
from tests import programs


@pytest.fixture(scope='module')
def imagenet():
  return programs.load_program('imagenet/train.py')


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  folder = tmp_path_factory.mktemp('images')
  bad = programs.write_images(str(folder))
  return str(folder), bad


def _args(folder, save, *extra):
  return ['-save', save, '--data-dir', folder, '--image-size', '32',
          '--blocks', '1,1,1,1', '--bsz', '6', '-split', '2', '-qtype', '8',
          '--iters', '4', '--val-every', '2', '--log-every', '1',
          '--no-progress'] + [str(e) for e in extra]


@pytest.fixture(scope='module')
def reference(imagenet, images, tmp_path_factory):
  save = str(tmp_path_factory.mktemp('ref') / 'ref.npz')
  assert imagenet.main(_args(images[0], save)) == 0
  return save


def test_training_skips_and_names_unreadable_image(imagenet, images,
                                                   tmp_path, capsys):
  save = str(tmp_path / 'm.npz')
  assert imagenet.main(_args(images[0], save, '--stop-at', 3)) == 0
  out = capsys.readouterr().out
  assert f'skipped unreadable image {images[1]}' in out
  assert 'val loss' in out and '(running stats)' in out
  assert int(checkpoint.read(save)['niter']) == 3


def test_stop_and_resume_gives_identical_weights(imagenet, images, reference,
                                                 tmp_path):
  save = str(tmp_path / 'm.npz')
  assert imagenet.main(_args(images[0], save, '--stop-at', 2)) == 0
  assert imagenet.main(_args(images[0], save)) == 0
  assert programs.differing_keys(save, reference) == []


def test_eval_only_validates_the_checkpoint(imagenet, images, reference,
                                           tmp_path, capsys):
  """--eval-only (as the README says both programs accept): validation of
  the checkpoint, no training, the checkpoint untouched."""
  before = checkpoint.read(reference)
  assert imagenet.main(_args(images[0], reference, '--eval-only')) == 0
  out = capsys.readouterr().out
  assert '[000000004] val loss' in out and '(running stats)' in out
  assert 'Saved' not in out
  after = checkpoint.read(reference)
  assert all(np.array_equal(before[k], after[k]) for k in before)
  missing = str(tmp_path / 'none.npz')
  assert imagenet.main(_args(images[0], missing, '--eval-only')) == 2
  assert f'--eval-only: checkpoint {missing} does not exist' in (
      capsys.readouterr().err)


def _readable_val(images):
  paths, labels = data.read_list(os.path.join(images[0], 'val.txt'),
                                 images[0])
  return paths, [(p, l) for p, l in zip(paths, labels) if p != images[1]]


def _net(bsz=3):
  return training.build_graph(models.imagenet_resnet((1, 1, 1, 1), 3),
                              [bsz, 32, 32, 3], 0, 0.0)


@pytest.fixture(scope='module')
def calibrated(images, tmp_path_factory):
  """A checkpoint (iteration 4) whose top-1 is neither 0 nor a class share:
  a fresh network whose loss-layer bias evens out its mean prediction, so
  that it predicts different classes for different images (the trained
  reference diverges to one class, whose share an argmin would also get)."""
  net = _net()
  _, readable = _readable_val(images)
  probs = np.mean([net.forward(data.ten_crops(p, 32), bn='running').mean(0)
                   for p, _ in readable], axis=0)
  net.weights[-1].assign(net.weights[-1] - np.log(probs))
  save = str(tmp_path_factory.mktemp('calibrated') / 'c.npz')
  net.save(save, niter=4, state=True)
  return save


def _expected_top1(images, save, bsz=3):
  """Top-1 accuracy of the checkpoint with 10-crop testing, computed here:
  running statistics one image at a time (all its crops in one forward
  pass), batch statistics per crop position over batches of ``bsz``
  list entries (the unreadable image leaves its batch one short)."""
  paths, readable = _readable_val(images)
  net = _net(bsz)
  training.resume(net, save)
  crops = {p: data.ten_crops(p, 32) for p, _ in readable}
  running = sum(int(np.argmax(net.forward(crops[p], bn='running').sum(0))
                    == l) for p, l in readable)
  batch = 0
  for start in range(0, len(paths), bsz):
    group = [(p, l) for p, l in readable if p in paths[start:start + bsz]]
    x = np.stack([crops[p] for p, _ in group])
    probs = sum(net.forward(x[:, c], bn='batch') for c in range(10))
    batch += int(np.sum(np.argmax(probs, 1) == [l for _, l in group]))
  return batch / len(readable), running / len(readable)


def test_ten_crop_validation_reports_top1_top5(images, calibrated, capsys):
  validate = programs.load_program('imagenet/validate.py')
  assert validate.main(['-save', calibrated, '--data-dir', images[0],
                        '--image-size', '32', '--blocks', '1,1,1,1',
                        '--bsz', '3']) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert 'iteration 4), 8 images, 10 crops' in last
  batch, running = _expected_top1(images, calibrated)
  assert 0 < running < 3 / 8, running  # not one class for all images
  # 3 classes: top-5 always hits (topk_hits is checked on 7 classes below).
  assert (f'batch stats: top-1 {batch:.4f} top-5 1.0000 | '
          f'running stats: top-1 {running:.4f} top-5 1.0000') in last, (
              last, batch, running)


def test_topk_hits_counts_top1_and_top5():
  validate = programs.load_program('imagenet/validate.py')
  probs = np.tile(np.arange(7, dtype=np.float32), (4, 1))  # order 6,5,...,0
  # label 6: top-1 and top-5; 3 and 4: top-5 only; 1: neither.
  assert validate.topk_hits(probs, np.array([6, 3, 4, 1])) == (1, 3)


def test_malformed_list_file(imagenet, images, tmp_path, capsys):
  (tmp_path / 'train.txt').write_text('a.JPEG,1\nb.JPEG;2\n')
  (tmp_path / 'val.txt').write_text('a.JPEG,1\n')
  assert imagenet.main(_args(str(tmp_path), str(tmp_path / 'm.npz'))) == 2
  err = capsys.readouterr().err
  assert 'train.txt, line 2' in err and err.count('error:') == 1



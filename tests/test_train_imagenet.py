"""imagenet/train.py and imagenet/validate.py on a tiny folder of images."""


import pytest

from blpa import checkpoint
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


def test_ten_crop_validation_reports_top1_top5(images, reference, capsys):
  validate = programs.load_program('imagenet/validate.py')
  assert validate.main(['-save', reference, '--data-dir', images[0],
                        '--image-size', '32', '--blocks', '1,1,1,1',
                        '--bsz', '3']) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert 'iteration 4), 8 images, 10 crops' in last
  assert 'batch stats: top-1' in last and 'running stats: top-1' in last
  assert 'top-5 1.0000' in last  # 3 classes: top-5 always hits


def test_malformed_list_file(imagenet, images, tmp_path, capsys):
  (tmp_path / 'train.txt').write_text('a.JPEG,1\nb.JPEG;2\n')
  (tmp_path / 'val.txt').write_text('a.JPEG,1\n')
  assert imagenet.main(_args(str(tmp_path), str(tmp_path / 'm.npz'))) == 2
  err = capsys.readouterr().err
  assert 'train.txt, line 2' in err and err.count('error:') == 1



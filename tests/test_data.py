"""Data loading and input pipelines (blpa.data)."""

import os
import pickle

import numpy as np
import pytest

from blpa import data
from tests import programs


def _load(folder, dset='cifar10', **kw):
  return data.load_cifar(dset, str(folder), log=lambda s: None, **kw)


@pytest.mark.parametrize('layout', ['hwc', 'chw'])
def test_cifar10_npz_flat_layout_is_detected(tmp_path, layout):
  want = programs.write_cifar10(tmp_path, layout=layout)
  got = _load(tmp_path)
  np.testing.assert_array_equal(got['train'][0], want['train'][0])
  np.testing.assert_array_equal(got['test'][1], want['test'][1])
  assert got['classes'] == 10 and got['train'][1].dtype == np.int32


def test_cifar10_npz_layout_override_and_4d_arrays(tmp_path):
  want = programs.write_cifar10(tmp_path, layout='chw')
  got = _load(tmp_path, layout='chw')
  np.testing.assert_array_equal(got['train'][0], want['train'][0])
  np.savez(tmp_path / 'train.npz', imgs=want['train'][0],
           labels=want['train'][1])
  got = _load(tmp_path, layout='hwc')
  np.testing.assert_array_equal(got['train'][0], want['train'][0])


def test_cifar100_pickle_in_dset_subfolder(tmp_path):
  want = programs.write_cifar100(tmp_path / 'cifar100')
  got = _load(tmp_path, 'cifar100')
  np.testing.assert_array_equal(got['train'][0], want['train'][0])
  np.testing.assert_array_equal(got['test'][1], want['test'][1])
  assert got['classes'] == 100


def test_cifar100_pickle_with_bytes_keys(tmp_path):
  want = programs.write_cifar100(tmp_path)
  with open(tmp_path / 'train', 'rb') as f:
    record = pickle.load(f)
  with open(tmp_path / 'train', 'wb') as f:
    pickle.dump({k.encode(): v for k, v in record.items()}, f)
  got = _load(tmp_path, 'cifar100')
  np.testing.assert_array_equal(got['train'][1], want['train'][1])


@pytest.mark.parametrize('damage,expect', [
    (lambda p: np.savez(p / 'train.npz', images=np.zeros((2, 3072))),
     "found keys ['images']"),
    (lambda p: (p / 'train.npz').write_bytes(b'not a zip'),
     'not a readable .npz'),
    (lambda p: np.savez(p / 'train.npz', imgs=np.zeros((2, 3072)),
                        labels=[0, 1]), 'must be uint8'),
    (lambda p: np.savez(p / 'train.npz', imgs=np.zeros((2, 3072), np.uint8),
                        labels=[0, 12]), 'labels must be in [0, 10)'),
    (lambda p: np.savez(p / 'train.npz', imgs=np.zeros((2, 3072), np.uint8),
                        labels=[0]), 'one integer label per image'),
    (lambda p: os.remove(p / 'test.npz'), 'test.npz is missing'),
])
def test_malformed_cifar10_names_file_and_format(tmp_path, damage, expect):
  programs.write_cifar10(tmp_path, 8, 8)
  damage(tmp_path)
  with pytest.raises(data.DataError) as err:
    _load(tmp_path)
  assert expect in str(err.value)
  assert str(tmp_path) in str(err.value)


def test_malformed_cifar100_pickle(tmp_path):
  programs.write_cifar100(tmp_path, 8, 8)
  with open(tmp_path / 'test', 'wb') as f:
    pickle.dump({'data': np.zeros((2, 3072), np.uint8)}, f)
  with pytest.raises(data.DataError, match="fine_labels"):
    _load(tmp_path, 'cifar100')
  (tmp_path / 'test').write_bytes(b'\x00garbage')
  with pytest.raises(data.DataError, match='not a readable pickle'):
    _load(tmp_path, 'cifar100')


def test_missing_cifar_explains_how_to_get_it(tmp_path):
  with pytest.raises(data.DataError) as err:
    _load(tmp_path / 'nothing')
  message = str(err.value)
  assert 'cifar10 data not found' in message
  assert 'train.npz' in message and '--download' in message


def test_tfds_copy_is_used_without_download(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared',
                      lambda self: True)
  with tfds.testing.mock_data(num_examples=12):
    got = _load(tmp_path, 'cifar100')
  assert got['train'][0].shape == (12, 32, 32, 3)
  assert got['train'][0].dtype == np.uint8
  assert got['source'].startswith('tensorflow-datasets cifar100')


def test_sampler_epochs_are_permutations_keyed_by_seed():
  s = data.Sampler(10, 3, seed=5)
  first = np.concatenate([s.indices(i) for i in range(3)])
  assert len(set(first)) == 9 and s.epoch_size == 3
  np.testing.assert_array_equal(s.indices(4), data.Sampler(10, 3, 5).indices(4))
  assert not np.array_equal(s.epoch(0), s.epoch(1))
  assert not np.array_equal(s.epoch(0), data.Sampler(10, 3, 6).epoch(0))
  with pytest.raises(data.DataError, match='fewer than the batch size'):
    data.Sampler(2, 3, 0)


def test_cifar_batches_resume_identically():
  imgs = programs.smooth_images(20)
  labels = np.arange(20, dtype=np.int32) % 10
  sampler = data.Sampler(20, 8, seed=1)
  full = list(data.cifar_train_batches(imgs, labels, sampler, 0, 5))
  tail = list(data.cifar_train_batches(imgs, labels, sampler, 3, 5))
  for (xa, ya), (xb, yb) in zip(full[3:], tail):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert full[0][0].shape == (8, 32, 32, 3) and full[0][0].dtype == np.float32


def test_cifar_augmentation_translates_and_flips():
  x = np.random.default_rng(0).random((64, 32, 32, 1)).astype(np.float32)
  out = data.augment_cifar(x, np.array([3, 4])).numpy()
  padded = np.pad(x, [(0, 0), (4, 4), (4, 4), (0, 0)])
  flips = 0
  for i in range(len(x)):
    found = [(dy, dx, f) for dy in range(9) for dx in range(9)
             for f in (False, True)
             if np.array_equal(out[i], (lambda c: c[:, ::-1] if f else c)(
                 padded[i, dy:dy + 32, dx:dx + 32]))]
    assert found, f'image {i} is not a shifted/flipped copy'
    flips += found[0][2]
  assert 10 < flips < 54


def test_normalization_removes_each_image_mean():
  x = programs.smooth_images(4)
  out = data.normalize_cifar(x).numpy()
  np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0, atol=1e-6)
  np.testing.assert_allclose(out[0] - out[0].min(),
                             (x[0] - x[0].min()) / 255.0, atol=1e-6)


def test_read_list_reports_malformed_line(tmp_path):
  (tmp_path / 'l.txt').write_text('a.JPEG,1\nb.JPEG\n')
  with pytest.raises(data.DataError, match='line 2'):
    data.read_list(str(tmp_path / 'l.txt'))
  with pytest.raises(data.DataError, match='not found'):
    data.read_list(str(tmp_path / 'missing.txt'))


def test_image_batches_skip_and_report_corrupt_file(tmp_path):
  bad = programs.write_images(str(tmp_path), n_train=7)
  paths, labels = data.read_list(str(tmp_path / 'train.txt'))
  sampler = data.Sampler(len(paths), 4, seed=0)
  notes = []
  full = list(data.imagenet_train_batches(paths, labels, sampler, 0, 4,
                                          size=16, log=notes.append))
  assert sum(len(y) for _, _, y in full) == 4 * 4 - len(notes)
  assert notes and all(bad in n for n in notes)
  assert full[0][1].shape[1:] == (16, 16, 3)
  tail = list(data.imagenet_train_batches(paths, labels, sampler, 2, 4,
                                          size=16, log=notes.append))
  for (ka, xa, ya), (kb, xb, yb) in zip(full[2:], tail):
    assert ka == kb
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)


def test_ten_crops_corners_centre_and_flips(tmp_path):
  img = np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)
  programs.Image.fromarray(img).save(tmp_path / 'a.png')
  crops = data.ten_crops(str(tmp_path / 'a.png'), size=28).numpy()
  assert crops.shape == (10, 28, 28, 3)
  np.testing.assert_allclose(crops[5], crops[0][:, ::-1], atol=1e-6)
  np.testing.assert_allclose(crops[9], crops[4][:, ::-1], atol=1e-6)
  val = data.val_image(str(tmp_path / 'a.png'), size=28).numpy()
  assert val.shape == (28, 28, 3)
  batches = list(data.imagenet_eval_batches([str(tmp_path / 'a.png')] * 3,
                                            np.zeros(3, np.int32), 2, 28,
                                            crops=True))
  assert [x.shape[:2] for _, x, _ in batches] == [(2, 10), (1, 10)]

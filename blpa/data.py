"""Datasets and input pipelines of the training programs.

CIFAR-10/100 come from the reference implementation's files or from
tensorflow-datasets; ImageNet-style data from list files of
``relative/path.JPEG,label`` lines.  Every random choice (the shuffle of an
epoch, the augmentation of an image) is a function of the run's seed and of
the iteration, so a run resumed from a checkpoint sees exactly the batches
that an uninterrupted run would have seen.

Preprocessing:

* CIFAR: pixels scaled to [0, 1], then each image's own mean (over all
  pixels and channels) subtracted, as in the reference; training adds a
  random translation of up to ±4 pixels (zero padding of 4, random 32x32
  crop) and a horizontal flip with probability 1/2, drawn per image.
* ImageNet: shorter side scaled to a random 256–480, random 224 crop, flip,
  colour jitter (brightness, saturation, hue, contrast), then the ImageNet
  mean/std; validation scales the shorter side to 368 and takes the centre
  224 crop.  Sizes scale with ``size / 224`` for small tests.
"""

import os
import pickle
import sys
import zipfile

import numpy as np

AUTOTUNE = -1  # tf.data.AUTOTUNE, without importing TensorFlow here.
CIFAR_CLASSES = {'cifar10': 10, 'cifar100': 100}
_CIFAR_FILES = {'cifar10': ('train.npz', 'test.npz'),
                'cifar100': ('train', 'test')}
_CIFAR_FORMAT = {
    'cifar10': "an .npz with 'imgs' (N x 3072 uint8, or N x 32 x 32 x 3) and "
               "'labels' (N integers in [0, 10))",
    'cifar100': "a pickle of the CIFAR-100 python version with 'data' "
                "(N x 3072 uint8, channel-major) and 'fine_labels'",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(Exception):
  """Missing or malformed data (or a checkpoint or setting that does not fit).

  The programs print the message as one ``error:`` line and exit with
  status 2, without a traceback; the message names the file and what was
  expected.
  """


def _howto(dset, folder):
  """How to obtain a CIFAR dataset, for error messages."""
  files = ' and '.join(os.path.join(folder, f) for f in _CIFAR_FILES[dset])
  return (f'To get it, either put the reference files {files} there '
          f'({_CIFAR_FORMAT[dset]}), or prepare the tensorflow-datasets copy '
          f'once with internet access: add --download, or run python -c '
          f'"import tensorflow_datasets as tfds; tfds.builder(\'{dset}\', '
          f'data_dir=\'{folder}\').download_and_prepare()".')


# ----------------------------------------------------------------------------
# CIFAR: files
# ----------------------------------------------------------------------------

def load_cifar(dset, data_dir=None, download=False, layout='auto', log=print):
  """Loads CIFAR-10 or CIFAR-100 into memory.

  The reference's files are looked for in ``data_dir`` and
  ``data_dir/<dset>`` (without ``data_dir``: ``data/<dset>``, where the
  reference keeps them); otherwise the tensorflow-datasets copy prepared in
  ``data_dir`` (default: the tfds default folder) is used, and downloaded
  only when ``download`` is set.

  Args:
    dset: ``'cifar10'`` or ``'cifar100'``.
    data_dir: folder holding the data, or None.
    download: let tensorflow-datasets download a missing copy.
    layout: pixel order of flat CIFAR-10 ``imgs`` rows: ``'hwc'`` (the
      reference reshapes them to 32x32x3), ``'chw'`` (channel-major, as in
      the CIFAR python batches) or ``'auto'`` (whichever gives smoother
      images).
    log: function for one-line notes.

  Returns:
    dict with ``train`` and ``test`` pairs ``(images uint8 [N,32,32,3],
    labels int32 [N])``, ``classes`` and ``source`` (a description).

  Raises:
    DataError: for missing or malformed data, naming the file.
  """
  if dset not in CIFAR_CLASSES:
    raise DataError(f'unknown dataset {dset!r}: use cifar10 or cifar100')
  folder = _find_reference(dset, data_dir)
  if folder is not None:
    read = _read_npz if dset == 'cifar10' else _read_pickle
    out = {split: read(os.path.join(folder, name), layout, log)
           for split, name in zip(('train', 'test'), _CIFAR_FILES[dset])}
    out['source'] = f'reference files in {folder}'
  else:
    out = _load_tfds(dset, data_dir, download)
  for split in ('train', 'test'):
    _check_labels(f'{out["source"]} ({split})', out[split][1],
                  CIFAR_CLASSES[dset])
  out['classes'] = CIFAR_CLASSES[dset]
  return out


def _find_reference(dset, data_dir):
  """The folder holding the reference's files for ``dset``, or None."""
  folders = ([data_dir, os.path.join(data_dir, dset)] if data_dir
             else [os.path.join('data', dset)])
  for folder in folders:
    present = [os.path.isfile(os.path.join(folder, f))
               for f in _CIFAR_FILES[dset]]
    if all(present):
      return folder
    if any(present):
      missing = _CIFAR_FILES[dset][present.index(False)]
      raise DataError(f'{os.path.join(folder, missing)} is missing (the '
                      f'other {dset} file is there). ' + _howto(dset, folder))
  return None


def _read_npz(path, layout, log):
  """Reads a reference CIFAR-10 ``.npz`` (``imgs``, ``labels``)."""
  try:
    with np.load(path, allow_pickle=False) as data:
      if 'imgs' not in data.files or 'labels' not in data.files:
        raise DataError(f'{path}: expected {_CIFAR_FORMAT["cifar10"]}; '
                        f'found keys {sorted(data.files)}')
      imgs, labels = data['imgs'], data['labels']
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise DataError(f'{path} is not a readable .npz file ({e}); expected '
                    f'{_CIFAR_FORMAT["cifar10"]}') from None
  return _as_images(path, imgs, layout, log), _as_labels(path, labels, imgs)


def _read_pickle(path, layout, log):
  """Reads a CIFAR-100 python pickle (``data``, ``fine_labels``)."""
  del layout, log  # The python version is always channel-major.
  try:
    with open(path, 'rb') as f:
      data = pickle.load(f, encoding='latin1')
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path} is not a readable pickle ({type(e).__name__}: '
                    f'{e}); expected {_CIFAR_FORMAT["cifar100"]}') from None
  if isinstance(data, dict):
    data = {k.decode() if isinstance(k, bytes) else k: v
            for k, v in data.items()}
  if not isinstance(data, dict) or not {'data', 'fine_labels'} <= set(data):
    found = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise DataError(f'{path}: expected {_CIFAR_FORMAT["cifar100"]}; found '
                    f'{found}')
  imgs = np.asarray(data['data'])
  return (_as_images(path, imgs, 'chw', None),
          _as_labels(path, data['fine_labels'], imgs))


def _as_images(path, imgs, layout, log):
  """Turns stored CIFAR images into uint8 ``[N, 32, 32, 3]``."""
  imgs = np.asarray(imgs)
  if imgs.dtype != np.uint8 or imgs.ndim < 2 or imgs[0].size != 3072:
    raise DataError(f'{path}: images must be uint8 with 3072 values per image '
                    f'(32x32x3); got dtype {imgs.dtype}, shape '
                    f'{list(imgs.shape)}')
  if imgs.shape[1:] == (32, 32, 3):
    return imgs
  if imgs.shape[1:] == (3, 32, 32):
    return np.ascontiguousarray(imgs.transpose(0, 2, 3, 1))
  flat = imgs.reshape(len(imgs), 3072)
  if layout == 'auto':
    layout = detect_layout(flat)
    if log:
      log(f'{path}: pixel order detected as {layout} (override with '
          '--npz-layout)')
  if layout == 'hwc':
    return flat.reshape(-1, 32, 32, 3)
  return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def detect_layout(flat, sample=512):
  """Guesses the pixel order of flat 32x32x3 images.

  Natural images are smooth: read in the right order, neighbouring pixels
  differ less than when read in the wrong one.

  Args:
    flat: uint8 ``[N, 3072]``.
    sample: how many images to look at.

  Returns:
    ``'hwc'`` or ``'chw'``.
  """
  x = flat[:sample].astype(np.float32)
  roughness = {}
  for name, img in (('hwc', x.reshape(-1, 32, 32, 3)),
                    ('chw', x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))):
    roughness[name] = (np.abs(np.diff(img, axis=1)).mean() +
                       np.abs(np.diff(img, axis=2)).mean())
  return 'chw' if roughness['chw'] < roughness['hwc'] else 'hwc'


def _as_labels(path, labels, imgs):
  """Labels as int32 ``[N]``, checked against the image count."""
  labels = np.asarray(labels)
  if labels.dtype.kind not in 'iu' or labels.size != len(imgs):
    raise DataError(f'{path}: expected one integer label per image '
                    f'({len(imgs)} images); got dtype {labels.dtype}, shape '
                    f'{list(labels.shape)}')
  return labels.reshape(-1).astype(np.int32)


def _check_labels(where, labels, classes):
  """Checks that labels lie in ``[0, classes)``."""
  if len(labels) and (labels.min() < 0 or labels.max() >= classes):
    raise DataError(f'{where}: labels must be in [0, {classes}), found '
                    f'{labels.min()}..{labels.max()}')


def _load_tfds(dset, data_dir, download):
  """Loads CIFAR from tensorflow-datasets (no network unless ``download``)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder = tfds.builder(dset, data_dir=data_dir)
  folder = data_dir or os.path.dirname(os.path.dirname(builder.data_dir))
  if not builder.is_prepared():
    if not download:
      raise DataError(f'{dset} data not found: no reference files in '
                      f'{data_dir or os.path.join("data", dset)} and no '
                      f'prepared tensorflow-datasets copy in {folder}. '
                      + _howto(dset, data_dir or os.path.join('data', dset)))
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'downloading {dset} with tensorflow-datasets into '
                      f'{folder} failed ({type(e).__name__}: {e}). '
                      + _howto(dset, folder)) from None
  out = {'source': f'tensorflow-datasets {dset} in {folder}'}
  for split in ('train', 'test'):
    images, labels = [], []
    for ex in tfds.as_numpy(builder.as_dataset(split=split, batch_size=4096)):
      images.append(ex['image'])
      labels.append(ex['label'])
    out[split] = (np.concatenate(images).astype(np.uint8),
                  np.concatenate(labels).astype(np.int32))
  return out


# ----------------------------------------------------------------------------
# Order of the training data
# ----------------------------------------------------------------------------

class Sampler:
  """Which examples make up the batch of each iteration.

  Epoch ``e`` is a permutation drawn from ``(seed, e)``; iteration ``i``
  takes batch ``i mod E`` of epoch ``i div E`` (``E = n div batch``; the
  remainder of each epoch is dropped, as in the reference).

  Args:
    n: number of training examples.
    batch: batch size.
    seed: the run's seed.
  """

  def __init__(self, n, batch, seed):
    if n < batch:
      raise DataError(f'the training set has {n} examples, fewer than the '
                      f'batch size {batch}')
    self.n, self.batch, self.seed = n, batch, seed
    self.epoch_size = n // batch
    self._cache = (None, None)

  def epoch(self, e):
    """The permutation of epoch ``e``."""
    if self._cache[0] != e:
      self._cache = (e, np.random.default_rng([self.seed, e]).permutation(
          self.n))
    return self._cache[1]

  def indices(self, it):
    """Example indices of iteration ``it``.

    Args:
      it: iteration number (0-based).

    Returns:
      int array ``[batch]``.
    """
    pos = (it % self.epoch_size) * self.batch
    return self.epoch(it // self.epoch_size)[pos:pos + self.batch]


# ----------------------------------------------------------------------------
# CIFAR: pipelines
# ----------------------------------------------------------------------------

def normalize_cifar(x):
  """uint8 images to float32 in [0, 1] minus each image's own mean.

  Args:
    x: ``[B, 32, 32, 3]`` uint8 (numpy or tensor).

  Returns:
    float32 tensor of the same shape.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  x = tf.cast(x, tf.float32) / 255.0
  return x - tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)


def augment_cifar(x, seed):
  """Random ±4 pixel translation and horizontal flip, per image.

  Args:
    x: float ``[B, H, W, C]``.
    seed: int ``[2]`` stateless seed.

  Returns:
    Tensor of the same shape.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  b, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
  shift_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
      seed, 2))
  shift = tf.random.stateless_uniform([b, 2], shift_seed, 0, 9, tf.int32)
  padded = tf.pad(x, [[0, 0], [4, 4], [4, 4], [0, 0]])
  rows = shift[:, :1] + tf.range(h)[None]
  cols = shift[:, 1:] + tf.range(w)[None]
  x = tf.gather(padded, rows, axis=1, batch_dims=1)
  x = tf.gather(x, cols, axis=2, batch_dims=1)
  flip = tf.random.stateless_uniform([b], flip_seed) < 0.5
  return tf.where(flip[:, None, None, None], x[:, :, ::-1], x)


def cifar_train_batches(images, labels, sampler, start, stop):
  """Augmented training batches of iterations ``start … stop-1``.

  Args:
    images: uint8 ``[N, 32, 32, 3]``.
    labels: int32 ``[N]``.
    sampler: a :class:`Sampler` (its seed also keys the augmentation).
    start: first iteration.
    stop: one past the last iteration.

  Returns:
    Iterator of ``(x float32 [B,32,32,3], y int32 [B])`` numpy pairs.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  def gen():
    for it in range(start, stop):
      idx = sampler.indices(it)
      yield it, images[idx], labels[idx]

  shape = [sampler.batch] + list(images.shape[1:])
  ds = tf.data.Dataset.from_generator(gen, output_signature=(
      tf.TensorSpec([], tf.int64), tf.TensorSpec(shape, tf.uint8),
      tf.TensorSpec([sampler.batch], tf.int32)))
  seed = tf.constant(sampler.seed, tf.int64)
  ds = ds.map(lambda it, x, y: (augment_cifar(normalize_cifar(x),
                                              tf.stack([seed, it])), y),
              num_parallel_calls=AUTOTUNE, deterministic=True)
  return ds.prefetch(AUTOTUNE).as_numpy_iterator()


def cifar_eval_batches(images, labels, batch):
  """Test batches, in the reference's fixed order, without augmentation.

  Args:
    images: uint8 ``[N, 32, 32, 3]``.
    labels: int32 ``[N]``.
    batch: batch size; the last batch may be smaller.

  Yields:
    ``(x float32, y int32)`` numpy pairs.
  """
  order = np.random.RandomState(0).permutation(len(labels))
  for b in range(0, len(order), batch):
    idx = order[b:b + batch]
    yield normalize_cifar(images[idx]).numpy(), labels[idx]


# ----------------------------------------------------------------------------
# ImageNet: list files and images
# ----------------------------------------------------------------------------

def read_list(path, root=None):
  """Reads a list file of ``relative/path,label`` lines.

  Args:
    path: the list file.
    root: folder the paths are relative to (default: the list's folder).

  Returns:
    ``(paths, labels)``: list of full paths and int32 array.

  Raises:
    DataError: for a missing file or a malformed line (with its number).
  """
  root = os.path.dirname(path) if root is None else root
  if not os.path.isfile(path):
    raise DataError(f'{path} not found: expected a list file with one '
                    '"relative/path.JPEG,label" line per image')
  paths, labels = [], []
  with open(path, encoding='utf-8') as f:
    for num, line in enumerate(f, 1):
      if not line.strip():
        continue
      name, _, label = line.strip().rpartition(',')
      if not name or not label.strip().isdigit():
        raise DataError(f'{path}, line {num}: expected '
                        f'"relative/path.JPEG,label" with a label >= 0, got '
                        f'{line.strip()!r}')
      paths.append(os.path.join(root, name.strip()))
      labels.append(int(label))
  if not paths:
    raise DataError(f'{path} lists no images')
  return paths, np.array(labels, np.int32)


def _decode(path):
  """Reads and decodes a JPEG/PNG/GIF/BMP file into uint8 ``[H, W, 3]``."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  img = tf.io.decode_image(tf.io.read_file(path), channels=3,
                           expand_animations=False)
  img.set_shape([None, None, 3])
  return img


def _resize_shorter(img, side):
  """Bilinear resize so that the shorter side is ``side`` (float output)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  hw = tf.cast(tf.shape(img)[:2], tf.float32)
  scale = tf.cast(side, tf.float32) / tf.reduce_min(hw)
  new = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
  return tf.image.resize(img, new)


def _centre(img, size, at=0.5):
  """The ``size`` crop at relative position ``at`` (y, x) of ``img``."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  at = (at, at) if np.isscalar(at) else at
  hw = tf.shape(img)[:2]
  y = tf.cast(tf.cast(hw[0] - size, tf.float32) * at[0], tf.int32)
  x = tf.cast(tf.cast(hw[1] - size, tf.float32) * at[1], tf.int32)
  return img[y:y + size, x:x + size]


def _standardize(img):
  """[0, 255] floats to ImageNet mean/std units."""
  return (img / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def scaled(side, size):
  """A side length of the 224-pixel recipe, scaled to crops of ``size``."""
  return int(round(side * size / 224.0))


def train_image(path, seed, size=224):
  """One augmented training image.

  Args:
    path: string tensor, the file.
    seed: int ``[2]`` stateless seed.
    size: crop size.

  Returns:
    float32 ``[size, size, 3]``.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  s = tf.unstack(tf.random.experimental.stateless_split(seed, 7))
  side = tf.random.stateless_uniform([], s[0], scaled(256, size),
                                     scaled(480, size) + 1, tf.int32)
  img = _resize_shorter(_decode(path), side)
  img = tf.image.stateless_random_crop(img, [size, size, 3], s[1])
  img = tf.image.stateless_random_flip_left_right(img, s[2]) / 255.0
  img = tf.image.stateless_random_brightness(img, 32.0 / 255.0, s[3])
  img = tf.image.stateless_random_saturation(img, 0.5, 1.5, s[4])
  img = tf.image.stateless_random_hue(img, 0.2, s[5])
  img = tf.image.stateless_random_contrast(img, 0.5, 1.5, s[6])
  return _standardize(tf.clip_by_value(img, 0.0, 1.0) * 255.0)


def val_image(path, size=224):
  """Validation image: shorter side 368, centre crop.

  Args:
    path: string tensor.
    size: crop size (sides scale with ``size/224``).

  Returns:
    float32 ``[size, size, 3]``.
  """
  img = _resize_shorter(_decode(path), scaled(368, size))
  return _standardize(_centre(img, size))


def ten_crops(path, size=224):
  """The 10 crops of 10-crop testing at scale 256.

  Corners (top-left, bottom-left, top-right, bottom-right) and centre, then
  the same five of the flipped image.

  Args:
    path: string tensor.
    size: crop size (the scale is ``256·size/224``).

  Returns:
    float32 ``[10, size, size, 3]``.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  img = _resize_shorter(_decode(path), scaled(256, size))
  spots = [(0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0.5)]
  crops = tf.stack([_centre(img, size, at) for at in spots])
  return _standardize(tf.concat([crops, crops[:, :, ::-1]], axis=0))


def image_batches(keys, items, load, log=None):
  """Batches of images decoded in parallel; unreadable files are skipped.

  Args:
    keys: batch keys in order (e.g. iteration numbers).
    items: ``items(key)`` → list of ``(path, label)`` of that batch.
    load: ``load(path, key, j)`` → image tensor (TensorFlow function of
      the path string and int64 ``key``, ``j``; ``j`` = place in the batch).
    log: called with a line naming each skipped file (default: stderr).

  Yields:
    ``(key, x, y)``: ``x`` float32 ``[b, ...]`` and ``y`` int32 ``[b]``
    with ``b`` the number of readable images (``None, None`` when none).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  log = log or (lambda s: print(s, file=sys.stderr, flush=True))

  def gen():
    for key in keys:
      for j, (path, label) in enumerate(items(key)):
        yield key, j, path, label

  ds = tf.data.Dataset.from_generator(gen, output_signature=(
      tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64),
      tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int32)))
  ds = ds.map(lambda k, j, p, y: (k, j, load(p, k, j), y),
              num_parallel_calls=AUTOTUNE, deterministic=True)
  stream = ds.ignore_errors().prefetch(AUTOTUNE).as_numpy_iterator()
  pending = next(stream, None)
  for key in keys:
    got, xs, ys = set(), [], []
    while pending is not None and pending[0] == key:
      got.add(int(pending[1]))
      xs.append(pending[2])
      ys.append(pending[3])
      pending = next(stream, None)
    for j, (path, _) in enumerate(items(key)):
      if j not in got:
        log(f'warning: skipped unreadable image {path}')
    yield (key, np.stack(xs), np.array(ys, np.int32)) if xs else (key, None,
                                                                  None)


def imagenet_train_batches(paths, labels, sampler, start, stop, size=224,
                           log=None):
  """Augmented training batches of iterations ``start … stop-1``.

  Image ``j`` of iteration ``it`` is augmented with the stateless seed
  ``(sampler.seed, it·batch + j)``.

  Args:
    paths: list of image files.
    labels: int32 ``[N]``.
    sampler: a :class:`Sampler`.
    start: first iteration.
    stop: one past the last iteration.
    size: crop size.
    log: see :func:`image_batches`.

  Returns:
    Iterator of ``(iteration, x, y)`` as in :func:`image_batches`.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  seed = tf.constant(sampler.seed, tf.int64)

  def items(it):
    return [(paths[k], labels[k]) for k in sampler.indices(it)]

  def load(path, it, j):
    return train_image(path, tf.stack([seed, it * sampler.batch + j]), size)

  return image_batches(range(start, stop), items, load, log)


def imagenet_eval_batches(paths, labels, batch, size=224, crops=False,
                          log=None):
  """Validation batches in list order.

  Args:
    paths: list of image files.
    labels: int32 ``[N]``.
    batch: images per batch (the last may be smaller).
    size: crop size.
    crops: ``True`` for :func:`ten_crops` (``x`` is then ``[b, 10, …]``),
      else the centre crop of :func:`val_image`.
    log: see :func:`image_batches`.

  Returns:
    Iterator of ``(batch_number, x, y)`` as in :func:`image_batches`.
  """
  def items(b):
    return list(zip(paths[b * batch:(b + 1) * batch],
                    labels[b * batch:(b + 1) * batch]))

  def load(path, unused_b, unused_j):
    return ten_crops(path, size) if crops else val_image(path, size)

  return image_batches(range(-(-len(paths) // batch)), items, load, log)

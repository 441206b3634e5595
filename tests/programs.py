"""Helpers for the tests of the training programs: tiny datasets in every
supported format, loading the programs in-process, and running them as
subprocesses."""

import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_program(relpath):
  """Imports a program file (e.g. ``cifar/train.py``) as a fresh module."""
  name = 'prog_' + relpath.replace('/', '_').replace('.py', '')
  spec = importlib.util.spec_from_file_location(name,
                                                os.path.join(ROOT, relpath))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def smooth_images(n, seed=0):
  """Smooth random uint8 images ``[n, 32, 32, 3]`` (blocky, like photos)."""
  rng = np.random.default_rng(seed)
  base = rng.random((n, 4, 4, 3))
  return (np.kron(base, np.ones((1, 8, 8, 1))) * 255).astype(np.uint8)


def write_cifar10(folder, n_train=64, n_test=40, layout='hwc'):
  """Reference CIFAR-10 files: ``imgs`` N x 3072 uint8 and ``labels``.

  Returns:
    dict split → (images [N,32,32,3], labels).
  """
  os.makedirs(folder, exist_ok=True)
  out = {}
  for split, n in (('train', n_train), ('test', n_test)):
    imgs = smooth_images(n, seed=len(split))
    labels = np.random.default_rng(n).integers(0, 10, n)
    stored = imgs if layout == 'hwc' else imgs.transpose(0, 3, 1, 2)
    np.savez(os.path.join(folder, f'{split}.npz'),
             imgs=stored.reshape(n, 3072), labels=labels)
    out[split] = (imgs, labels)
  return out


def write_cifar100(folder, n_train=48, n_test=24):
  """CIFAR-100 python pickles ``train``/``test`` (channel-major ``data``)."""
  os.makedirs(folder, exist_ok=True)
  out = {}
  for split, n in (('train', n_train), ('test', n_test)):
    imgs = smooth_images(n, seed=len(split))
    labels = list(np.random.default_rng(n).integers(0, 100, n))
    record = {'data': imgs.transpose(0, 3, 1, 2).reshape(n, 3072),
              'fine_labels': labels, 'coarse_labels': [0] * n}
    with open(os.path.join(folder, split), 'wb') as f:
      pickle.dump(record, f)
    out[split] = (imgs, np.array(labels))
  return out


def write_images(folder, n_train=16, n_val=8, classes=3):
  """A folder of JPEG/PNG images with train.txt/val.txt and a corrupt file.

  Returns:
    The path of the corrupt image (listed in both lists).
  """
  rng = np.random.default_rng(0)
  bad = os.path.join(folder, 'train', 'broken.JPEG')
  for split, n in (('train', n_train), ('val', n_val)):
    os.makedirs(os.path.join(folder, split), exist_ok=True)
    lines = []
    for i in range(n):
      img = rng.integers(0, 60, (30 + i % 7, 40 - i % 5, 3), dtype=np.uint8)
      img[..., i % classes] += 150
      name = f'{split}/img{i}.' + ('JPEG' if i % 2 else 'png')
      Image.fromarray(img).save(os.path.join(folder, name),
                                format='JPEG' if i % 2 else 'PNG')
      lines.append(f'{name},{i % classes}')
    lines.insert(1, 'train/broken.JPEG,0')
    with open(os.path.join(folder, f'{split}.txt'), 'w') as f:
      f.write('\n'.join(lines) + '\n')
  with open(bad, 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 truncated')
  return bad


def spawn(relpath, *args):
  """Starts a program as a subprocess with piped, text output."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  return subprocess.Popen([sys.executable, os.path.join(ROOT, relpath)]
                          + [str(a) for a in args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def differing_keys(path_a, path_b):
  """Keys of two .npz files whose arrays differ (empty when identical)."""
  with np.load(path_a) as a, np.load(path_b) as b:
    keys = set(a.files) | set(b.files)
    return sorted(k for k in keys if k not in a.files or k not in b.files
                  or not np.array_equal(a[k], b[k]))

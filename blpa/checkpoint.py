"""Checkpoints in the reference implementation's ``.npz`` format.

Keys ``'0'…'N-1'`` hold the weights in creation order (per layer: BN scale,
bias, kernel, each if present; last the loss-layer bias) and ``'niter'`` the
iteration count, so files move both ways between blpa and the original.
Training state that the original did not save (momentum, running BN
statistics) goes under extra keys that the original ignores.
"""

import errno
import os
import tempfile
import zipfile

import numpy as np


def write_atomic(path, arrays):
  """Writes ``arrays`` to ``path`` as an ``.npz``, atomically.

  The file is written beside ``path`` under a temporary name, flushed to
  disk, then renamed over ``path``: a reader (or a run killed mid-write)
  sees either the old file or the new one, never a partial one.  On any
  failure the temporary file is removed.

  Args:
    path: destination file name (used as given: no suffix is added).
    arrays: dict of name → array.

  Raises:
    IsADirectoryError: if ``path`` is a directory.
    OSError: naming ``path``, if it cannot be written (its folder cannot be
      created or written, the disk is full, ...).
  """
  if os.path.isdir(path):
    raise IsADirectoryError(errno.EISDIR, 'cannot save a checkpoint: the path '
                            'is a directory, give a file name', path)
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise NotADirectoryError(errno.ENOTDIR, 'cannot save a checkpoint: its '
                             f'folder {directory!r} is a file', path)
  tmp = None
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory,
                               prefix='.' + os.path.basename(path) + '.',
                               suffix='.tmp')
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600 files
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    _remove(tmp)
    raise type(e)(e.errno, f'cannot save a checkpoint to {path!r}: '
                  f'{e.strerror or e}', path) from e
  except BaseException:
    _remove(tmp)
    raise


def _remove(tmp):
  """Removes the temporary file ``tmp`` if it was created."""
  if tmp and os.path.exists(tmp):
    os.remove(tmp)


def _umask():
  """The process umask (read by setting it and putting it back)."""
  mask = os.umask(0)
  os.umask(mask)
  return mask


def read(path):
  """Reads a checkpoint into a dict of arrays.

  Args:
    path: the ``.npz`` file.

  Returns:
    dict of name → numpy array.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: if it is not a readable ``.npz`` or has no ``'niter'``.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint {path!r} does not exist')
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f'checkpoint {path!r} is not a readable .npz file '
                     f'({type(e).__name__}: {e})') from e
  if 'niter' not in arrays:
    raise ValueError(f"checkpoint {path!r} has no 'niter' entry: not a blpa "
                     f'checkpoint (keys: {sorted(arrays)[:8]}...)')
  return arrays


def check_weights(path, arrays, names, shapes):
  """Checks that a checkpoint holds exactly the expected weights.

  Args:
    path: file name, for messages.
    arrays: what :func:`read` returned.
    names: description of each weight (e.g. ``'layer 3 kernel'``).
    shapes: expected shape of each weight.

  Raises:
    ValueError: naming the first missing, extra or mis-shaped weight.
  """
  count = sum(1 for k in arrays if k.isdigit())
  if count != len(shapes):
    raise ValueError(f'checkpoint {path!r} holds {count} weights but the '
                     f'network has {len(shapes)}: it was saved from a '
                     'different network')
  for i, (name, shape) in enumerate(zip(names, shapes)):
    if str(i) not in arrays:
      raise ValueError(f'checkpoint {path!r} has no weight {i} ({name})')
    got = tuple(arrays[str(i)].shape)
    if got != tuple(shape):
      raise ValueError(f'checkpoint {path!r}: weight {i} ({name}) has shape '
                       f'{got}, the network expects {tuple(shape)}')

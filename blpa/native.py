"""The package's native op library, loaded once and shared by every module.

``bash make.sh`` builds ``blpa/_quant_ops.so`` from every ``ops/*.cc`` (and,
with CUDA, ``ops/*.cu.cc``): the quantization ops of :mod:`blpa.quant`, and
the other native ops of the package. :func:`library` loads it on first use;
``BLPA_QUANT_SO`` names another path, and ``BLPA_PY_OPS=1`` selects the
pure-TF fallbacks that every op has. A library that cannot be loaded warns
once (naming the path, the error and the fix) and the fallbacks are used.
"""

import logging
import os
import threading
import warnings

import tensorflow as tf

__all__ = ["library", "backend", "so_path"]

_logger = logging.getLogger(__name__)
# Not "quant.so": Python would import that, ahead of quant.py, as blpa.quant.
_DEFAULT_SO = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "_quant_ops.so")

_lock = threading.Lock()
_lib = None
_loaded = False  # whether the backend has been chosen


def so_path():
  """Path of the library that :func:`library` loads."""
  return os.environ.get("BLPA_QUANT_SO") or _DEFAULT_SO


def library():
  """Returns the loaded op library, or None when the fallbacks are in use.

  Chooses the backend on the first call: ``BLPA_PY_OPS=1`` selects the
  fallback; otherwise the library is loaded, and a failure warns once.
  """
  global _lib, _loaded
  with _lock:
    if _loaded:
      return _lib
    if os.environ.get("BLPA_PY_OPS", "") not in ("", "0"):
      _logger.info("blpa: BLPA_PY_OPS is set; using the pure-TF ops")
    else:
      path = so_path()
      try:
        _lib = tf.load_op_library(path)
      except Exception as err:  # pylint: disable=broad-except
        warnings.warn(
            f"blpa.quant: could not load the native ops from {path!r}: "
            f"{err}. Using the pure-TF fallback (same results, slower). "
            "Build the library with `bash make.sh` in the repository "
            "root, or point BLPA_QUANT_SO at a built _quant_ops.so; set "
            "BLPA_PY_OPS=1 to use the fallback without this warning.",
            RuntimeWarning,
            stacklevel=4,
        )
    _loaded = True
    return _lib


def library_with(op_name):
  """The loaded library if it has ``op_name``, else None.

  A library built from older sources lacks the newer ops; their callers
  then use their fallbacks.

  Args:
    op_name: the op's Python name in the library, e.g. ``'blpa_bn_relu_grad'``.
  """
  lib = library()
  return lib if lib is not None and hasattr(lib, op_name) else None


def cpu_library_with(op_name):
  """:func:`library_with`, or None when a GPU is present (for ops that have
  only CPU kernels: their callers then use the fallback, which runs on the
  GPU)."""
  lib = library_with(op_name)
  if lib is None or tf.config.list_logical_devices("GPU"):
    return None
  return lib


def reset_for_tests():
  """Forgets the chosen backend so that the next call chooses again."""
  global _lib, _loaded
  with _lock:
    _lib = None
    _loaded = False


def backend():
  """Which implementation the ops use.

  Returns:
    ``"native"`` when ``blpa/_quant_ops.so`` (or ``BLPA_QUANT_SO``) is loaded,
    ``"python"`` when the pure-TF fallbacks are used.
  """
  return "native" if library() is not None else "python"

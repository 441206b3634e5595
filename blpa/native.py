"""The package's native op library, loaded once and shared by every module.

``bash make.sh`` builds ``blpa/_quant_ops.so`` from every ``ops/*.cc`` (and,
with CUDA, ``ops/*.cu.cc``): the quantization ops of :mod:`blpa.quant`, and
the other native ops of the package. :func:`library` loads it on first use;
``BLPA_QUANT_SO`` names another path, and ``BLPA_PY_OPS=1`` selects the
pure-TF fallbacks that every op has. A library that cannot be loaded warns
once (naming the path, the error and the fix) and the fallbacks are used.

A custom-op library works only with the TensorFlow it was compiled against
(TensorFlow's C++ ABI changes between minor versions) and on its platform.
``make.sh`` records both next to the library, in ``_build_info.json``
(:func:`build_info`). Before loading, :func:`library` checks the record:

- built for another platform (``system``/``machine``): never loaded;
- built for another TensorFlow minor version (2.20 vs 2.21): not loaded;

both warn once, saying how to rebuild, and the fallbacks are used. A library
without a record (built before records existed, or by hand) is loaded as
before, with a warning that its TensorFlow version could not be checked: a
wrong one then shows up as a load error (an undefined symbol), which also
falls back.
"""

import json
import logging
import os
import platform
import re
import threading
import warnings

import tensorflow as tf

__all__ = ["library", "backend", "so_path", "build_info", "build_info_path"]

_logger = logging.getLogger(__name__)
# Not "quant.so": Python would import that, ahead of quant.py, as blpa.quant.
_DEFAULT_SO = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "_quant_ops.so")

# Written by make.sh next to the library.
_BUILD_INFO = "_build_info.json"
_REBUILD = (
    "Rebuild it for this TensorFlow: `bash make.sh` in a source checkout, "
    "or reinstall blpa from source against the installed TensorFlow "
    "(`pip install --no-build-isolation --no-deps --force-reinstall "
    "/path/to/blpa-source`); set BLPA_PY_OPS=1 to use the fallback "
    "without this warning.")

_lock = threading.Lock()
_lib = None
_loaded = False  # whether the backend has been chosen


def so_path():
  """Path of the library that :func:`library` loads."""
  return os.environ.get("BLPA_QUANT_SO") or _DEFAULT_SO


def build_info_path(path=None):
  """Path of the build record of the library at ``path`` (default:
  :func:`so_path`): ``_build_info.json`` in the library's folder."""
  return os.path.join(os.path.dirname(os.path.abspath(path or so_path())),
                      _BUILD_INFO)


def build_info(path=None):
  """What the library at ``path`` (default: :func:`so_path`) was built for.

  Returns:
    The record ``make.sh`` wrote next to it, a dict with at least
    ``tensorflow`` (the version, e.g. ``"2.21.0"``), ``system`` and
    ``machine`` (``platform.system()``/``.machine()`` at build time), and
    ``platform``, ``python``, ``gpu_kernels``; None when there is no
    readable record.
  """
  try:
    with open(build_info_path(path), encoding="utf-8") as f:
      info = json.load(f)
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) else None


def _minor(version):
  """``"2.21.0"`` -> ``(2, 21)``; None for an unparsable version."""
  m = re.match(r"\s*(\d+)\.(\d+)", str(version))
  return (int(m.group(1)), int(m.group(2))) if m else None


def _check_build_info(path):
  """Whether to load the library at ``path``, and what to warn about.

  Returns:
    ``(load, message)``: ``message`` is None when the record matches.
  """
  info = build_info(path)
  record = build_info_path(path)
  if info is None or "tensorflow" not in info:
    return True, (
        f"blpa.native: {path!r} has no build record ({record!r} is missing "
        "or unreadable), so the TensorFlow version it was built for cannot "
        f"be checked; loading it with TensorFlow {tf.__version__} anyway. "
        "`bash make.sh` rebuilds it and writes the record.")
  here = (platform.system(), platform.machine())
  built = (info.get("system"), info.get("machine"))
  if built != here:
    return False, (
        f"blpa.native: {path!r} was built for {built[0]} {built[1]} "
        f"({info.get('platform')}), not for this {here[0]} {here[1]}; it is "
        "not loaded, and the pure-TF fallback is used (same results, "
        f"slower). {_REBUILD}")
  want, got = _minor(info["tensorflow"]), _minor(tf.__version__)
  if want is None or want != got:
    return False, (
        f"blpa.native: {path!r} was built for TensorFlow "
        f"{info['tensorflow']}, but TensorFlow {tf.__version__} is running; "
        "a custom-op library works only with the TensorFlow minor version "
        "it was compiled against, so it is not loaded, and the pure-TF "
        f"fallback is used (same results, slower). {_REBUILD}")
  return True, None


def _load(path):
  """Loads the library at ``path`` if its record allows; warns once (per
  choice of the backend) about a refusal, a failure or a missing record.

  Returns:
    The loaded library, or None.
  """
  load, note = True, None
  if os.path.exists(path):  # else the load fails, and says so below
    load, note = _check_build_info(path)
  if not load:
    warnings.warn(note, RuntimeWarning, stacklevel=5)
    return None
  try:
    lib = tf.load_op_library(path)
  except Exception as err:  # pylint: disable=broad-except
    warnings.warn(
        f"blpa.quant: could not load the native ops from {path!r}: "
        f"{err}. Using the pure-TF fallback (same results, slower). "
        "Build the library with `bash make.sh` in the repository "
        "root, or point BLPA_QUANT_SO at a built _quant_ops.so; set "
        "BLPA_PY_OPS=1 to use the fallback without this warning.",
        RuntimeWarning,
        stacklevel=5,
    )
    return None
  if note:  # loaded without a record: say that it could not be checked
    warnings.warn(note, RuntimeWarning, stacklevel=5)
  return lib


# Plain Python bookkeeping, also called while a tf.function is traced: not
# for AutoGraph (which cannot read the source of Python 3.11's frozen
# os.path and would warn).
@tf.autograph.experimental.do_not_convert
def library():
  """Returns the loaded op library, or None when the fallbacks are in use.

  Chooses the backend on the first call: ``BLPA_PY_OPS=1`` selects the
  fallback; otherwise the library is loaded if its build record (see the
  module's docstring) allows, and a refusal or a failure warns once.
  """
  global _lib, _loaded
  with _lock:
    if _loaded:
      return _lib
    if os.environ.get("BLPA_PY_OPS", "") not in ("", "0"):
      _logger.info("blpa: BLPA_PY_OPS is set; using the pure-TF ops")
    else:
      _lib = _load(so_path())
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

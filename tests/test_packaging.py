"""The library's build record and the incremental build (make.sh).

blpa/native.py loads blpa/_quant_ops.so only when its record
(_build_info.json, written by make.sh) names this platform and the running
TensorFlow minor version; the loader state is process-global, so each test
resets it (native.reset_for_tests) and points BLPA_QUANT_SO at a copy of the
library with a record of its own. tf.load_op_library is wrapped to see
whether a library was loaded at all.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf

from blpa import native, quant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(21)
ACT = RNG.normal(size=(2, 3, 4, 5)).astype(np.float32)
OFF = RNG.normal(size=5).astype(np.float32) * 0.1


def _other_minor():
  major, minor = tf.__version__.split(".")[:2]
  return f"{major}.{int(minor) - 1}.0"


def _record(**changes):
  """A record for the running TensorFlow and platform, with ``changes``."""
  info = {
      "library": "_quant_ops.so",
      "tensorflow": tf.__version__,
      "tensorflow_minor": ".".join(tf.__version__.split(".")[:2]),
      "system": platform.system(),
      "machine": platform.machine(),
      "platform": "test-platform",
      "python": "%d.%d" % sys.version_info[:2],
  }
  info.update(changes)
  return info


@pytest.fixture
def loader(monkeypatch):
  """Resets the backend before and after; counts tf.load_op_library calls."""
  calls = []
  real = tf.load_op_library

  def spy(path):
    calls.append(path)
    return real(path)

  monkeypatch.delenv("BLPA_PY_OPS", raising=False)
  monkeypatch.delenv("BLPA_QUANT_SO", raising=False)
  monkeypatch.setattr(native.tf, "load_op_library", spy)
  native.reset_for_tests()
  yield calls
  native.reset_for_tests()


def _library_copy(tmp_path, record):
  """A copy of the built library in tmp_path, with ``record`` (or none)."""
  if not os.path.exists(native.so_path()):
    pytest.skip(f"native library not built ({native.so_path()})")
  path = tmp_path / "_quant_ops.so"
  shutil.copy(native.so_path(), path)
  if record is not None:
    (tmp_path / "_build_info.json").write_text(json.dumps(record))
  return str(path)


def _native_codes():
  """save_act's codes from the native library (or skip)."""
  native.reset_for_tests()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    if native.backend() != "native":
      pytest.skip(f"native library not loadable ({native.so_path()})")
  codes = quant.save_act(ACT, OFF, 4).numpy()
  native.reset_for_tests()
  return codes


def _backend_and_warnings():
  """backend() twice (the second must not warn again) and its warnings."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = native.backend()
    codes = quant.save_act(ACT, OFF, 4).numpy()
    assert native.backend() == got
  return got, codes, [str(w.message) for w in caught
                      if issubclass(w.category, RuntimeWarning)]


def test_built_library_has_a_matching_record():
  if not os.path.exists(native.so_path()):
    pytest.skip(f"native library not built ({native.so_path()})")
  info = native.build_info()
  assert info is not None, native.build_info_path()
  assert info["tensorflow"].split(".")[:2] == tf.__version__.split(".")[:2]
  assert (info["system"], info["machine"]) == (platform.system(),
                                               platform.machine())


def test_other_tensorflow_version_is_not_loaded(loader, tmp_path, monkeypatch):
  want = _native_codes()
  loader.clear()
  other = _other_minor()
  path = _library_copy(tmp_path, _record(tensorflow=other))
  monkeypatch.setenv("BLPA_QUANT_SO", path)
  got, codes, msgs = _backend_and_warnings()
  assert got == "python"
  assert not loader, loader  # never handed to tf.load_op_library
  assert len(msgs) == 1, msgs
  assert f"TensorFlow {other}" in msgs[0] and tf.__version__ in msgs[0]
  assert "bash make.sh" in msgs[0] and "--no-build-isolation" in msgs[0]
  np.testing.assert_array_equal(codes, want)  # the fallback: same codes


def test_other_platform_is_never_loaded(loader, tmp_path, monkeypatch):
  want = _native_codes()
  loader.clear()
  path = _library_copy(tmp_path, _record(machine="not-" + platform.machine(),
                                         platform="elsewhere-arch"))
  monkeypatch.setenv("BLPA_QUANT_SO", path)
  got, codes, msgs = _backend_and_warnings()
  assert got == "python"
  assert not loader, loader
  assert len(msgs) == 1 and "elsewhere-arch" in msgs[0], msgs
  np.testing.assert_array_equal(codes, want)
  # Another system, same machine: not loaded either.
  native.reset_for_tests()
  (tmp_path / "_build_info.json").write_text(
      json.dumps(_record(system="NotThisOS")))
  got, _, msgs = _backend_and_warnings()
  assert got == "python" and not loader and len(msgs) == 1, msgs


def test_unparsable_tensorflow_version_is_not_loaded(loader, tmp_path,
                                                     monkeypatch):
  path = _library_copy(tmp_path, _record(tensorflow="unknown"))
  monkeypatch.setenv("BLPA_QUANT_SO", path)
  got, _, msgs = _backend_and_warnings()
  assert got == "python" and not loader and len(msgs) == 1, msgs


def _fake_library(tmp_path, monkeypatch, record):
  """A file that stands for a library; tf.load_op_library returns a stub."""
  path = tmp_path / "_quant_ops.so"
  path.write_bytes(b"not a library")
  if record is not None:
    (tmp_path / "_build_info.json").write_text(json.dumps(record))
  calls = []
  monkeypatch.setattr(native.tf, "load_op_library",
                      lambda p: calls.append(p) or object())
  monkeypatch.setenv("BLPA_QUANT_SO", str(path))
  native.reset_for_tests()
  return str(path), calls


def test_matching_record_is_loaded_without_warning(loader, tmp_path,
                                                   monkeypatch):
  path, calls = _fake_library(tmp_path, monkeypatch, _record())
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert native.backend() == "native"
  assert calls == [path]
  assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_missing_record_loads_and_says_so(loader, tmp_path, monkeypatch):
  path, calls = _fake_library(tmp_path, monkeypatch, None)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert native.backend() == "native"
    native.backend()
  assert calls == [path]
  msgs = [str(w.message) for w in caught]
  assert len(msgs) == 1 and "no build record" in msgs[0], msgs
  assert "bash make.sh" in msgs[0]


def test_broken_record_counts_as_missing(loader, tmp_path, monkeypatch):
  path, calls = _fake_library(tmp_path, monkeypatch, None)
  (tmp_path / "_build_info.json").write_text("{not json")
  assert native.build_info(path) is None
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert native.backend() == "native"
  assert calls == [path] and len(caught) == 1


# ---------------------------------------------------------------------------
# make.sh's stamps, with stand-in compilers that only write their outputs.

FAKE_COMPILER = r"""#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$(dirname "$0")/calls.log"
if [[ "$1" == --version ]]; then echo "fake compiler 1.0"; exit 0; fi
out="" prev=""
for a in "$@"; do [[ "$prev" == -o ]] && out="$a"; prev="$a"; done
if [[ -n "$out" && "$out" != /dev/null ]]; then
  echo "$*" > "$out"
  for a in "$@"; do
    if [[ "$a" == *.cc || "$a" == *.cu ]]; then cat "$a" >> "$out"; fi
  done
fi
"""


def test_make_sh_rebuilds_only_what_changed(tmp_path):
  tree = tmp_path / "tree"
  (tree / "blpa").mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, "make.sh"), tree)
  shutil.copytree(os.path.join(ROOT, "ops"), tree / "ops")
  for name in ("fakecxx", "fakenvcc"):
    (tree / name).write_text(FAKE_COMPILER)
    (tree / name).chmod(0o755)
  log = tree / "calls.log"

  def run(**env):
    log.write_text("")
    full = dict(os.environ, PYTHON=sys.executable, CXX=str(tree / "fakecxx"),
                NVCC=str(tree / "fakenvcc"), CUDA_HOME=str(tmp_path),
                CXXFLAGS="", NVCC_FLAGS="")
    full.update(env)
    result = subprocess.run(["bash", str(tree / "make.sh")], env=full,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [c for c in log.read_text().splitlines()
             if "--version" not in c]
    return calls, result.stdout

  srcs = sorted(f for f in os.listdir(tree / "ops") if f.endswith(".cc"))
  cpu = [f for f in srcs if not f.endswith(".cu.cc")]
  harnesses = [f for f in os.listdir(tree / "ops") if f.endswith(".cu")]
  calls, _ = run()
  # CPU objects, the link, standalone CUDA objects, harnesses, syntax checks
  # (the TF here is the CPU one: no CUDA objects inside the library).
  n_all = len(cpu) + 1 + (len(srcs) - len(cpu)) + len(harnesses) + len(cpu)
  assert len(calls) == n_all, calls
  info = json.loads((tree / "blpa" / "_build_info.json").read_text())
  assert info["tensorflow"] == tf.__version__
  assert info["machine"] == platform.machine()

  calls, out = run()
  assert calls == [], calls
  assert "nothing recompiled" in out

  # One source changed: its object, its syntax check and the link.
  with open(tree / "ops" / "mask_ops.cc", "a") as f:
    f.write("\n// changed\n")
  calls, _ = run()
  assert len(calls) == 3 and all("mask_ops.cc" in c or "-shared" in c
                                 for c in calls), calls

  # A CUDA source: its standalone object and the harnesses (they include it).
  with open(tree / "ops" / "quant_kernels.cu.cc", "a") as f:
    f.write("\n// changed\n")
  calls, _ = run()
  assert len(calls) == 1 + len(harnesses), calls

  # Other compiler flags: every g++ output again.
  calls, _ = run(CXXFLAGS="-DSOMETHING")
  assert len(calls) == len(cpu) + 1, calls

  # A deleted output is rebuilt even though its stamp matches.
  os.remove(tree / "build" / "cuda_check")
  calls, _ = run(CXXFLAGS="-DSOMETHING")
  assert len(calls) == 1 and "cuda_check" in calls[0], calls



def test_library_in_a_tf_function_gives_no_autograph_warning(loader):
  """library() runs while tf.functions are traced: AutoGraph must leave it
  alone (else TF logs "AutoGraph could not transform <function ...>")."""
  import logging  # pylint: disable=import-outside-toplevel
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  logger = logging.getLogger("tensorflow")
  logger.addHandler(handler)

  @tf.function
  def step(x):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      native.backend()
    return x + 1

  try:
    step(tf.constant(1.0))
  finally:
    logger.removeHandler(handler)
  msgs = [r.getMessage() for r in records]
  assert not [m for m in msgs if "AutoGraph" in m], msgs

"""Test set-up: reproducible TF numerics, the repository on sys.path, and
the native op library required unless the run says otherwise.

oneDNN is turned off (``TF_ENABLE_ONEDNN_OPTS=0``) before TensorFlow is
imported: the golden reference runs were made with TF's own convolution
kernels, and with them blpa reproduces the reference bit for bit.

The native library (``blpa/_quant_ops.so``) is required by default: a test
that would skip because it cannot be loaded fails instead, naming the
library, so that a broken build cannot pass as a green run with the native
cases skipped. ``BLPA_REQUIRE_NATIVE=0`` (or ``BLPA_PY_OPS=1``, which runs
everything on the pure-TF fallbacks) turns that off; those skips then say
why, and pytest lists their reasons (``-rs`` is added).
"""

import os
import sys

os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault(
    'BLPA_REQUIRE_NATIVE', '0' if os.environ.get('BLPA_PY_OPS') == '1' else '1')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


import numpy as np  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
  """Every test starts from the same random state."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.random.set_seed(0)
  np.random.seed(0)


#: What the tests' skips say when the library cannot be loaded.
NATIVE_SKIP_WORDS = ('native library not built', 'native library not loadable')


def native_required():
  """Whether this run requires the native library (see the module doc)."""
  return os.environ.get('BLPA_REQUIRE_NATIVE') == '1'


def pytest_configure(config):
  """Lists every skip's reason in the summary."""
  chars = config.option.reportchars or ''
  if 's' not in chars and 'a' not in chars and 'A' not in chars:
    config.option.reportchars = chars + 's'


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # pylint: disable=unused-argument
  """A skip for a missing native library is a failure when it is required."""
  outcome = yield
  report = outcome.get_result()
  if not report.skipped or not native_required():
    return
  reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple)
               else report.longrepr)
  if any(w in reason for w in NATIVE_SKIP_WORDS):
    report.outcome = 'failed'
    report.longrepr = (
        f'{reason}\nThe native library is required (BLPA_REQUIRE_NATIVE is '
        'not 0): build it with `bash make.sh`, or run with '
        'BLPA_REQUIRE_NATIVE=0 (or BLPA_PY_OPS=1) to allow the skip.')

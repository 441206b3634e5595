"""Test set-up: reproducible TF numerics and the repository on sys.path.

oneDNN is turned off (``TF_ENABLE_ONEDNN_OPTS=0``) before TensorFlow is
imported: the golden reference runs were made with TF's own convolution
kernels, and with them blpa reproduces the reference bit for bit.
"""

import os
import sys

os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

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

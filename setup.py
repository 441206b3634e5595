"""Build hooks for blpa; all metadata is in pyproject.toml.

``pip install .``, ``pip wheel .`` and ``python -m build`` run
``bash make.sh --lib-only`` before the Python files are copied: it compiles
``blpa/_quant_ops.so`` (CPU kernels always, CUDA kernels when TensorFlow is
built with CUDA and nvcc is present) with the TensorFlow of the build
environment, and writes ``blpa/_build_info.json`` beside it. Both go into
the wheel, which is tagged for this platform and Python
(``cp311-cp311-linux_x86_64``), not ``py3-none-any``.

A failed compile fails the build. ``BLPA_NO_OPS=1`` builds a pure
``py3-none-any`` wheel without the library instead (blpa then uses its
pure-TF fallback ops: same results, slower).
"""

import json
import os
import re
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_OPS = os.environ.get('BLPA_NO_OPS', '') not in ('', '0')
OPS_FILES = ['_quant_ops.so', '_build_info.json']


def _declared_tf_minor():
  """The TensorFlow minor version of pyproject's `cpu` extra, e.g. '2.21'."""
  with open(os.path.join(ROOT, 'pyproject.toml'), encoding='utf-8') as f:
    m = re.search(r'tensorflow-cpu>=(\d+\.\d+)', f.read())
  return m.group(1) if m else None


class BuildWithOps(build_py):
  """build_py that compiles ``blpa/_quant_ops.so`` first."""

  def finalize_options(self):
    super().finalize_options()
    if NO_OPS:  # a library left by an earlier build stays out
      self.exclude_package_data = {'blpa': list(OPS_FILES)}

  def run(self):
    if NO_OPS:
      print('BLPA_NO_OPS is set: building blpa without its op library',
            file=sys.stderr)
    else:
      env = dict(os.environ, PYTHON=sys.executable)
      result = subprocess.run(['bash', os.path.join(ROOT, 'make.sh'),
                               '--lib-only'], cwd=ROOT, env=env, check=False)
      if result.returncode:
        raise SystemExit(
            'error: `bash make.sh --lib-only` failed (see above), so '
            'blpa/_quant_ops.so could not be built. Install a C++ compiler '
            'and TensorFlow\'s build requirements, or set BLPA_NO_OPS=1 to '
            'build blpa without its op library (pure-TF fallback ops).')
      self._check_tf_version()
    super().run()

  @staticmethod
  def _check_tf_version():
    with open(os.path.join(ROOT, 'blpa', '_build_info.json'),
              encoding='utf-8') as f:
      built = json.load(f)['tensorflow_minor']
    declared = _declared_tf_minor()
    if declared and built != declared:
      print(f'warning: the op library was built against TensorFlow {built}, '
            f'but the `tensorflow`/`cpu` extras of pyproject.toml name '
            f'{declared}; blpa will load the library only with TensorFlow '
            f'{built} (see blpa/_build_info.json)', file=sys.stderr)


class BinaryDistribution(Distribution):
  """A distribution with a platform-specific library: the wheel is tagged
  for this platform and Python, and installs into platlib."""

  def has_ext_modules(self):
    return not NO_OPS


setup(cmdclass={'build_py': BuildWithOps}, distclass=BinaryDistribution)

"""Installs blpa; building it also compiles the quantization ops.

``pip install .`` runs ``make.sh`` (CPU kernels always, CUDA kernels when
TensorFlow is built with CUDA and nvcc is present).  If the ops cannot be
built, blpa still installs and uses its pure-TensorFlow fallback, with a
warning when first used.
"""

import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildWithOps(build_py):
  """build_py that compiles ``blpa/_quant_ops.so`` first."""

  def run(self):
    result = subprocess.run(['bash', 'make.sh'], check=False)
    if result.returncode:
      print('warning: make.sh failed; blpa will use its pure-TF fallback ops',
            file=sys.stderr)
    super().run()


setup(
    name='blpa',
    version='0.1.0',
    description='Backprop with approximate activations: memory-efficient '
                'training of deep residual networks in TensorFlow 2',
    packages=find_packages(include=['blpa', 'blpa.*']),
    package_data={'blpa': ['_quant_ops.so']},
    python_requires='>=3.9',
    install_requires=['numpy>=1.23'],
    extras_require={'tools': ['matplotlib>=3.5', 'scikit-learn>=1.0',
                              'tensorflow-datasets>=4.9']},
    entry_points={'console_scripts': ['blpa-plot = blpa.plot:main',
                                      'blpa-demo = blpa.demo:main']},
    cmdclass={'build_py': BuildWithOps},
)

"""Shared pieces of the benchmark: paths, methods, subprocess runs, stats."""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The compared configurations: (key, label, blpa.memory method, qtype).
METHODS = (
    ('keras', 'tf.keras model (GradientTape, SGD momentum)', 'keras', 0),
    ('keras_recompute', 'tf.keras + recompute_grad', 'keras_recompute', 0),
    ('autodiff', 'autodiff twin (GradientTape)', 'autodiff', 0),
    ('recompute', 'autodiff twin + recompute_grad', 'recompute', 0),
    ('blpa_q0', 'blpa qtype 0', 'blpa', 0),
    ('blpa_q8', 'blpa qtype 8', 'blpa', 8),
    ('blpa_q4', 'blpa qtype 4', 'blpa', 4),
)
LABELS = {key: label for key, label, _, _ in METHODS}
#: The method every time and memory ratio is taken against.
BASELINE = 'keras'
MIB = 2**20
GIB = 2**30


def depth(rblocks):
  """Layers of the CIFAR ResNet with ``rblocks`` blocks per stage."""
  return 9 * rblocks + 2


def onednn():
  """The run's ``TF_ENABLE_ONEDNN_OPTS``: the caller's, else ``'1'``.

  oneDNN is on by default in TensorFlow on x86 (what users run); every
  measurement subprocess of one run gets the same setting.
  """
  return os.environ.get('TF_ENABLE_ONEDNN_OPTS', '1')


def env(bfc=False, py_ops=False):
  """Environment of a measurement subprocess.

  Args:
    bfc: start TensorFlow's CPU allocator in BFC mode (peak statistics).
    py_ops: force blpa's pure-TF quantization fallback.
  """
  out = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
             TF_ENABLE_ONEDNN_OPTS=onednn(),
             PYTHONPATH=os.pathsep.join(
                 p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  if bfc:
    out['TF_CPU_ALLOCATOR_USE_BFC'] = 'true'
  else:
    out.pop('TF_CPU_ALLOCATOR_USE_BFC', None)
  if py_ops:
    out['BLPA_PY_OPS'] = '1'
  else:
    out.pop('BLPA_PY_OPS', None)
  return out


def run_json(args, environ, timeout, log=None):
  """Runs ``python args...`` in the repository root; parses its last line.

  Returns:
    The printed JSON object, with ``wall_s`` added; on failure a dict with
    ``error`` (exit status or timeout, and the end of stderr).
  """
  cmd = [sys.executable] + list(args)
  if log:
    log('  $ ' + ' '.join(args))
  start = time.time()
  try:
    proc = subprocess.run(cmd, env=environ, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout} s'}
  wall = time.time() - start
  if proc.returncode != 0:
    why = (f'killed by signal {-proc.returncode} (out of memory?)'
           if proc.returncode < 0 else f'exit status {proc.returncode}')
    tail = '\n'.join(proc.stderr.strip().splitlines()[-5:])
    return {'error': f'{why}: {tail}', 'wall_s': wall}
  lines = [l for l in proc.stdout.strip().splitlines() if l.startswith('{')]
  if not lines:
    return {'error': 'no JSON output: ' + proc.stdout[-500:], 'wall_s': wall}
  result = json.loads(lines[-1])
  result['wall_s'] = wall
  return result


def cosine(a, b):
  """Cosine similarity of two arrays (1.0 when both are zero)."""
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  if na == 0 and nb == 0:
    return 1.0
  if na == 0 or nb == 0:
    return 0.0
  return float(np.dot(a, b) / (na * nb))


def relative_error(got, want):
  """``‖got − want‖ / ‖want‖`` (0 when both are zero)."""
  got = np.ravel(got).astype(np.float64)
  want = np.ravel(want).astype(np.float64)
  norm = np.linalg.norm(want)
  diff = np.linalg.norm(got - want)
  if norm == 0:
    return 0.0 if diff == 0 else float('inf')
  return float(diff / norm)


def sync():
  """Waits for queued device work (GPU); a no-op on CPU."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  fn = getattr(getattr(tf.test, 'experimental', None), 'sync_devices', None)
  if fn is not None and tf.config.list_physical_devices('GPU'):
    fn()


def network_parser(doc, batch_help=None):
  """Argument parser with the network options of the workers.

  ``--rblocks`` (blocks per stage, default 18: ResNet-164), ``--batch``
  (default 128) and ``--size`` (image height and width, default 32).
  """
  parser = argparse.ArgumentParser(description=doc.split('\n')[0])
  parser.add_argument('--rblocks', type=int, default=18)
  parser.add_argument('--batch', type=int, default=128, help=batch_help)
  parser.add_argument('--size', type=int, default=32)
  return parser


def print_json(obj):
  """Prints a worker's result as one JSON line (what run_json parses)."""
  print(json.dumps(obj))
  sys.stdout.flush()

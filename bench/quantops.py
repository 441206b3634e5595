"""Throughput of blpa's quantization ops against a plain memory copy.

The C++ kernels and the pure-TF fallback (selected through ``BLPA_PY_OPS``
and ``blpa.quant``'s backend reset, as the tests do) run in one process,
interleaved call by call, so that load from other processes affects both
alike.  Each op is timed eagerly (one op call) and inside a
``tf.function`` (where the fallback's many small ops run as one graph, its
best case); the faster of the two counts.  Prints one JSON line.

    python -m bench.quantops --shape 128 32 32 64
"""

import argparse
import contextlib
import os
import time

import numpy as np
import tensorflow as tf

from bench import common
from blpa import quant

BACKENDS = ('native', 'python')


@contextlib.contextmanager
def backend(name):
  """Runs the block with ``blpa.quant`` using backend ``name``."""
  old = os.environ.get('BLPA_PY_OPS')
  os.environ['BLPA_PY_OPS'] = '1' if name == 'python' else '0'
  quant._reset_for_tests()  # pylint: disable=protected-access
  try:
    if quant.backend() != name:
      raise RuntimeError(f'blpa.quant: backend {name!r} is not available '
                         '(build the native ops with `bash make.sh`)')
    yield
  finally:
    if old is None:
      os.environ.pop('BLPA_PY_OPS', None)
    else:
      os.environ['BLPA_PY_OPS'] = old
    quant._reset_for_tests()  # pylint: disable=protected-access


def _variants(x, offset, nbits):
  """``{(backend, op, mode): fn}`` for save/restore, eager/function.

  Functions are traced under their backend here; eager calls pick the
  backend when called, so ``measure`` switches it around them.
  """
  out = {}
  for name in BACKENDS:
    with backend(name):
      codes = quant.save_act(x, offset, nbits)
      save_fn = tf.function(lambda a, o: quant.save_act(a, o, nbits))
      restore_fn = tf.function(lambda c, o: quant.restore_act(c, o, nbits))
      save_fn(x, offset)
      restore_fn(codes, offset)
    out[name, 'save', 'eager'] = lambda: quant.save_act(x, offset, nbits)
    out[name, 'restore', 'eager'] = (
        lambda c=codes: quant.restore_act(c, offset, nbits))
    out[name, 'save', 'function'] = (
        lambda f=save_fn: f(x, offset))
    out[name, 'restore', 'function'] = (
        lambda f=restore_fn, c=codes: f(c, offset))
  return out


def measure(fns, reps, warmup=2):
  """Median ms of each ``fns[key]()``, interleaved over ``reps`` rounds.

  Keys are ``(backend or None, ...)``; a backend is set around its calls.
  """
  times = {key: [] for key in fns}
  for r in range(warmup + reps):
    for key, fn in fns.items():
      ctx = backend(key[0]) if key[0] else contextlib.nullcontext()
      with ctx:
        common.sync()
        start = time.perf_counter()
        fn()
        common.sync()
        if r >= warmup:
          times[key].append(time.perf_counter() - start)
  return {key: 1e3 * float(np.median(t)) for key, t in times.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shape', type=int, nargs=4, default=[128, 32, 32, 64])
  parser.add_argument('--reps', type=int, default=30)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  x = tf.constant(rng.standard_normal(args.shape).astype(np.float32))
  offset = tf.constant(rng.uniform(-1, 1, args.shape[3]).astype(np.float32))
  src = x.numpy()
  dst = np.empty_like(src)
  elements = int(np.prod(args.shape))
  result = {'shape': args.shape, 'act_bytes': 4 * elements,
            'copy_traffic_bytes': 8 * elements,
            'device': 'GPU:0' if tf.config.list_physical_devices('GPU')
                      else 'CPU:0'}
  result.update({name: {} for name in BACKENDS})
  for nbits in (8, 4):
    fns = _variants(x, offset, nbits)
    fns[None, 'tf_copy'] = lambda: tf.raw_ops.DeepCopy(x=x)
    fns[None, 'numpy_copy'] = lambda: np.copyto(dst, src)
    ms = measure(fns, args.reps)
    code_bytes = quant.compact_bytes(args.shape, nbits)
    for name in BACKENDS:
      # Bytes read + written: save reads floats and writes codes; restore
      # reads codes and writes floats and a one-byte mask.
      result[name][f'q{nbits}'] = {
          f'{op}_{mode}_ms': ms[name, op, mode]
          for op in ('save', 'restore') for mode in ('eager', 'function')}
      result[name][f'q{nbits}'].update({
          'code_bytes': code_bytes,
          'save_traffic_bytes': 4 * elements + code_bytes,
          'restore_traffic_bytes': code_bytes + 5 * elements})
    for copy in ('tf_copy', 'numpy_copy'):
      result.setdefault(f'{copy}_ms', []).append(ms[None, copy])
  for copy in ('tf_copy', 'numpy_copy'):
    result[f'{copy}_ms'] = min(result[f'{copy}_ms'])
  common.print_json(result)


if __name__ == '__main__':
  main()

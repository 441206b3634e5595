"""Speed of the native ``BlpaRoundFixed`` against the pure-TF fallback.

Both run in one process on the same tensor, in interleaved rounds (native,
fallback, alternating order), each call inside a ``tf.function`` and
eagerly; the report is the median per mode and the speedup of the best mode
of each. Prints one JSON line.

    python -m blpa.fixedpoint.timing --shape 128 32 32 64 --repeats 15
"""

import argparse
import json
import time

import numpy as np
import tensorflow as tf

from blpa import native
from blpa.fixedpoint import rounding


def _time_call(fn, x, times, key):
  start = time.perf_counter()
  fn(x)  # eager CPU ops and tf.function calls return when done
  times.setdefault(key, []).append(1e3 * (time.perf_counter() - start))


def measure(shape=(128, 32, 32, 64), repeats=15, bd=8, ad=8):
  """Median milliseconds and speedups per rounding mode.

  Args:
    shape: tensor shape.
    repeats: interleaved rounds (after one warm-up round).
    bd: format, bits before the point.
    ad: format, bits after the point.

  Returns:
    ``{rounding: {'native_ms', 'fallback_ms', 'speedup', ...}}``.

  Raises:
    RuntimeError: the native library is not available.
  """
  lib = native.library()
  if lib is None:
    raise RuntimeError("the native op library is not loaded; build it with "
                       "`bash make.sh` (and unset BLPA_PY_OPS)")
  x = tf.random.normal(shape) * 4
  seed = tf.constant(1234, tf.int64)
  out = {}
  for rnd in rounding.ROUNDINGS:

    def nat(v, rnd=rnd):
      return lib.blpa_round_fixed(v, seed, bd=bd, ad=ad, rounding=rnd)

    def py(v, rnd=rnd):
      return rounding._round_tf(v, bd, ad, rnd, seed)  # pylint: disable=protected-access

    fns = {"native_eager": nat, "fallback_eager": py,
           "native_function": tf.function(nat),
           "fallback_function": tf.function(py)}
    times = {}
    for key, fn in fns.items():  # warm-up (tracing)
      _time_call(fn, x, {}, key)
    for i in range(repeats):
      keys = list(fns) if i % 2 == 0 else list(reversed(list(fns)))
      for key in keys:
        _time_call(fns[key], x, times, key)
    med = {k: float(np.median(v)) for k, v in times.items()}
    best_native = min(med["native_eager"], med["native_function"])
    best_fallback = min(med["fallback_eager"], med["fallback_function"])
    out[rnd] = {**{k + "_ms": v for k, v in med.items()},
                "native_ms": best_native, "fallback_ms": best_fallback,
                "speedup": best_fallback / best_native}
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", type=int, nargs="+", default=[128, 32, 32, 64])
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args(argv)
  result = measure(tuple(args.shape), args.repeats)
  print(json.dumps({"shape": args.shape, "repeats": args.repeats,
                    "format": "Q8.8", **result}))


if __name__ == "__main__":
  main()

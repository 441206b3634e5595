#!/usr/bin/env bash
# Builds blpa/_quant_ops.so, the package's one native op library (loaded by
# blpa/native.py), from every ops/*.cc: op registrations (*_ops.cc) and CPU
# kernels (*_kernels.cc); with CUDA, also every ops/*.cu.cc. (Not
# blpa/quant.so: Python would import that file, before quant.py, as the
# extension module blpa.quant.) Next to it, blpa/_build_info.json records
# what the library was built for (TensorFlow version, platform, Python);
# blpa/native.py does not load a library built for another TensorFlow minor
# version or another platform.
#
#   bash make.sh                  # uses $PYTHON (default python3) for TF flags
#   bash make.sh --lib-only       # only the library (what `pip install` runs)
#   bash make.sh --force          # rebuild everything
#   NVCC=/path/to/nvcc bash make.sh   # NVCC= (empty): no CUDA parts at all
#   NVCC_FLAGS="-arch=sm_90" bash make.sh   # extra nvcc flags (e.g. GPU arch)
#   CXXFLAGS="-march=native" bash make.sh   # extra g++ flags (faster CPU
#                                           # kernels, this machine only)
#
# - CPU kernels: always.
# - CUDA kernels in the library: only when TensorFlow is built with CUDA and nvcc
#   is found (then -DGOOGLE_CUDA=1 and cudart are linked).
# - Whenever nvcc is found (and not --lib-only), the CUDA kernels are also
#   compiled on their own (no TF) together with the GPU check harnesses
#   ops/*.cu (build/cuda_check etc.), so CUDA compile errors show up on
#   machines without a GPU.
#
# Incremental: each output (object, library, harness, syntax check) has a
# stamp, build/stamps/<what>.stamp, holding a hash of its command line
# (compiler flags included; TensorFlow's install paths left out), the
# compilers' versions, the TensorFlow version and the contents of its inputs
# (its source and every ops/*.h; a harness also every ops/*.cu.cc; the
# library its objects). An output whose stamp matches is not rebuilt. What
# TensorFlow reports (flags, version) is cached in build/tf_info.cache, keyed
# on the TensorFlow installation, so a run with nothing to do does not even
# import TensorFlow.
# Exits non-zero on any compile error. Safe to re-run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
LIB_ONLY=0
FORCE=0
for arg in "$@"; do
  case "$arg" in
    --lib-only) LIB_ONLY=1 ;;
    --force) FORCE=1 ;;
    *) echo "usage: bash make.sh [--lib-only] [--force]" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-python3}"
NVCC="${NVCC-$(command -v nvcc || true)}"
NVCC_FLAGS="${NVCC_FLAGS:-}"
CXX="${CXX:-g++}"
CXXFLAGS="${CXXFLAGS:-}"
BUILD="$ROOT/build"
STAMPS="$BUILD/stamps"
OUT="$ROOT/blpa/_quant_ops.so"
INFO="$ROOT/blpa/_build_info.json"
mkdir -p "$BUILD" "$STAMPS"

say() { echo "[make.sh] $*"; }
trap 'say "ERROR: build failed (exit $?) at line $LINENO; see the output above"' ERR

if [[ -e "$ROOT/blpa/quant.so" ]]; then
  # Python would import this file instead of blpa/quant.py.
  rm -f "$ROOT/blpa/quant.so"
  say "removed blpa/quant.so (it shadows blpa/quant.py)"
fi

# --- What TensorFlow tells us ------------------------------------------------
# The installation's fingerprint (found without importing TF: fast); on a
# cache miss, one Python call that imports TF (quiet TF logging).
TF_KEY="$("$PYTHON" - 2>/dev/null <<'PY' || true
import importlib.util, os, sys
spec = importlib.util.find_spec("tensorflow")
origin = spec.origin if spec and spec.origin else ""
pkg = os.path.dirname(origin)
stats = [os.stat(p).st_mtime_ns for p in (origin, pkg) if p and os.path.exists(p)]
if origin:
  print(sys.executable, sys.version.split()[0], origin, *stats)
PY
)"
TF_CACHE="$BUILD/tf_info.cache"
if [[ "$FORCE" != 1 && -n "$TF_KEY" && -f "$TF_CACHE" &&
      "$(head -n1 "$TF_CACHE")" == "$TF_KEY" ]]; then
  TF_INFO="$(tail -n +2 "$TF_CACHE")"
else
  TF_INFO="$(TF_CPP_MIN_LOG_LEVEL=3 "$PYTHON" - 2>"$BUILD/tf_info.log" <<'PY'
import tensorflow as tf
print(" ".join(tf.sysconfig.get_compile_flags()))
print(" ".join(tf.sysconfig.get_link_flags()))
print(int(tf.test.is_built_with_cuda()))
print(tf.__version__)
print(tf.sysconfig.get_include())
print(tf.sysconfig.get_lib())
PY
)" || {
    cat "$BUILD/tf_info.log" >&2
    say "ERROR: could not import tensorflow with PYTHON=$PYTHON"
    exit 1
  }
  if [[ -n "$TF_KEY" ]]; then printf '%s\n%s\n' "$TF_KEY" "$TF_INFO" >"$TF_CACHE"; fi
fi
TF_CFLAGS="$(sed -n 1p <<<"$TF_INFO")"
TF_LFLAGS="$(sed -n 2p <<<"$TF_INFO")"
TF_CUDA="$(sed -n 3p <<<"$TF_INFO")"
TF_VERSION="$(sed -n 4p <<<"$TF_INFO")"
TF_INC="$(sed -n 5p <<<"$TF_INFO")"
TF_LIB="$(sed -n 6p <<<"$TF_INFO")"
# TF's include dirs as system dirs: -Wall then speaks of our code only.
TF_CFLAGS_SYS=()
for flag in $TF_CFLAGS; do
  if [[ "$flag" == -I* ]]; then TF_CFLAGS_SYS+=(-isystem "${flag#-I}")
  else TF_CFLAGS_SYS+=("$flag"); fi
done

CUDA_HOME="${CUDA_HOME:-}"
if [[ -n "$NVCC" && -z "$CUDA_HOME" ]]; then
  # Ask nvcc where it lives (it may be a wrapper script or a symlink).
  top="$("$NVCC" -v --dryrun -x cu -c /dev/null -o /dev/null 2>&1 |
         sed -n 's/^#\$ TOP=//p' | head -n1)"
  CUDA_HOME="$(cd "${top:-$(dirname "$(readlink -f "$NVCC")")/..}" && pwd)"
fi

# --- Stamps ------------------------------------------------------------------
CXX_ID="$("$CXX" --version 2>/dev/null | head -n1 || true)"
NVCC_ID=""
if [[ -n "$NVCC" ]]; then NVCC_ID="$("$NVCC" --version 2>/dev/null | tail -n1 || true)"; fi
HEADERS=(ops/*.h)
CU_CC_ALL=(ops/*.cu.cc)
rebuilt=()
current=()

# key INPUT... -- CMD...: the hash that the output's stamp must hold.
key() {
  local inputs=() cmd f
  while [[ "$1" != "--" ]]; do inputs+=("$1"); shift; done
  shift
  cmd="$*"
  # TF's install paths are left out: the same TF version installed elsewhere
  # (e.g. in pip's isolated build environment) gives the same objects.
  if [[ -n "$TF_INC" ]]; then cmd="${cmd//"$TF_INC"/<tf-include>}"; fi
  if [[ -n "$TF_LIB" ]]; then cmd="${cmd//"$TF_LIB"/<tf-lib>}"; fi
  cmd="${cmd//"$ROOT"/<root>}"
  {
    printf '%s\n' "blpa make.sh stamp v1" "tensorflow $TF_VERSION cuda=$TF_CUDA" \
      "cxx $CXX_ID" "nvcc $NVCC_ID" "cmd $cmd"
    for f in "${inputs[@]}"; do printf '== %s\n' "$f"; cat "$f"; done
  } | sha256sum | cut -d' ' -f1
}

# step OUT LABEL INPUT... -- CMD...: runs CMD unless OUT exists and its stamp
# holds the current key. OUT "-": no file (a syntax check), the stamp counts.
step() {
  local out="$1" label="$2" stamp k
  shift 2
  stamp="$STAMPS/$(tr -c 'A-Za-z0-9._\n-' '_' <<<"$label").stamp"
  k="$(key "$@")"
  while [[ "$1" != "--" ]]; do shift; done
  shift
  if [[ "$FORCE" != 1 && -f "$stamp" && "$(<"$stamp")" == "$k" ]] &&
     [[ "$out" == "-" || -e "$out" ]]; then
    current+=("$label")
    return 0
  fi
  rm -f "$stamp"
  say "$label"
  "$@"
  echo "$k" >"$stamp"
  rebuilt+=("$label")
}

built=()
skipped=()
# Sources: every ops/*.cc except the CUDA ones (*.cu.cc); CUDA: ops/*.cu.cc.
CC_SRCS=()
CU_SRCS=()
for src in ops/*.cc; do
  if [[ "$src" == *.cu.cc ]]; then CU_SRCS+=("$src"); else CC_SRCS+=("$src"); fi
done
OBJS=()
CUDA_DEFS=()
LINK_CUDA=()

# --- CUDA kernels inside the library ----------------------------------------
if [[ "$TF_CUDA" == "1" && -n "$NVCC" ]]; then
  for src in "${CU_SRCS[@]}"; do
    name="$(basename "$src" .cc)"
    # shellcheck disable=SC2086
    step "$BUILD/$name.o" "nvcc: $src (GPU kernels for blpa/_quant_ops.so)" \
      "$src" "${HEADERS[@]}" -- \
      "$NVCC" -x cu -std=c++17 -O3 -fmad=false -c "$src" \
      -o "$BUILD/$name.o" -DGOOGLE_CUDA=1 -Xcompiler -fPIC $NVCC_FLAGS
    OBJS+=("$BUILD/$name.o")
  done
  CUDA_DEFS=(-DGOOGLE_CUDA=1 "-I$CUDA_HOME/include")
  LINK_CUDA=("-L$CUDA_HOME/lib64" -lcudart)
  built+=("GPU kernels in blpa/_quant_ops.so")
elif [[ "$TF_CUDA" != "1" ]]; then
  skipped+=("GPU kernels in blpa/_quant_ops.so: TensorFlow is not built with CUDA")
else
  skipped+=("GPU kernels in blpa/_quant_ops.so: nvcc not found (set NVCC)")
fi

# --- CPU kernels and op registration ----------------------------------------
for src in "${CC_SRCS[@]}"; do
  name="$(basename "$src" .cc)"
  # errors::InvalidArgument and ParallelFor are marked deprecated in TF 2.21.
  # -fno-trapping-math lets GCC vectorize the NaN-safe selects of the
  # quantizer; it changes no computed value (unlike -ffast-math).
  # -ffp-contract=off: no fused multiply-adds, so results stay bit-exact.
  # shellcheck disable=SC2086
  step "$BUILD/$name.o" "$CXX: $src" "$src" "${HEADERS[@]}" -- \
    "$CXX" -O3 -fPIC -fno-trapping-math -ffp-contract=off -Wall \
    -Wno-deprecated-declarations -c "$src" -o "$BUILD/$name.o" \
    "${TF_CFLAGS_SYS[@]}" "${CUDA_DEFS[@]}" $CXXFLAGS
  OBJS+=("$BUILD/$name.o")
done
link_library() {
  "$@" -o "$OUT.tmp"
  mv -f "$OUT.tmp" "$OUT"
}
# shellcheck disable=SC2086
step "$OUT" "link: blpa/_quant_ops.so" "${OBJS[@]}" -- \
  link_library "$CXX" -shared -fPIC -O3 "${OBJS[@]}" $TF_LFLAGS "${LINK_CUDA[@]}"
built+=("blpa/_quant_ops.so (CPU kernels)")

# The record next to the library (read by blpa/native.py); written when it
# changes.
GPU_KERNELS=0
if [[ "$TF_CUDA" == "1" && -n "$NVCC" ]]; then GPU_KERNELS=1; fi
INFO_JSON="$(TF_VERSION="$TF_VERSION" TF_CUDA="$TF_CUDA" GPU_KERNELS="$GPU_KERNELS" \
  "$PYTHON" - <<'PY'
import json, os, platform, sys, sysconfig
v = os.environ["TF_VERSION"]
print(json.dumps({
    "library": "_quant_ops.so",
    "tensorflow": v,
    "tensorflow_minor": ".".join(v.split(".")[:2]),
    "tensorflow_cuda": os.environ["TF_CUDA"] == "1",
    "gpu_kernels": os.environ["GPU_KERNELS"] == "1",
    "system": platform.system(),
    "machine": platform.machine(),
    "platform": sysconfig.get_platform(),
    "python": "%d.%d" % sys.version_info[:2],
    "python_tag": "cp%d%d" % sys.version_info[:2],
}, indent=1, sort_keys=True))
PY
)"
if [[ ! -f "$INFO" || "$(<"$INFO")" != "$INFO_JSON" ]]; then
  printf '%s\n' "$INFO_JSON" >"$INFO"
  say "wrote blpa/_build_info.json (TensorFlow $TF_VERSION)"
fi

# --- Standalone CUDA compile check (no TF) ----------------------------------
if [[ "$LIB_ONLY" == 1 ]]; then
  skipped+=("standalone CUDA compile check and build/cuda_check etc.: --lib-only")
elif [[ -n "$NVCC" ]]; then
  for src in "${CU_SRCS[@]}"; do
    name="$(basename "$src" .cu.cc)"
    # shellcheck disable=SC2086
    step "$BUILD/${name}_standalone.o" "nvcc: standalone compile of $src (no TF)" \
      "$src" "${HEADERS[@]}" -- \
      "$NVCC" -x cu -std=c++17 -O3 -fmad=false -c "$src" \
      -o "$BUILD/${name}_standalone.o" $NVCC_FLAGS
  done
  # GPU check harnesses: every ops/*.cu -> build/<name> (e.g. build/cuda_check).
  for src in ops/*.cu; do
    name="$(basename "$src" .cu)"
    # shellcheck disable=SC2086
    step "$BUILD/$name" "nvcc: $src -> build/$name" \
      "$src" "${HEADERS[@]}" "${CU_CC_ALL[@]}" -- \
      "$NVCC" -std=c++17 -O3 -fmad=false "$src" -o "$BUILD/$name" $NVCC_FLAGS
  done
  if [[ "$TF_CUDA" != "1" ]]; then
    for src in "${CC_SRCS[@]}"; do
      step - "$CXX: syntax check of the GOOGLE_CUDA kernel registrations in $src" \
        "$src" "${HEADERS[@]}" -- \
        "$CXX" -fsyntax-only -Wall -Wno-deprecated-declarations \
        "$src" "${TF_CFLAGS_SYS[@]}" -DGOOGLE_CUDA=1 \
        -isystem "$CUDA_HOME/include"
    done
  fi
  built+=("build/*_standalone.o and the GPU check harnesses build/cuda_check etc. (CUDA compile check)")
else
  skipped+=("standalone CUDA compile check and build/cuda_check: nvcc not found")
fi

if ((${#rebuilt[@]} == 0)); then
  say "up to date, nothing recompiled (TensorFlow $TF_VERSION; ${#current[@]} outputs; --force rebuilds)"
  exit 0
fi
say "rebuilt ${#rebuilt[@]} outputs, ${#current[@]} already up to date"
say "built:"
for b in "${built[@]}"; do say "  + $b"; done
if ((${#skipped[@]})); then
  say "skipped:"
  for s in "${skipped[@]}"; do say "  - $s"; done
fi

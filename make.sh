#!/usr/bin/env bash
# Builds blpa/_quant_ops.so, the package's one native op library (loaded by
# blpa/native.py), from every ops/*.cc: op registrations (*_ops.cc) and CPU
# kernels (*_kernels.cc); with CUDA, also every ops/*.cu.cc. (Not
# blpa/quant.so: Python would import that file, before quant.py, as the
# extension module blpa.quant.)
#
#   bash make.sh                  # uses $PYTHON (default python3) for TF flags
#   NVCC=/path/to/nvcc bash make.sh
#   NVCC_FLAGS="-arch=sm_90" bash make.sh   # extra nvcc flags (e.g. GPU arch)
#   CXXFLAGS="-march=native" bash make.sh   # extra g++ flags (faster CPU
#                                           # kernels, this machine only)
#
# - CPU kernels: always.
# - CUDA kernels in the library: only when TensorFlow is built with CUDA and nvcc
#   is found (then -DGOOGLE_CUDA=1 and cudart are linked).
# - Whenever nvcc is found, the CUDA kernels are also compiled on their own
#   (no TF) together with the GPU check harnesses ops/*.cu (build/cuda_check
#   etc.), so CUDA compile errors show up on machines without a GPU.
# Exits non-zero on any compile error. Safe to re-run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
NVCC_FLAGS="${NVCC_FLAGS:-}"
CXX="${CXX:-g++}"
CXXFLAGS="${CXXFLAGS:-}"
BUILD="$ROOT/build"
OUT="$ROOT/blpa/_quant_ops.so"
mkdir -p "$BUILD"

say() { echo "[make.sh] $*"; }
trap 'say "ERROR: build failed (exit $?) at line $LINENO; see the output above"' ERR

if [[ -e "$ROOT/blpa/quant.so" ]]; then
  # Python would import this file instead of blpa/quant.py.
  rm -f "$ROOT/blpa/quant.so"
  say "removed blpa/quant.so (it shadows blpa/quant.py)"
fi

# One Python call for everything TF tells us (quiet TF logging).
TF_INFO="$(TF_CPP_MIN_LOG_LEVEL=3 "$PYTHON" - 2>"$BUILD/tf_info.log" <<'EOF'
import tensorflow as tf
print(" ".join(tf.sysconfig.get_compile_flags()))
print(" ".join(tf.sysconfig.get_link_flags()))
print(int(tf.test.is_built_with_cuda()))
EOF
)" || {
  cat "$BUILD/tf_info.log" >&2
  say "ERROR: could not import tensorflow with PYTHON=$PYTHON"
  exit 1
}
TF_CFLAGS="$(sed -n 1p <<<"$TF_INFO")"
TF_LFLAGS="$(sed -n 2p <<<"$TF_INFO")"
TF_CUDA="$(sed -n 3p <<<"$TF_INFO")"
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
    say "nvcc: $src (GPU kernels for blpa/_quant_ops.so)"
    # shellcheck disable=SC2086
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
  say "$CXX: $src"
  # errors::InvalidArgument and ParallelFor are marked deprecated in TF 2.21.
  # -fno-trapping-math lets GCC vectorize the NaN-safe selects of the
  # quantizer; it changes no computed value (unlike -ffast-math).
  # -ffp-contract=off: no fused multiply-adds, so results stay bit-exact.
  # shellcheck disable=SC2086
  "$CXX" -O3 -fPIC -fno-trapping-math -ffp-contract=off -Wall \
    -Wno-deprecated-declarations -c "$src" -o "$BUILD/$name.o" \
    "${TF_CFLAGS_SYS[@]}" "${CUDA_DEFS[@]}" $CXXFLAGS
  OBJS+=("$BUILD/$name.o")
done
say "link: blpa/_quant_ops.so"
# shellcheck disable=SC2086
"$CXX" -shared -fPIC -O3 "${OBJS[@]}" -o "$OUT.tmp" $TF_LFLAGS "${LINK_CUDA[@]}"
mv -f "$OUT.tmp" "$OUT"
built+=("blpa/_quant_ops.so (CPU kernels)")

# --- Standalone CUDA compile check (no TF) ----------------------------------
if [[ -n "$NVCC" ]]; then
  for src in "${CU_SRCS[@]}"; do
    name="$(basename "$src" .cu.cc)"
    say "nvcc: standalone compile of $src (no TF)"
    # shellcheck disable=SC2086
    "$NVCC" -x cu -std=c++17 -O3 -fmad=false -c "$src" \
      -o "$BUILD/${name}_standalone.o" $NVCC_FLAGS
  done
  # GPU check harnesses: every ops/*.cu -> build/<name> (e.g. build/cuda_check).
  for src in ops/*.cu; do
    name="$(basename "$src" .cu)"
    say "nvcc: $src -> build/$name"
    # shellcheck disable=SC2086
    "$NVCC" -std=c++17 -O3 -fmad=false "$src" -o "$BUILD/$name" $NVCC_FLAGS
  done
  if [[ "$TF_CUDA" != "1" ]]; then
    say "$CXX: syntax check of the GOOGLE_CUDA kernel registrations"
    for src in "${CC_SRCS[@]}"; do
      "$CXX" -fsyntax-only -Wall -Wno-deprecated-declarations \
        "$src" "${TF_CFLAGS_SYS[@]}" -DGOOGLE_CUDA=1 \
        -isystem "$CUDA_HOME/include"
    done
  fi
  built+=("build/*_standalone.o and the GPU check harnesses build/cuda_check etc. (CUDA compile check)")
else
  skipped+=("standalone CUDA compile check and build/cuda_check: nvcc not found")
fi

say "built:"
for b in "${built[@]}"; do say "  + $b"; done
if ((${#skipped[@]})); then
  say "skipped:"
  for s in "${skipped[@]}"; do say "  - $s"; done
fi

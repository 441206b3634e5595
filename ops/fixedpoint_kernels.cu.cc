// CUDA kernel of BlpaRoundFixed. No TensorFlow dependency: built with
// -DGOOGLE_CUDA=1 into blpa/_quant_ops.so by make.sh, compiled on its own as
// a CI check, and included by the standalone harness fixedpoint_check.cu.
// One thread per element, grid-stride loop; the element index of the
// stochastic hash is taken mod 2^32 as on the CPU.
#include <algorithm>
#include <cstdint>

#include "fixedpoint_common.h"
#include "fixedpoint_kernels.cu.h"

namespace blpa {
namespace fixedpoint {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

template <bool kStochastic>
__global__ void RoundFixedKernel(const float* __restrict__ x,
                                 float* __restrict__ y, int64_t n,
                                 Format format, StreamKey key) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < n; i += stride) {
    if (kStochastic) {
      const float u = Uniform(key, static_cast<uint32_t>(i));
      y[i] = RoundStochastic<true>(x[i], u, format);
    } else {
      y[i] = RoundDeterministic<true>(x[i], format);
    }
  }
}

}  // namespace

cudaError_t LaunchRoundFixed(const float* x, float* y, int64_t n, int bd,
                             int ad, bool stochastic, int64_t seed,
                             cudaStream_t stream) {
  if (!ValidFormat(bd, ad) || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int blocks = static_cast<int>(
      std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
  const Format format = MakeFormat(bd, ad);
  const StreamKey key = KeyFromSeed(seed);
  if (stochastic) {
    RoundFixedKernel<true><<<blocks, kThreads, 0, stream>>>(x, y, n, format,
                                                            key);
  } else {
    RoundFixedKernel<false><<<blocks, kThreads, 0, stream>>>(x, y, n, format,
                                                             key);
  }
  return cudaGetLastError();
}

}  // namespace fixedpoint
}  // namespace blpa

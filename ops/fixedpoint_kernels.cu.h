// CUDA launcher of BlpaRoundFixed. Plain device pointers and a cudaStream_t,
// no TensorFlow types, so the kernel builds and runs both inside the op
// library (fixedpoint_kernels.cc, under GOOGLE_CUDA) and standalone
// (fixedpoint_check.cu).
#ifndef BLPA_OPS_FIXEDPOINT_KERNELS_CU_H_
#define BLPA_OPS_FIXEDPOINT_KERNELS_CU_H_

#include <cstdint>

#include <cuda_runtime_api.h>

namespace blpa {
namespace fixedpoint {

// y[i] = Q(bd.ad) rounding of x[i] for i < n (fixedpoint_common.h); the seed
// is used when `stochastic`. Returns the launch status
// (cudaErrorInvalidValue for an invalid format).
cudaError_t LaunchRoundFixed(const float* x, float* y, int64_t n, int bd,
                             int ad, bool stochastic, int64_t seed,
                             cudaStream_t stream);

}  // namespace fixedpoint
}  // namespace blpa

#endif  // BLPA_OPS_FIXEDPOINT_KERNELS_CU_H_

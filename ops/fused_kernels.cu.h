// CUDA launchers of the fused BN-ReLU-quantize kernels (fused_kernels.cu.cc).
// Plain device pointers and a cudaStream_t, no TensorFlow types, so the
// kernels build and run inside the op library (fused_kernels.cc, under
// GOOGLE_CUDA) and standalone (fused_check.cu).
//
// Activations are [pixels, channels] float32; `saved` is float32 [pixels,
// channels] for nbits = 0 or packed uint8 codes [pixels,
// ceil(channels*nbits/8)] for nbits 4 or 8; per-channel arrays have
// `channels` floats. See fused_common.h for the math. Each returns the launch
// status (cudaErrorInvalidValue for a bad nbits).
#ifndef BLPA_OPS_FUSED_KERNELS_CU_H_
#define BLPA_OPS_FUSED_KERNELS_CU_H_

#include <cstdint>

#include <cuda_runtime_api.h>

#include "fused_common.h"

namespace blpa {
namespace fused {

// Bytes of device scratch that LaunchBnReluGrad needs.
int64_t GradScratchBytes(int64_t pixels, int64_t channels);

cudaError_t LaunchBnReluForward(const ForwardArgs& args, int64_t pixels,
                                int64_t channels, int nbits, bool relu,
                                cudaStream_t stream);
cudaError_t LaunchBnReluRestore(const RestoreArgs& args, int64_t pixels,
                                int64_t channels, int nbits, bool relu,
                                cudaStream_t stream);
cudaError_t LaunchBnReluGrad(const GradArgs& args, int64_t pixels,
                             int64_t channels, int nbits, bool relu,
                             cudaStream_t stream);

}  // namespace fused
}  // namespace blpa

#endif  // BLPA_OPS_FUSED_KERNELS_CU_H_

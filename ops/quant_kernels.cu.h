// CUDA launchers of the blpa quantization kernels. Plain device pointers and a
// cudaStream_t, no TensorFlow types, so the kernels build and run both inside
// the op library (quant_kernels.cc, under GOOGLE_CUDA) and standalone
// (cuda_check.cu).
#ifndef BLPA_OPS_QUANT_KERNELS_CU_H_
#define BLPA_OPS_QUANT_KERNELS_CU_H_

#include <cstdint>

#include <cuda_runtime_api.h>

namespace blpa {

// act: [pixels, channels] float32; offset: [channels] float32;
// codes: [pixels, ceil(channels*nbits/8)] uint8. nbits must be 4 or 8.
// Returns the launch status (cudaErrorInvalidValue for a bad nbits).
cudaError_t LaunchSaveAct(const float* act, const float* offset,
                          uint8_t* codes, int64_t pixels, int64_t channels,
                          int nbits, cudaStream_t stream);

// codes: [pixels, ceil(channels*nbits/8)] uint8; offset: [channels] float32;
// approx: [pixels, channels] float32; mask: [pixels, channels] bool.
cudaError_t LaunchRestoreAct(const uint8_t* codes, const float* offset,
                             float* approx, bool* mask, int64_t pixels,
                             int64_t channels, int nbits, cudaStream_t stream);

}  // namespace blpa

#endif  // BLPA_OPS_QUANT_KERNELS_CU_H_

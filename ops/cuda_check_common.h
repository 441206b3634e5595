// Shared pieces of the standalone GPU check harnesses (ops/*_check.cu and
// ops/cuda_check.cu): CUDA error checking and kernel timing. No TensorFlow.
#ifndef BLPA_OPS_CUDA_CHECK_COMMON_H_
#define BLPA_OPS_CUDA_CHECK_COMMON_H_

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

// Exits with a message naming the call, file and line on any CUDA error.
#define CHECK_CUDA(expr)                                                   \
  do {                                                                     \
    cudaError_t err_ = (expr);                                             \
    if (err_ != cudaSuccess) {                                             \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", #expr, __FILE__, \
                   __LINE__, cudaGetErrorString(err_));                    \
      std::exit(1);                                                        \
    }                                                                      \
  } while (0)

namespace blpa {
namespace check {

// The harness's random seed (argv[1], default 1234), printed with device 0.
inline unsigned SeedAndDevice(int argc, char** argv) {
  const unsigned seed = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 1234u;
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d), seed %u\n", prop.name, prop.major,
              prop.minor, seed);
  return seed;
}

// Mean milliseconds per call of fn over `iters` calls after one warm-up.
template <typename Fn>
float TimeMs(Fn fn, int iters = 20) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  fn();
  CHECK_CUDA(cudaEventRecord(start));
  for (int i = 0; i < iters; ++i) fn();
  CHECK_CUDA(cudaEventRecord(stop));
  CHECK_CUDA(cudaEventSynchronize(stop));
  float ms = 0;
  CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms / iters;
}

}  // namespace check
}  // namespace blpa

#endif  // BLPA_OPS_CUDA_CHECK_COMMON_H_

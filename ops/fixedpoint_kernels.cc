// Kernels of BlpaRoundFixed (registration: fixedpoint_ops.cc; math:
// fixedpoint_common.h). The CPU kernel runs over blocks of elements on TF's
// intra-op thread pool; each block is one vectorizable loop, compiled for the
// build's baseline ISA (floor by truncation) and for AVX2 (floorf is one
// instruction), chosen at run time. Both give the same values as the common
// element functions (no FMA: -ffp-contract=off). The GPU kernel
// (fixedpoint_kernels.cu.cc) is registered when built with GOOGLE_CUDA.
#define EIGEN_USE_THREADS
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <algorithm>
#include <cstdint>
#include <string>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "unsupported/Eigen/CXX11/Tensor"

#include "fixedpoint_common.h"
#if GOOGLE_CUDA
#include "fixedpoint_kernels.cu.h"
#endif

namespace blpa {
namespace fixedpoint {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
namespace errors = ::tensorflow::errors;
using CPUDevice = Eigen::ThreadPoolDevice;

// What one call computes: the format, the rounding and the hash keys.
struct Job {
  Format format;
  bool stochastic;
  StreamKey key;
};

// ---------------------------------------------------------------------------
// CPU implementation.

// Rounds x[0, len) into y; `first` is the flat index of x[0] (for the hash).
template <bool kFloorf>
inline void RoundRowBody(const float* __restrict x, int64_t len,
                         uint32_t first, const Job& job, float* __restrict y) {
  const Format f = job.format;
  if (job.stochastic) {
    const StreamKey key = job.key;
    for (int64_t k = 0; k < len; ++k) {
      const float u = Uniform(key, first + static_cast<uint32_t>(k));
      y[k] = RoundStochastic<kFloorf>(x[k], u, f);
    }
  } else {
    for (int64_t k = 0; k < len; ++k) {
      y[k] = RoundDeterministic<kFloorf>(x[k], f);
    }
  }
}

using RoundRowFn = void (*)(const float*, int64_t, uint32_t, const Job&,
                            float*);

void RoundRowBase(const float* x, int64_t len, uint32_t first, const Job& job,
                  float* y) {
  RoundRowBody<false>(x, len, first, job, y);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define BLPA_FXP_HAVE_AVX2_VARIANT 1
__attribute__((target("avx2"))) void RoundRowAvx2(const float* x, int64_t len,
                                                  uint32_t first,
                                                  const Job& job, float* y) {
  RoundRowBody<true>(x, len, first, job, y);
}
#endif

RoundRowFn PickRoundRow() {
#ifdef BLPA_FXP_HAVE_AVX2_VARIANT
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return RoundRowAvx2;
#endif
  return RoundRowBase;
}

// Elements per ParallelFor unit (a multiple of the vector width).
constexpr int64_t kBlock = 4096;

void RoundFixedCpu(OpKernelContext* ctx, const float* x, float* y, int64_t n,
                   const Job& job) {
  const RoundRowFn round_row = PickRoundRow();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  // Cycles per block: ~1 per element deterministic, ~4 with the hash.
  const int64_t cost = kBlock * (job.stochastic ? 4 : 1);
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      blocks, cost, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t start = b * kBlock;
          const int64_t len = std::min(kBlock, n - start);
          round_row(x + start, len, static_cast<uint32_t>(start), job,
                    y + start);
        }
      });
}

template <typename Device>
struct Impl;

template <>
struct Impl<CPUDevice> {
  static void Round(OpKernelContext* ctx, const float* x, float* y, int64_t n,
                    int, int, int64_t, const Job& job) {
    RoundFixedCpu(ctx, x, y, n, job);
  }
};

// ---------------------------------------------------------------------------
// GPU implementation: launches on the op's CUDA stream.
#if GOOGLE_CUDA
using GPUDevice = Eigen::GpuDevice;

template <>
struct Impl<GPUDevice> {
  static void Round(OpKernelContext* ctx, const float* x, float* y, int64_t n,
                    int bd, int ad, int64_t seed, const Job& job) {
    const cudaError_t err =
        LaunchRoundFixed(x, y, n, bd, ad, job.stochastic, seed,
                         ctx->eigen_device<GPUDevice>().stream());
    OP_REQUIRES(ctx, err == cudaSuccess,
                errors::Internal("BlpaRoundFixed CUDA launch failed: ",
                                 cudaGetErrorString(err)));
  }
};
#endif  // GOOGLE_CUDA

// ---------------------------------------------------------------------------
// Op kernel: validation and allocation, then Impl<Device>.

template <typename Device>
class RoundFixedOp : public OpKernel {
 public:
  explicit RoundFixedOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string rounding;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("bd", &bd_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("ad", &ad_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("rounding", &rounding));
    OP_REQUIRES(ctx, bd_ >= 1,
                errors::InvalidArgument(
                    "bd (bits before the binary point, sign included) must "
                    "be >= 1, got ", bd_));
    OP_REQUIRES(ctx, ad_ >= 0,
                errors::InvalidArgument(
                    "ad (bits after the binary point) must be >= 0, got ",
                    ad_));
    OP_REQUIRES(ctx, ValidFormat(bd_, ad_),
                errors::InvalidArgument("word length bd + ad must be <= ",
                                        kMaxWordBits, ", got Q", bd_, ".",
                                        ad_));
    OP_REQUIRES(ctx, rounding == "deterministic" || rounding == "stochastic",
                errors::InvalidArgument(
                    "rounding must be 'deterministic' or 'stochastic', got '",
                    rounding, "'"));
    stochastic_ = rounding == "stochastic";
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& seed = ctx->input(1);
    OP_REQUIRES(ctx, seed.dims() == 0,
                errors::InvalidArgument("seed must be a scalar, got shape ",
                                        seed.shape().DebugString()));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, x.shape(), &y));
    const int64_t n = x.NumElements();
    if (n == 0) return;
    const int64_t seed_value = seed.scalar<int64_t>()();
    const Job job{MakeFormat(bd_, ad_), stochastic_, KeyFromSeed(seed_value)};
    Impl<Device>::Round(ctx, x.flat<float>().data(), y->flat<float>().data(),
                        n, bd_, ad_, seed_value, job);
  }

 private:
  int bd_ = 0;
  int ad_ = 0;
  bool stochastic_ = false;
};

REGISTER_KERNEL_BUILDER(
    Name("BlpaRoundFixed").Device(::tensorflow::DEVICE_CPU),
    RoundFixedOp<CPUDevice>);

#if GOOGLE_CUDA
// x and y live in device memory; the seed scalar is read on the host.
REGISTER_KERNEL_BUILDER(Name("BlpaRoundFixed")
                            .Device(::tensorflow::DEVICE_GPU)
                            .HostMemory("seed"),
                        RoundFixedOp<GPUDevice>);
#endif  // GOOGLE_CUDA

}  // namespace
}  // namespace fixedpoint
}  // namespace blpa

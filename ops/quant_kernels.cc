// Kernels of BlpaSaveAct / BlpaRestoreAct (registration: quant_ops.cc; math:
// quant_common.h). CPU kernels run over pixels on TF's intra-op thread pool;
// GPU kernels (quant_kernels.cu.cc) are registered when built with
// GOOGLE_CUDA.
#define EIGEN_USE_THREADS
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "unsupported/Eigen/CXX11/Tensor"

#include "quant_common.h"
#if GOOGLE_CUDA
#include "quant_kernels.cu.h"
#endif

namespace blpa {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace errors = ::tensorflow::errors;
using CPUDevice = Eigen::ThreadPoolDevice;

// Sizes of one call: `pixels` = N*H*W rows of `channels` activations, or of
// `bytes` = ceil(C*nbits/8) packed codes.
struct Geometry {
  int64_t pixels = 0;
  int64_t channels = 0;
  int64_t bytes = 0;
};

class QuantOpBase : public OpKernel {
 public:
  explicit QuantOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nbits", &nbits_));
    OP_REQUIRES(ctx, nbits_ == 4 || nbits_ == 8,
                errors::InvalidArgument("nbits must be 4 or 8, got ", nbits_));
  }

 protected:
  // Checks the inputs shared by both ops: input 0 (`name`: act or codes) has
  // rank 4, offset has rank 1, and C >= 1, where C is the last dimension of
  // input 0 (`channels_from_data`) or the length of offset. Fills g (bytes
  // from C). Check ctx->status() afterwards.
  void Prepare(OpKernelContext* ctx, const char* name, bool channels_from_data,
               Geometry* g) {
    const Tensor& data = ctx->input(0);
    const Tensor& offset = ctx->input(1);
    OP_REQUIRES(ctx, data.dims() == 4,
                errors::InvalidArgument(
                    name, " must have rank 4 [N,H,W,C], got rank ",
                    data.dims(), " (shape ", data.shape().DebugString(), ")"));
    OP_REQUIRES(ctx, offset.dims() == 1,
                errors::InvalidArgument(
                    "offset must have rank 1 [C], got rank ", offset.dims(),
                    " (shape ", offset.shape().DebugString(), ")"));
    g->channels = channels_from_data ? data.dim_size(3) : offset.dim_size(0);
    OP_REQUIRES(ctx, g->channels > 0,
                errors::InvalidArgument(
                    "the number of channels C must be >= 1, got C = ",
                    g->channels));
    g->pixels = data.dim_size(0) * data.dim_size(1) * data.dim_size(2);
    g->bytes = PackedChannels(g->channels, nbits_);
  }

  int nbits_ = 0;
};

// ---------------------------------------------------------------------------
// CPU implementation.

// Per-channel shifts, computed once per call.
template <int kBits>
std::vector<int32_t> ChannelShifts(const float* offset, int64_t channels) {
  std::vector<int32_t> shifts(channels);
  for (int64_t k = 0; k < channels; ++k) {
    shifts[k] = Quant<kBits>::Shift(offset[k]);
  }
  return shifts;
}

// Runs fn(first_pixel, end_pixel) over all pixels on the intra-op pool.
template <typename Fn>
void ForEachPixelRange(OpKernelContext* ctx, const Geometry& g, Fn fn) {
  // About 4 cycles per channel and pixel for either op.
  const int64_t cost = 4 * g.channels + 1;
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      g.pixels, cost, fn);
}

// Unpacked codes of one pixel, one byte per channel.
template <int kBits>
void CodeRow(const float* __restrict a, const int32_t* __restrict shifts,
             int64_t channels, uint8_t* __restrict q) {
  for (int64_t k = 0; k < channels; ++k) {
    q[k] = static_cast<uint8_t>(Quant<kBits>::Code(a[k], shifts[k]));
  }
}

// Packs the 4-bit codes q of one pixel (see quant_common.h for the layout).
void PackNibbles(const uint8_t* __restrict q, int64_t channels,
                 uint8_t* __restrict out) {
  const int64_t pairs = channels / 2;
  for (int64_t k = 0; k < pairs; ++k) {
    out[k] = static_cast<uint8_t>(q[2 * k] | (q[2 * k + 1] << 4));
  }
  if (channels % 2 == 1) out[pairs] = q[channels - 1];
}

// Restores one pixel: PackedChannels bytes -> channels values and masks.
template <int kBits>
void DecodeRow(const uint8_t* __restrict in, const int32_t* __restrict shifts,
               int64_t channels, float* __restrict x, bool* __restrict m) {
  using Q = Quant<kBits>;
  if (kBits == 8) {
    for (int64_t k = 0; k < channels; ++k) {
      x[k] = Q::Approx(in[k], shifts[k]);
      m[k] = Q::Mask(in[k], shifts[k]);
    }
    return;
  }
  const int64_t pairs = channels / 2;
  for (int64_t k = 0; k < pairs; ++k) {
    const int32_t lo = in[k] & 0xF, hi = in[k] >> 4;
    x[2 * k] = Q::Approx(lo, shifts[2 * k]);
    m[2 * k] = Q::Mask(lo, shifts[2 * k]);
    x[2 * k + 1] = Q::Approx(hi, shifts[2 * k + 1]);
    m[2 * k + 1] = Q::Mask(hi, shifts[2 * k + 1]);
  }
  if (channels % 2 == 1) {
    Q::DecodeElement(in, shifts, channels - 1, x + channels - 1,
                     m + channels - 1);
  }
}

template <int kBits>
void SaveActCpu(OpKernelContext* ctx, const float* act, const float* offset,
                uint8_t* codes, const Geometry& g) {
  const std::vector<int32_t> shift_vec =
      ChannelShifts<kBits>(offset, g.channels);
  const int32_t* shifts = shift_vec.data();
  const int64_t channels = g.channels, bytes = g.bytes;
  ForEachPixelRange(ctx, g, [=](int64_t begin, int64_t end) {
    // 4 bits: codes first go to a one-byte-per-channel row (this vectorizes
    // like the 8-bit case), then get packed in pairs.
    std::vector<uint8_t> row(kBits == 4 ? channels : 0);
    for (int64_t p = begin; p < end; ++p) {
      if (kBits == 8) {
        CodeRow<8>(act + p * channels, shifts, channels, codes + p * bytes);
      } else {
        CodeRow<4>(act + p * channels, shifts, channels, row.data());
        PackNibbles(row.data(), channels, codes + p * bytes);
      }
    }
  });
}

template <int kBits>
void RestoreActCpu(OpKernelContext* ctx, const uint8_t* codes,
                   const float* offset, float* approx, bool* mask,
                   const Geometry& g) {
  const std::vector<int32_t> shift_vec =
      ChannelShifts<kBits>(offset, g.channels);
  const int32_t* shifts = shift_vec.data();
  const int64_t channels = g.channels, bytes = g.bytes;
  ForEachPixelRange(ctx, g, [=](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      DecodeRow<kBits>(codes + p * bytes, shifts, channels,
                       approx + p * channels, mask + p * channels);
    }
  });
}

template <typename Device>
struct Impl;

template <>
struct Impl<CPUDevice> {
  static void Save(OpKernelContext* ctx, int nbits, const float* act,
                   const float* offset, uint8_t* codes, const Geometry& g) {
    if (nbits == 4) {
      SaveActCpu<4>(ctx, act, offset, codes, g);
    } else {
      SaveActCpu<8>(ctx, act, offset, codes, g);
    }
  }
  static void Restore(OpKernelContext* ctx, int nbits, const uint8_t* codes,
                      const float* offset, float* approx, bool* mask,
                      const Geometry& g) {
    if (nbits == 4) {
      RestoreActCpu<4>(ctx, codes, offset, approx, mask, g);
    } else {
      RestoreActCpu<8>(ctx, codes, offset, approx, mask, g);
    }
  }
};

// ---------------------------------------------------------------------------
// GPU implementation: launches on the op's CUDA stream.
#if GOOGLE_CUDA
using GPUDevice = Eigen::GpuDevice;

void CheckLaunch(OpKernelContext* ctx, const char* what, cudaError_t err) {
  OP_REQUIRES(ctx, err == cudaSuccess,
              errors::Internal(what, " CUDA launch failed: ",
                               cudaGetErrorString(err)));
}

template <>
struct Impl<GPUDevice> {
  static void Save(OpKernelContext* ctx, int nbits, const float* act,
                   const float* offset, uint8_t* codes, const Geometry& g) {
    CheckLaunch(ctx, "BlpaSaveAct",
                LaunchSaveAct(act, offset, codes, g.pixels, g.channels, nbits,
                              ctx->eigen_device<GPUDevice>().stream()));
  }
  static void Restore(OpKernelContext* ctx, int nbits, const uint8_t* codes,
                      const float* offset, float* approx, bool* mask,
                      const Geometry& g) {
    CheckLaunch(ctx, "BlpaRestoreAct",
                LaunchRestoreAct(codes, offset, approx, mask, g.pixels,
                                 g.channels, nbits,
                                 ctx->eigen_device<GPUDevice>().stream()));
  }
};
#endif  // GOOGLE_CUDA

// ---------------------------------------------------------------------------
// Op kernels: validation and allocation, then Impl<Device>.

template <typename Device>
class SaveActOp : public QuantOpBase {
 public:
  using QuantOpBase::QuantOpBase;

  void Compute(OpKernelContext* ctx) override {
    Geometry g;
    Prepare(ctx, "act", /*channels_from_data=*/true, &g);
    if (!ctx->status().ok()) return;
    const Tensor& act = ctx->input(0);
    const Tensor& offset = ctx->input(1);
    OP_REQUIRES(ctx, offset.dim_size(0) == g.channels,
                errors::InvalidArgument(
                    "offset length (", offset.dim_size(0),
                    ") must equal the number of channels C of act (",
                    g.channels, "); act shape ", act.shape().DebugString()));
    TensorShape out_shape = act.shape();
    out_shape.set_dim(3, g.bytes);
    Tensor* codes = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &codes));
    if (g.pixels == 0) return;
    Impl<Device>::Save(ctx, nbits_, act.flat<float>().data(),
                       offset.flat<float>().data(),
                       codes->flat<uint8_t>().data(), g);
  }
};

template <typename Device>
class RestoreActOp : public QuantOpBase {
 public:
  using QuantOpBase::QuantOpBase;

  void Compute(OpKernelContext* ctx) override {
    Geometry g;
    Prepare(ctx, "codes", /*channels_from_data=*/false, &g);
    if (!ctx->status().ok()) return;
    const Tensor& codes = ctx->input(0);
    const Tensor& offset = ctx->input(1);
    OP_REQUIRES(ctx, codes.dim_size(3) == g.bytes,
                errors::InvalidArgument(
                    "codes last dimension must be ceil(C*nbits/8) = ", g.bytes,
                    " for C = ", g.channels, " (length of offset), nbits = ",
                    nbits_, "; got ", codes.dim_size(3), " (codes shape ",
                    codes.shape().DebugString(), ")"));
    TensorShape out_shape = codes.shape();
    out_shape.set_dim(3, g.channels);
    Tensor* approx = nullptr;
    Tensor* mask = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &approx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, out_shape, &mask));
    if (g.pixels == 0) return;
    Impl<Device>::Restore(ctx, nbits_, codes.flat<uint8_t>().data(),
                          offset.flat<float>().data(),
                          approx->flat<float>().data(),
                          mask->flat<bool>().data(), g);
  }
};

REGISTER_KERNEL_BUILDER(Name("BlpaSaveAct").Device(::tensorflow::DEVICE_CPU),
                        SaveActOp<CPUDevice>);
REGISTER_KERNEL_BUILDER(
    Name("BlpaRestoreAct").Device(::tensorflow::DEVICE_CPU),
    RestoreActOp<CPUDevice>);

#if GOOGLE_CUDA
// All inputs and outputs, offset included, live in device memory.
REGISTER_KERNEL_BUILDER(Name("BlpaSaveAct").Device(::tensorflow::DEVICE_GPU),
                        SaveActOp<GPUDevice>);
REGISTER_KERNEL_BUILDER(
    Name("BlpaRestoreAct").Device(::tensorflow::DEVICE_GPU),
    RestoreActOp<GPUDevice>);
#endif  // GOOGLE_CUDA

}  // namespace
}  // namespace blpa

// Kernels of BlpaSaveAct / BlpaRestoreAct / BlpaSaveScaledAct (registration:
// quant_ops.cc; math: quant_common.h). CPU kernels run over pixels on TF's
// intra-op thread pool;
// GPU kernels (quant_kernels.cu.cc) are registered when built with
// GOOGLE_CUDA.
#define EIGEN_USE_THREADS
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <algorithm>
#include <cmath>
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
//
// The per-element math is Quant<kBits>::Code / Approx / Mask, rearranged so
// that it vectorizes well and gives the same code for every input:
//
// * Code clamps t = (a - 1e-6f)*S to [-2n, n], floors, adds the channel's
//   shift s and clips to [0, n-1]. Here t is clamped instead to
//   [lo, hi] = [-s, n-1-s] (integers, per channel): t <= -s gives code 0 and
//   t >= n-1-s gives n-1 either way, and in between nothing is clipped, so
//   floor(t) + s needs no integer clip. The comparison `t > lo ? t : lo` maps
//   NaN to lo (code 0), as Code does; +-inf go to hi / lo as in Code.
// * The floor of t (|t| <= n) is exact both as floorf (one instruction with
//   SSE4.1/AVX) and as truncation stepped down (SSE2); the AVX2 variant uses
//   the first, the baseline variant the second.
// * A row is `group` whole pixels: for small C several pixels share one call,
//   so the vector loop runs over at least kMinRow elements. Channel tables are
//   tiled `group` times.
//
// Each row function is compiled twice, for the baseline ISA of the build and
// with target("avx2"), and picked at run time. No fused multiply-add is
// formed (-ffp-contract=off) and the float operations are the same IEEE
// operations in the same order, so the results are bit-identical on any CPU.

constexpr int64_t kMinRow = 256;

// Per-channel tables for one call, tiled over `group` pixels: the shift s,
// the clamp bounds [lo, hi] = [-s, n-1-s] of save, and the mask threshold
// s-1 of restore (q >= s iff q > s-1; s is in [1, n], so s-1 fits a byte).
template <int kBits>
struct ChannelTables {
  ChannelTables(const float* offset, int64_t channels, int64_t group_pixels)
      : group(group_pixels),
        shift(channels * group_pixels),
        lo(channels * group_pixels),
        hi(channels * group_pixels),
        threshold(channels * group_pixels) {
    for (int64_t k = 0; k < channels; ++k) {
      const int32_t s = Quant<kBits>::Shift(offset[k]);
      for (int64_t j = 0; j < group; ++j) {
        shift[j * channels + k] = s;
        lo[j * channels + k] = static_cast<float>(-s);
        hi[j * channels + k] = static_cast<float>(Quant<kBits>::kBins - 1 - s);
        threshold[j * channels + k] = static_cast<uint8_t>(s - 1);
      }
    }
  }
  int64_t group;
  std::vector<int32_t> shift;
  std::vector<float> lo, hi;
  std::vector<uint8_t> threshold;
};

// Pixels per row: enough for kMinRow elements; 1 for 4 bits with odd C
// (a pixel's last byte then holds one code and a zero nibble).
int64_t GroupPixels(int64_t channels, int nbits) {
  if (nbits == 4 && channels % 2 == 1) return 1;
  return channels >= kMinRow ? 1 : (kMinRow + channels - 1) / channels;
}

// Unpacked codes of `len` elements, one byte each.
template <int kBits, bool kFloor>
inline void CodeRowBody(const float* __restrict a,
                        const float* __restrict lo, const float* __restrict hi,
                        const int32_t* __restrict shift, int64_t len,
                        uint8_t* __restrict q) {
  using Q = Quant<kBits>;
  for (int64_t k = 0; k < len; ++k) {
    float t = (a[k] - Q::kEps) * Q::kScale;
    t = (t > lo[k]) ? t : lo[k];  // NaN -> lo
    t = (t < hi[k]) ? t : hi[k];
    int32_t f;
    if (kFloor) {
      f = static_cast<int32_t>(floorf(t));
    } else {
      f = static_cast<int32_t>(t);
      f -= (static_cast<float>(f) > t) ? 1 : 0;
    }
    q[k] = static_cast<uint8_t>(f + shift[k]);
  }
}

// Packs pairs of 4-bit codes: byte k = q[2k] | q[2k+1] << 4 (len even).
inline void PackPairs(const uint8_t* __restrict q, int64_t len,
                      uint8_t* __restrict out) {
  for (int64_t k = 0; k < len / 2; ++k) {
    out[k] = static_cast<uint8_t>(q[2 * k] | (q[2 * k + 1] << 4));
  }
}

// Codes of one row of `len` elements (whole pixels of `channels`), packed.
// `row` is scratch of len bytes (4 bits only).
template <int kBits, bool kFloor>
inline void SaveRowBody(const float* a, const ChannelTables<kBits>& t,
                        int64_t channels, int64_t len, uint8_t* row,
                        uint8_t* out) {
  if (kBits == 8) {
    CodeRowBody<kBits, kFloor>(a, t.lo.data(), t.hi.data(), t.shift.data(),
                               len, out);
    return;
  }
  CodeRowBody<kBits, kFloor>(a, t.lo.data(), t.hi.data(), t.shift.data(), len,
                             row);
  if (channels % 2 == 0) {
    PackPairs(row, len, out);
  } else {  // one pixel (GroupPixels): last byte holds one code
    PackPairs(row, len - 1, out);
    out[len / 2] = row[len - 1];
  }
}

// Unpacks the 4-bit codes of `len` elements (whole pixels), one per byte.
inline void UnpackNibbles(const uint8_t* __restrict in, int64_t len,
                          uint8_t* __restrict q) {
  for (int64_t k = 0; k < len / 2; ++k) {
    q[2 * k] = in[k] & 0xF;
    q[2 * k + 1] = in[k] >> 4;
  }
  if (len % 2 == 1) q[len - 1] = in[len / 2] & 0xF;  // one pixel, odd C
}

// Restores `len` unpacked codes: Quant::Approx, and Quant::Mask as a byte
// comparison (in its own loop, so that it runs 32 bytes at a time).
template <int kBits>
inline void DecodeCodes(const uint8_t* __restrict q,
                        const int32_t* __restrict shift,
                        const uint8_t* __restrict threshold, int64_t len,
                        float* __restrict x, bool* __restrict m) {
  for (int64_t k = 0; k < len; ++k) m[k] = q[k] > threshold[k];
  for (int64_t k = 0; k < len; ++k) x[k] = Quant<kBits>::Approx(q[k], shift[k]);
}

// Restores one row of `len` elements (whole pixels) from packed bytes.
// `row` is scratch of len bytes (4 bits only).
template <int kBits>
inline void RestoreRowBody(const uint8_t* in, const ChannelTables<kBits>& t,
                           int64_t len, uint8_t* row, float* x, bool* m) {
  if (kBits == 4) {
    UnpackNibbles(in, len, row);
    in = row;
  }
  DecodeCodes<kBits>(in, t.shift.data(), t.threshold.data(), len, x, m);
}

template <int kBits>
using SaveRowFn = void (*)(const float*, const ChannelTables<kBits>&, int64_t,
                           int64_t, uint8_t*, uint8_t*);
template <int kBits>
using RestoreRowFn = void (*)(const uint8_t*, const ChannelTables<kBits>&,
                              int64_t, uint8_t*, float*, bool*);

template <int kBits>
void SaveRowBase(const float* a, const ChannelTables<kBits>& t,
                 int64_t channels, int64_t len, uint8_t* row, uint8_t* out) {
  SaveRowBody<kBits, false>(a, t, channels, len, row, out);
}
template <int kBits>
void RestoreRowBase(const uint8_t* in, const ChannelTables<kBits>& t,
                    int64_t len, uint8_t* row, float* x, bool* m) {
  RestoreRowBody<kBits>(in, t, len, row, x, m);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define BLPA_HAVE_AVX2_VARIANT 1
template <int kBits>
__attribute__((target("avx2"))) void SaveRowAvx2(
    const float* a, const ChannelTables<kBits>& t, int64_t channels,
    int64_t len, uint8_t* row, uint8_t* out) {
  SaveRowBody<kBits, true>(a, t, channels, len, row, out);
}
template <int kBits>
__attribute__((target("avx2"))) void RestoreRowAvx2(
    const uint8_t* in, const ChannelTables<kBits>& t, int64_t len,
    uint8_t* row, float* x, bool* m) {
  RestoreRowBody<kBits>(in, t, len, row, x, m);
}
#endif

bool UseAvx2() {
#ifdef BLPA_HAVE_AVX2_VARIANT
  static const bool avx2 = __builtin_cpu_supports("avx2");
  return avx2;
#else
  return false;
#endif
}

template <int kBits>
SaveRowFn<kBits> PickSaveRow() {
#ifdef BLPA_HAVE_AVX2_VARIANT
  if (UseAvx2()) return SaveRowAvx2<kBits>;
#endif
  return SaveRowBase<kBits>;
}
template <int kBits>
RestoreRowFn<kBits> PickRestoreRow() {
#ifdef BLPA_HAVE_AVX2_VARIANT
  if (UseAvx2()) return RestoreRowAvx2<kBits>;
#endif
  return RestoreRowBase<kBits>;
}

// Runs fn(first_pixel, end_pixel) over all pixels on the intra-op pool, in
// blocks that are whole multiples of `group` pixels (but the last).
template <typename Fn>
void ForEachPixelRange(OpKernelContext* ctx, const Geometry& g, int64_t group,
                       Fn fn) {
  // About 2 cycles per channel and pixel for either op.
  const int64_t groups = (g.pixels + group - 1) / group;
  const int64_t cost = 2 * g.channels * group + 1;
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      groups, cost, [&](int64_t begin, int64_t end) {
        fn(begin * group, std::min(end * group, g.pixels));
      });
}

// Codes of act, or of act / scale when `scale` ([C]) is not null: each
// row's quotient goes through a row of scratch, never a full-size tensor.
template <int kBits>
void SaveActCpu(OpKernelContext* ctx, const float* act, const float* offset,
                const float* scale, uint8_t* codes, const Geometry& g) {
  const int64_t channels = g.channels, bytes = g.bytes;
  const int64_t group = GroupPixels(channels, kBits);
  const ChannelTables<kBits> tables(offset, channels, group);
  const SaveRowFn<kBits> save_row = PickSaveRow<kBits>();
  ForEachPixelRange(ctx, g, group, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> row(kBits == 4 ? channels * group : 0);
    std::vector<float> quotient(scale != nullptr ? channels * group : 0);
    for (int64_t p = begin; p < end; p += group) {
      const int64_t n = std::min(group, end - p);
      const float* a = act + p * channels;
      if (scale != nullptr) {
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t k = 0; k < channels; ++k) {
            quotient[j * channels + k] = a[j * channels + k] / scale[k];
          }
        }
        a = quotient.data();
      }
      save_row(a, tables, channels, n * channels, row.data(),
               codes + p * bytes);
    }
  });
}

template <int kBits>
void RestoreActCpu(OpKernelContext* ctx, const uint8_t* codes,
                   const float* offset, float* approx, bool* mask,
                   const Geometry& g) {
  const int64_t channels = g.channels, bytes = g.bytes;
  const int64_t group = GroupPixels(channels, kBits);
  const ChannelTables<kBits> tables(offset, channels, group);
  const RestoreRowFn<kBits> restore_row = PickRestoreRow<kBits>();
  ForEachPixelRange(ctx, g, group, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> row(kBits == 4 ? channels * group : 0);
    for (int64_t p = begin; p < end; p += group) {
      const int64_t n = std::min(group, end - p);
      restore_row(codes + p * bytes, tables, n * channels, row.data(),
                  approx + p * channels, mask + p * channels);
    }
  });
}

template <typename Device>
struct Impl;

template <>
struct Impl<CPUDevice> {
  // Codes of act, or of act / scale (BlpaSaveScaledAct, CPU only).
  static void Save(OpKernelContext* ctx, int nbits, const float* act,
                   const float* offset, uint8_t* codes, const Geometry& g,
                   const float* scale = nullptr) {
    if (nbits == 4) {
      SaveActCpu<4>(ctx, act, offset, scale, codes, g);
    } else {
      SaveActCpu<8>(ctx, act, offset, scale, codes, g);
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

// Checks of a save (act [N,H,W,C], offset [C]) and the allocation of codes
// [N,H,W,B]. Check ctx->status() afterwards.
void PrepareSave(OpKernelContext* ctx, const Geometry* g, Tensor** codes) {
  const Tensor& act = ctx->input(0);
  const Tensor& offset = ctx->input(1);
  OP_REQUIRES(ctx, offset.dim_size(0) == g->channels,
              errors::InvalidArgument(
                  "offset length (", offset.dim_size(0),
                  ") must equal the number of channels C of act (",
                  g->channels, "); act shape ", act.shape().DebugString()));
  TensorShape out_shape = act.shape();
  out_shape.set_dim(3, g->bytes);
  OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, codes));
}

template <typename Device>
class SaveActOp : public QuantOpBase {
 public:
  using QuantOpBase::QuantOpBase;

  void Compute(OpKernelContext* ctx) override {
    Geometry g;
    Prepare(ctx, "act", /*channels_from_data=*/true, &g);
    if (!ctx->status().ok()) return;
    Tensor* codes = nullptr;
    PrepareSave(ctx, &g, &codes);
    if (!ctx->status().ok() || g.pixels == 0) return;
    Impl<Device>::Save(ctx, nbits_, ctx->input(0).flat<float>().data(),
                       ctx->input(1).flat<float>().data(),
                       codes->flat<uint8_t>().data(), g);
  }
};

// BlpaSaveScaledAct (CPU): SaveActOp's checks, and scale [C].
class SaveScaledActOp : public QuantOpBase {
 public:
  using QuantOpBase::QuantOpBase;

  void Compute(OpKernelContext* ctx) override {
    Geometry g;
    Prepare(ctx, "act", /*channels_from_data=*/true, &g);
    if (!ctx->status().ok()) return;
    const Tensor& scale = ctx->input(2);
    OP_REQUIRES(ctx, scale.dims() == 1 && scale.dim_size(0) == g.channels,
                errors::InvalidArgument(
                    "scale must have shape [C] with C = ", g.channels,
                    " (channels of act ", ctx->input(0).shape().DebugString(),
                    "); got ", scale.shape().DebugString()));
    Tensor* codes = nullptr;
    PrepareSave(ctx, &g, &codes);
    if (!ctx->status().ok() || g.pixels == 0) return;
    Impl<CPUDevice>::Save(ctx, nbits_, ctx->input(0).flat<float>().data(),
                          ctx->input(1).flat<float>().data(),
                          codes->flat<uint8_t>().data(), g,
                          scale.flat<float>().data());
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
REGISTER_KERNEL_BUILDER(
    Name("BlpaSaveScaledAct").Device(::tensorflow::DEVICE_CPU),
    SaveScaledActOp);

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

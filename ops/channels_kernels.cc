// CPU kernels of BlpaGatherChannels, BlpaScatterChannels and
// BlpaChannelSquareSums (registration and definitions: channels_ops.cc).
// The work is split among the intra-op threads: by outer index o for the
// gather and the scatter, by fixed blocks of rows for the square sums.
#include <algorithm>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"

namespace blpa {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace errors = ::tensorflow::errors;

// Blocks of rows that BlpaChannelSquareSums sums separately (at most).
constexpr int64_t kSumBlocks = 64;

// Runs fn(begin, end) over row ranges of [0, rows) on the intra-op threads;
// cost_per_row: elements touched per row.
template <typename Fn>
void ForRows(OpKernelContext* ctx, int64_t rows, int64_t cost_per_row,
             const Fn& fn) {
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      rows, std::max<int64_t>(cost_per_row, 1) * 4, fn);
}

// Checks that indices has rank 1 and every entry in [0, channels).
void CheckIndices(OpKernelContext* ctx, const Tensor& indices,
                  int64_t channels) {
  OP_REQUIRES(ctx, indices.dims() == 1,
              errors::InvalidArgument("indices must be a vector, got shape ",
                                      indices.shape().DebugString()));
  const auto idx = indices.flat<int32_t>();
  for (int64_t j = 0; j < idx.size(); ++j) {
    OP_REQUIRES(ctx, idx(j) >= 0 && idx(j) < channels,
                errors::InvalidArgument("indices[", j, "] = ", idx(j),
                                        " is not in [0, ", channels, ")"));
  }
}

// The [O, C, I] view of a tensor around one axis.
struct AxisView {
  int axis;       // in [0, rank)
  int64_t outer;  // O
  int64_t inner;  // I
};

// The view of `data` around the `axis` attr (negative: from the end).
void ViewAround(OpKernelContext* ctx, const Tensor& data, int axis,
                AxisView* view) {
  const int rank = data.dims();
  OP_REQUIRES(ctx, rank >= 1,
              errors::InvalidArgument("input must have rank >= 1, got shape ",
                                      data.shape().DebugString()));
  OP_REQUIRES(ctx, axis >= -rank && axis < rank,
              errors::InvalidArgument("axis ", axis,
                                      " is out of range for rank ", rank));
  view->axis = axis < 0 ? axis + rank : axis;
  view->outer = 1;
  view->inner = 1;
  for (int d = 0; d < view->axis; ++d) view->outer *= data.dim_size(d);
  for (int d = view->axis + 1; d < rank; ++d) view->inner *= data.dim_size(d);
}

// With kGather: dst[o, j, :] = src[o, idx[j], :] (src has c blocks of
// `inner` elements per o, dst k). Without: dst (c blocks per o) zeroed, then
// dst[o, idx[j], :] += src[o, j, :] (k blocks per o).
template <typename T, bool kGather>
void MoveBlocks(OpKernelContext* ctx, const T* src, T* dst,
                const int32_t* idx, int64_t k, int64_t c,
                const AxisView& view) {
  const int64_t inner = view.inner;
  ForRows(ctx, view.outer, (c + k) * inner, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      if (kGather) {
        const T* from = src + o * c * inner;
        T* to = dst + o * k * inner;
        if (inner == 1) {
          for (int64_t j = 0; j < k; ++j) to[j] = from[idx[j]];
        } else {
          for (int64_t j = 0; j < k; ++j) {
            std::copy_n(from + idx[j] * inner, inner, to + j * inner);
          }
        }
      } else {
        const T* from = src + o * k * inner;
        T* to = dst + o * c * inner;
        std::fill(to, to + c * inner, T(0));
        for (int64_t j = 0; j < k; ++j) {
          T* block = to + idx[j] * inner;
          const T* values = from + j * inner;
          for (int64_t i = 0; i < inner; ++i) block[i] += values[i];
        }
      }
    }
  });
}

// BlpaGatherChannels (kGather) and BlpaScatterChannels: input 0 [O, n, I]
// and indices [k] give output 0 [O, m, I]; gather: n = C, m = k;
// scatter: n = k, m = C (the `channels` attr).
template <typename T, bool kGather>
class MoveChannelsOp : public OpKernel {
 public:
  explicit MoveChannelsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("axis", &axis_));
    if (!kGather) OP_REQUIRES_OK(ctx, ctx->GetAttr("channels", &channels_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& in = ctx->input(0);
    const Tensor& indices = ctx->input(1);
    AxisView view;
    ViewAround(ctx, in, axis_, &view);
    if (!ctx->status().ok()) return;
    const int64_t channels = kGather ? in.dim_size(view.axis) : channels_;
    CheckIndices(ctx, indices, channels);
    if (!ctx->status().ok()) return;
    const int64_t k = indices.NumElements();
    OP_REQUIRES(ctx, kGather || in.dim_size(view.axis) == k,
                errors::InvalidArgument(
                    "y's dimension ", view.axis, " (", in.dim_size(view.axis),
                    ") must equal the number of indices (", k, ")"));
    TensorShape shape = in.shape();
    shape.set_dim(view.axis, kGather ? k : channels);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out));
    if (out->NumElements() == 0) return;
    MoveBlocks<T, kGather>(ctx, in.flat<T>().data(), out->flat<T>().data(),
                           indices.flat<int32_t>().data(), k, channels,
                           view);
  }

 private:
  int axis_;
  int channels_ = 0;
};

template <typename T>
class ChannelSquareSumsOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    AxisView view;  // rows [outer, C]
    ViewAround(ctx, x, -1, &view);
    if (!ctx->status().ok()) return;
    const int64_t channels = x.dim_size(view.axis);
    Tensor* sums = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({channels}),
                                             &sums));
    float* total = sums->flat<float>().data();
    std::fill(total, total + channels, 0.0f);
    if (x.NumElements() == 0) return;
    const T* in = x.flat<T>().data();
    // Fixed blocks of rows, each summed in order, then the blocks in order:
    // the same float32 result whatever the threads' timing.
    const int64_t rows = view.outer;
    const int64_t blocks = std::min<int64_t>(rows, kSumBlocks);
    std::vector<float> partial(blocks * channels, 0.0f);
    ForRows(ctx, blocks, (rows / blocks + 1) * channels,
            [&](int64_t first, int64_t last) {
              for (int64_t b = first; b < last; ++b) {
                float* part = partial.data() + b * channels;
                for (int64_t r = rows * b / blocks;
                     r < rows * (b + 1) / blocks; ++r) {
                  const T* row = in + r * channels;
                  for (int64_t c = 0; c < channels; ++c) {
                    const float v = static_cast<float>(row[c]);
                    part[c] += v * v;
                  }
                }
              }
            });
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t c = 0; c < channels; ++c) {
        total[c] += partial[b * channels + c];
      }
    }
  }
};

#define REGISTER(T)                                                        \
  REGISTER_KERNEL_BUILDER(Name("BlpaGatherChannels")                       \
                              .Device(::tensorflow::DEVICE_CPU)            \
                              .TypeConstraint<T>("T"),                     \
                          MoveChannelsOp<T, true>);                            \
  REGISTER_KERNEL_BUILDER(Name("BlpaScatterChannels")                      \
                              .Device(::tensorflow::DEVICE_CPU)            \
                              .TypeConstraint<T>("T"),                     \
                          MoveChannelsOp<T, false>);                           \
  REGISTER_KERNEL_BUILDER(Name("BlpaChannelSquareSums")                    \
                              .Device(::tensorflow::DEVICE_CPU)            \
                              .TypeConstraint<T>("T"),                     \
                          ChannelSquareSumsOp<T>);
TF_CALL_float(REGISTER);
TF_CALL_double(REGISTER);
TF_CALL_half(REGISTER);
TF_CALL_bfloat16(REGISTER);
#undef REGISTER

}  // namespace
}  // namespace blpa

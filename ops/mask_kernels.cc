// CPU kernels of BlpaPackMask and BlpaMaskedSelect (registration and
// definitions: mask_ops.cc). Both split the packed bytes among the intra-op
// threads; each byte covers 8 consecutive elements.
#include <algorithm>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace blpa {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace errors = ::tensorflow::errors;

// Runs fn(begin, end) over byte ranges of [0, bytes) on the intra-op threads.
template <typename Fn>
void ForBytes(OpKernelContext* ctx, int64_t bytes, const Fn& fn) {
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      bytes, 8 * 4, fn);
}

class PackMaskOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& mask = ctx->input(0);
    const int64_t n = mask.NumElements();
    const int64_t bytes = (n + 7) / 8;
    Tensor* packed = nullptr;
    OP_REQUIRES_OK(ctx,
                   ctx->allocate_output(0, TensorShape({bytes}), &packed));
    const bool* in = mask.flat<bool>().data();
    uint8_t* out = packed->flat<uint8_t>().data();
    ForBytes(ctx, bytes, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t first = 8 * i, count = std::min<int64_t>(8, n - first);
        uint8_t byte = 0;
        for (int64_t j = 0; j < count; ++j) {
          byte |= static_cast<uint8_t>(in[first + j] ? 1 : 0) << j;
        }
        out[i] = byte;
      }
    });
  }
};

class MaskedSelectOp : public OpKernel {
 public:
  explicit MaskedSelectOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("scale", &scale_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& packed = ctx->input(1);
    const int64_t n = x.NumElements();
    OP_REQUIRES(ctx, packed.dims() == 1 && packed.dim_size(0) == (n + 7) / 8,
                errors::InvalidArgument(
                    "packed must have shape [ceil(n/8)] = [", (n + 7) / 8,
                    "] for x of shape ", x.shape().DebugString(), ", got ",
                    packed.shape().DebugString()));
    Tensor* y = nullptr;
    // y may overwrite x (each element is read before it is written).
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0,
                                                             x.shape(), &y));
    const float* in = x.flat<float>().data();
    const uint8_t* bits = packed.flat<uint8_t>().data();
    float* out = y->flat<float>().data();
    const float scale = scale_;
    ForBytes(ctx, packed.dim_size(0), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t first = 8 * i, count = std::min<int64_t>(8, n - first);
        const uint8_t byte = bits[i];
        for (int64_t j = 0; j < count; ++j) {
          const float v = in[first + j] * scale;
          out[first + j] = ((byte >> j) & 1) ? v : 0.0f;
        }
      }
    });
  }

 private:
  float scale_ = 1.0f;
};

REGISTER_KERNEL_BUILDER(Name("BlpaPackMask").Device(::tensorflow::DEVICE_CPU),
                        PackMaskOp);
REGISTER_KERNEL_BUILDER(
    Name("BlpaMaskedSelect").Device(::tensorflow::DEVICE_CPU), MaskedSelectOp);

}  // namespace
}  // namespace blpa

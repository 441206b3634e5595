// CPU kernels of BlpaWriteVariable and BlpaResizeVariable (registration:
// storage_ops.cc).
#include <algorithm>
#include <cstring>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/mutex.h"

namespace blpa {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::Var;
namespace errors = ::tensorflow::errors;

// Bytes per parallel copy block (about 1 ms of memcpy).
constexpr int64_t kBlockBytes = 1 << 20;

// Base of both ops: the `dtype` attr.
class VariableOp : public OpKernel {
 public:
  explicit VariableOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dtype", &dtype_));
  }

 protected:
  ::tensorflow::DataType dtype_;
};

class WriteVariableOp : public VariableOp {
 public:
  using VariableOp::VariableOp;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& value = ctx->input(1);
    OP_REQUIRES(ctx, value.dtype() == dtype_,
                errors::InvalidArgument("value has dtype ",
                                        DataTypeString(value.dtype()),
                                        ", the op's dtype attr is ",
                                        DataTypeString(dtype_)));
    ::tensorflow::core::RefCountPtr<Var> var;
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 0), &var));
    ::tensorflow::mutex_lock lock(*var->mu());
    Tensor* held = var->tensor();
    OP_REQUIRES(ctx, !var->is_initialized || held->dtype() == dtype_,
                errors::InvalidArgument(
                    "the variable has dtype ", DataTypeString(held->dtype()),
                    ", the value ", DataTypeString(dtype_)));
    if (var->is_initialized && held->shape() == value.shape() &&
        held->RefCountIsOne() && held->IsInitialized()) {
      Copy(ctx, value, held);
      return;
    }

    *held = value;
    var->is_initialized = true;
  }

 private:
  // Copies src's bytes into dst (same size) on the intra-op threads.
  static void Copy(OpKernelContext* ctx, const Tensor& src, Tensor* dst) {
    const auto from = src.tensor_data();
    char* to = const_cast<char*>(dst->tensor_data().data());
    const int64_t bytes = static_cast<int64_t>(from.size());
    if (bytes == 0 || to == from.data()) return;
    const int64_t blocks = (bytes + kBlockBytes - 1) / kBlockBytes;
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
        blocks, kBlockBytes, [&](int64_t begin, int64_t end) {
          const int64_t lo = begin * kBlockBytes;
          const int64_t hi = std::min(end * kBlockBytes, bytes);
          std::memcpy(to + lo, from.data() + lo, hi - lo);
        });
  }
};

// Gives the variable a new zeroed buffer whose first dimension is `rows`
// (the others unchanged), unless it already has that shape.
class ResizeVariableOp : public VariableOp {
 public:
  using VariableOp::VariableOp;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& rows_in = ctx->input(1);
    OP_REQUIRES(ctx, ::tensorflow::TensorShapeUtils::IsScalar(rows_in.shape()),
                errors::InvalidArgument("rows must be a scalar, got shape ",
                                        rows_in.shape().DebugString()));
    const int64_t rows = rows_in.scalar<int64_t>()();
    OP_REQUIRES(ctx, rows >= 0,
                errors::InvalidArgument("rows must be >= 0, got ", rows));
    ::tensorflow::core::RefCountPtr<Var> var;
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 0), &var));
    ::tensorflow::mutex_lock lock(*var->mu());
    Tensor* held = var->tensor();
    OP_REQUIRES(ctx, var->is_initialized && held->dtype() == dtype_ &&
                         held->dims() >= 1,
                errors::InvalidArgument(
                    "resize needs an initialized variable of dtype ",
                    DataTypeString(dtype_), " and rank >= 1"));
    if (held->dim_size(0) == rows) return;
    ::tensorflow::TensorShape shape = held->shape();
    shape.set_dim(0, rows);
    Tensor fresh;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(dtype_, shape, &fresh));
    const auto bytes = fresh.tensor_data();
    std::memset(const_cast<char*>(bytes.data()), 0, bytes.size());
    *held = fresh;
  }
};

REGISTER_KERNEL_BUILDER(Name("BlpaResizeVariable")
                            .Device(::tensorflow::DEVICE_CPU)
                            .HostMemory("resource")
                            .HostMemory("rows"),
                        ResizeVariableOp);

REGISTER_KERNEL_BUILDER(Name("BlpaWriteVariable")
                            .Device(::tensorflow::DEVICE_CPU)
                            .HostMemory("resource"),
                        WriteVariableOp);

}  // namespace
}  // namespace blpa

// CUDA kernels of the blpa quantization ops. No TensorFlow dependency: built
// with -DGOOGLE_CUDA=1 into blpa/_quant_ops.so by make.sh, compiled on its own
// as a CI check, and included by the standalone harness cuda_check.cu.
//
// Save: one thread per output byte (both nibbles for nbits=4). Restore: one
// thread per output element. Grid-stride loops; 32-bit indices when the
// element count allows, 64-bit otherwise.
#include <algorithm>
#include <cstdint>

#include "quant_common.h"
#include "quant_kernels.cu.h"

namespace blpa {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

int NumBlocks(int64_t total) {
  return static_cast<int>(
      std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks));
}

// One grid-stride loop for both ops: body(i) for every i < total.
template <typename Body, typename Index>
__global__ void GridStrideKernel(const Body body, Index total) {
  const Index stride = static_cast<Index>(blockDim.x) * gridDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < total; i += stride) {
    body(i);
  }
}

struct SaveArgs {
  const float* act;
  const float* offset;
  uint8_t* codes;
  int64_t bytes_per_px, channels;
};

struct RestoreArgs {
  const uint8_t* codes;
  const float* offset;
  float* approx;
  bool* mask;
  int64_t bytes_per_px, channels;
};

// Arguments of a kernel body, with the sizes in its index type.
template <typename Args, typename Index>
struct BodyBase {
  Args a;
  Index bytes_per_px, channels;
  explicit BodyBase(const Args& args)
      : a(args),
        bytes_per_px(static_cast<Index>(args.bytes_per_px)),
        channels(static_cast<Index>(args.channels)) {}
};

// Save: i is an output byte (both nibbles for nbits=4).
template <int kBits, typename Index>
struct SaveBody : BodyBase<SaveArgs, Index> {
  using BodyBase<SaveArgs, Index>::BodyBase;
  __device__ void operator()(Index i) const {
    const Index p = i / this->bytes_per_px;
    const Index k = i - p * this->bytes_per_px;
    this->a.codes[i] = Quant<kBits>::EncodeByte(
        this->a.act + p * this->channels,
        ShiftsFromOffset<kBits>{this->a.offset},
        static_cast<int64_t>(this->channels), k);
  }
};

// Restore: i is an output element.
template <int kBits, typename Index>
struct RestoreBody : BodyBase<RestoreArgs, Index> {
  using BodyBase<RestoreArgs, Index>::BodyBase;
  __device__ void operator()(Index i) const {
    const Index p = i / this->channels;
    const Index k = i - p * this->channels;
    Quant<kBits>::DecodeElement(this->a.codes + p * this->bytes_per_px,
                                ShiftsFromOffset<kBits>{this->a.offset}, k,
                                this->a.approx + i, this->a.mask + i);
  }
};

template <typename Body, typename Index, typename Args>
cudaError_t Run(const Args& args, int64_t total, cudaStream_t stream) {
  GridStrideKernel<Body, Index><<<NumBlocks(total), kThreads, 0, stream>>>(
      Body(args), static_cast<Index>(total));
  return cudaGetLastError();
}

// Launches Body<nbits, Index> over `total` items, with 32-bit indices when
// every index up to `largest` plus one grid stride fits in an int32.
template <template <int, typename> class Body, typename Args>
cudaError_t Launch(int nbits, int64_t total, int64_t largest, const Args& args,
                   cudaStream_t stream) {
  if (nbits != 4 && nbits != 8) return cudaErrorInvalidValue;
  if (total == 0) return cudaSuccess;
  const bool narrow = largest < INT32_MAX - int64_t{kThreads} * kMaxBlocks;
  if (nbits == 4) {
    return narrow ? Run<Body<4, int32_t>, int32_t>(args, total, stream)
                  : Run<Body<4, int64_t>, int64_t>(args, total, stream);
  }
  return narrow ? Run<Body<8, int32_t>, int32_t>(args, total, stream)
                : Run<Body<8, int64_t>, int64_t>(args, total, stream);
}

}  // namespace

cudaError_t LaunchSaveAct(const float* act, const float* offset,
                          uint8_t* codes, int64_t pixels, int64_t channels,
                          int nbits, cudaStream_t stream) {
  const int64_t bytes_per_px = PackedChannels(channels, nbits);
  const SaveArgs args{act, offset, codes, bytes_per_px, channels};
  // Pointer offsets go up to pixels * channels, beyond the byte count.
  return Launch<SaveBody>(nbits, pixels * bytes_per_px, pixels * channels,
                          args, stream);
}

cudaError_t LaunchRestoreAct(const uint8_t* codes, const float* offset,
                             float* approx, bool* mask, int64_t pixels,
                             int64_t channels, int nbits, cudaStream_t stream) {
  const RestoreArgs args{codes, offset, approx, mask,
                         PackedChannels(channels, nbits), channels};
  return Launch<RestoreBody>(nbits, pixels * channels, pixels * channels, args,
                             stream);
}

}  // namespace blpa

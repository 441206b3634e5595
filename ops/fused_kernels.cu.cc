// CUDA kernels of the fused BN-ReLU-quantize ops. No TensorFlow dependency:
// built with -DGOOGLE_CUDA=1 into blpa/_quant_ops.so by make.sh, compiled on
// its own as a CI check, and included by the standalone harness
// fused_check.cu. Same float32 math as the CPU kernels (fused_common.h,
// quant_common.h), so the outputs agree bit for bit.
//
// Forward and restore: one thread per element (per output byte, both
// nibbles, for 4-bit codes). Grad: per-chunk sums (one block per chunk of
// ReduceChunks, one thread per channel walking the chunk's pixels in order,
// in double), then one thread per channel adding the chunks in order, then
// one thread per element for the output. Grid-stride loops, 64-bit indices.
#include <algorithm>
#include <cstdint>

#include "fused_common.h"
#include "fused_kernels.cu.h"
#include "quant_common.h"

namespace blpa {
namespace fused {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

int NumBlocks(int64_t total) {
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks)));
}

template <typename Body>
__global__ void GridStride(const Body body, int64_t total) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < total; i += stride) {
    body(i);
  }
}

template <typename Body>
cudaError_t Run(const Body& body, int64_t total, cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  GridStride<Body><<<NumBlocks(total), kThreads, 0, stream>>>(body, total);
  return cudaGetLastError();
}

// Forward of element (p, k): writes out and returns h.
__device__ inline float ForwardElement(const ForwardArgs& a, int64_t channels,
                                       int64_t i, bool relu, float* u) {
  const int64_t k = i % channels;
  *u = Normalize(a.z[i], a.mean[k], a.sigma[k]);
  const float h = PreActivation(*u, a.scale[k], a.bias[k]);
  a.out[i] = relu ? Relu(h) : h;
  return h;
}

template <int kBits>
__device__ inline int32_t ForwardCode(const ForwardArgs& a, int64_t channels,
                                      int64_t i, bool relu) {
  const int64_t k = i % channels;
  float u;
  const float h = ForwardElement(a, channels, i, relu, &u);
  const float offset = a.bias[k] / a.scale[k];
  return Quant<kBits>::Code(h / a.scale[k], Quant<kBits>::Shift(offset));
}

template <int kBits>
struct ForwardBody {
  ForwardArgs a;
  int64_t channels, bytes;
  bool relu;
  __device__ void operator()(int64_t i) const {
    if (kBits == 0) {  // i: element
      float u;
      ForwardElement(a, channels, i, relu, &u);
      static_cast<float*>(a.saved)[i] = u;
      return;
    }
    uint8_t* codes = static_cast<uint8_t*>(a.saved);
    if (kBits == 8) {  // i: element = byte
      codes[i] = static_cast<uint8_t>(ForwardCode<8>(a, channels, i, relu));
      return;
    }
    const int64_t p = i / bytes, b = i - p * bytes;  // i: byte
    const int64_t k0 = 2 * b, e0 = p * channels + k0;
    const int32_t lo = ForwardCode<4>(a, channels, e0, relu);
    const int32_t hi =
        (k0 + 1 < channels) ? ForwardCode<4>(a, channels, e0 + 1, relu) : 0;
    codes[i] = static_cast<uint8_t>(lo | (hi << 4));
  }
};

// y and the ReLU mask of element i = (p, k) from the saved copy.
template <int kBits>
__device__ inline float SavedY(const void* saved, const float* scale,
                               const float* center, int64_t channels,
                               int64_t bytes, int64_t i, bool relu,
                               bool* keep, float* h) {
  const int64_t p = i / channels, k = i - p * channels;
  if (kBits == 0) {
    const float u = static_cast<const float*>(saved)[i];
    *h = PreActivation(u, scale[k], center[k]);
    *keep = !relu || *h > 0.0f;
    return u;
  }
  constexpr int kB = kBits == 0 ? 8 : kBits;
  const uint8_t* row = static_cast<const uint8_t*>(saved) + p * bytes;
  const int32_t q = Quant<kB>::Unpack(row, k);
  const int32_t s = Quant<kB>::Shift(center[k]);
  const float approx = Quant<kB>::Approx(q, s);
  *h = approx * scale[k];
  *keep = !relu || Quant<kB>::Mask(q, s);
  return approx - center[k];
}

template <int kBits>
struct RestoreBody {
  RestoreArgs a;
  int64_t channels, bytes;
  bool relu;
  __device__ void operator()(int64_t i) const {
    bool keep;
    float h;
    SavedY<kBits>(a.saved, a.scale, a.center, channels, bytes, i, relu, &keep,
                  &h);
    a.act[i] = relu ? Relu(h) : h;
  }
};

// Sums of one chunk: thread k of block `chunk` walks the chunk's pixels.
template <int kBits>
__global__ void GradSums(const GradArgs a, int64_t pixels, int64_t channels,
                         int64_t bytes, bool relu, int64_t chunks,
                         double* partial) {
  const int64_t chunk = blockIdx.x;
  const int64_t first = ChunkBegin(chunk, chunks, pixels);
  const int64_t last = ChunkBegin(chunk + 1, chunks, pixels);
  for (int64_t k = threadIdx.x; k < channels; k += blockDim.x) {
    double s1 = 0.0, s2 = 0.0, s3 = 0.0;
    for (int64_t p = first; p < last; ++p) {
      const int64_t i = p * channels + k;
      bool keep;
      float h;
      const float y = SavedY<kBits>(a.saved, a.scale, a.center, channels,
                                    bytes, i, relu, &keep, &h) *
                      a.widen[k];
      const float gm = keep ? a.grad[i] : 0.0f;
      const float gy = gm * y;
      s1 += static_cast<double>(gm);
      s2 += static_cast<double>(gy);
      s3 += static_cast<double>(y);
    }
    double* s = partial + chunk * 3 * channels;
    s[k] = s1;
    s[channels + k] = s2;
    s[2 * channels + k] = s3;
  }
}

struct FinishBody {
  GradArgs a;
  const double* partial;
  float *m1, *m2;
  int64_t chunks, channels, pixels;
  __device__ void operator()(int64_t k) const {
    double s1 = 0.0, s2 = 0.0, s3 = 0.0;
    for (int64_t i = 0; i < chunks; ++i) {
      const double* s = partial + i * 3 * channels;
      s1 += s[k];
      s2 += s[channels + k];
      s3 += s[2 * channels + k];
    }
    const GradStats st = FinishSums(s1, s2, s3, a.scale[k], pixels);
    a.dbias[k] = st.dbias;
    a.dscale[k] = st.dscale;
    m1[k] = st.m1;
    m2[k] = st.m2;
  }
};

template <int kBits>
struct GradOutBody {
  GradArgs a;
  const float *m1, *m2;
  int64_t channels, bytes;
  bool relu;
  __device__ void operator()(int64_t i) const {
    const int64_t k = i % channels;
    bool keep;
    float h;
    const float y = SavedY<kBits>(a.saved, a.scale, a.center, channels, bytes,
                                  i, relu, &keep, &h) *
                    a.widen[k];
    const float gm = keep ? a.grad[i] : 0.0f;
    a.grad_in[i] = GradIn(gm, y, a.scale[k], m1[k], m2[k], a.sigma[k]);
  }
};

int64_t Bytes(int64_t channels, int nbits) {
  return nbits ? PackedChannels(channels, nbits) : channels;
}

// Scratch layout: partial sums [chunks][3][C] (double), then m1, m2 [C].
double* Partial(void* scratch) { return static_cast<double*>(scratch); }
float* Means(void* scratch, int64_t pixels, int64_t channels) {
  return reinterpret_cast<float*>(Partial(scratch) +
                                  ReduceChunks(pixels) * 3 * channels);
}

template <int kBits>
cudaError_t Forward(const ForwardArgs& a, int64_t pixels, int64_t channels,
                    bool relu, cudaStream_t stream) {
  const int64_t bytes = Bytes(channels, kBits);
  const int64_t total = pixels * (kBits == 4 ? bytes : channels);
  return Run(ForwardBody<kBits>{a, channels, bytes, relu}, total, stream);
}

template <int kBits>
cudaError_t Restore(const RestoreArgs& a, int64_t pixels, int64_t channels,
                    bool relu, cudaStream_t stream) {
  return Run(RestoreBody<kBits>{a, channels, Bytes(channels, kBits), relu},
             pixels * channels, stream);
}

template <int kBits>
cudaError_t Grad(const GradArgs& a, int64_t pixels, int64_t channels,
                 bool relu, cudaStream_t stream) {
  if (pixels == 0) {
    cudaError_t err = cudaMemsetAsync(a.dbias, 0, channels * 4, stream);
    return err == cudaSuccess
               ? cudaMemsetAsync(a.dscale, 0, channels * 4, stream)
               : err;
  }
  const int64_t bytes = Bytes(channels, kBits), chunks = ReduceChunks(pixels);
  double* partial = Partial(a.scratch);
  float* m1 = Means(a.scratch, pixels, channels);
  float* m2 = m1 + channels;
  const int threads =
      static_cast<int>(std::min<int64_t>(kThreads, (channels + 31) / 32 * 32));
  GradSums<kBits><<<static_cast<int>(chunks), threads, 0, stream>>>(
      a, pixels, channels, bytes, relu, chunks, partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = Run(FinishBody{a, partial, m1, m2, chunks, channels, pixels}, channels,
            stream);
  if (err != cudaSuccess) return err;
  return Run(GradOutBody<kBits>{a, m1, m2, channels, bytes, relu},
             pixels * channels, stream);
}

}  // namespace

int64_t GradScratchBytes(int64_t pixels, int64_t channels) {
  return ReduceChunks(pixels) * 3 * channels * 8 + 2 * channels * 4;
}

#define BLPA_FUSED_BY_BITS(fn, nbits, ...)                               \
  ((nbits) == 0   ? fn<0>(__VA_ARGS__)                                   \
   : (nbits) == 4 ? fn<4>(__VA_ARGS__)                                   \
   : (nbits) == 8 ? fn<8>(__VA_ARGS__)                                   \
                  : cudaErrorInvalidValue)

cudaError_t LaunchBnReluForward(const ForwardArgs& args, int64_t pixels,
                                int64_t channels, int nbits, bool relu,
                                cudaStream_t stream) {
  return BLPA_FUSED_BY_BITS(Forward, nbits, args, pixels, channels, relu,
                            stream);
}

cudaError_t LaunchBnReluRestore(const RestoreArgs& args, int64_t pixels,
                                int64_t channels, int nbits, bool relu,
                                cudaStream_t stream) {
  return BLPA_FUSED_BY_BITS(Restore, nbits, args, pixels, channels, relu,
                            stream);
}

cudaError_t LaunchBnReluGrad(const GradArgs& args, int64_t pixels,
                             int64_t channels, int nbits, bool relu,
                             cudaStream_t stream) {
  return BLPA_FUSED_BY_BITS(Grad, nbits, args, pixels, channels, relu,
                            stream);
}

}  // namespace fused
}  // namespace blpa

// Kernels of BlpaBnMoments / BlpaBnReluForward / BlpaBnReluRestore /
// BlpaBnReluGrad (registration: fused_ops.cc; math: fused_common.h). CPU
// kernels run on TF's intra-op thread pool; GPU kernels (fused_kernels.cu.cc)
// are registered when built with GOOGLE_CUDA (all but BlpaBnMoments).
//
// CPU layout of the work (one pass over the activation for forward and
// restore; two for the moments; three for the gradient: two sums, then the
// output):
// * A row is `group` whole pixels, so that the vector loop runs over at least
//   kMinRow elements when C is small; the per-channel tables are tiled
//   `group` times (one pixel per row for 4-bit codes with odd C).
// * Codes use BlpaSaveAct's CPU rearrangement of Quant<k>::Code (t clamped
//   to the channel's [-shift, n-1-shift], then floor(t) + shift): the same
//   code for every input (see quant_kernels.cc and ops/README.md).
// * The moments and backward sums are float32 sums in the order of TF's CPU
//   reduce_sum (TfOrderSums), of the same float32 terms as the unfused
//   formulas, so the results equal those of blpa/fused.py's fallback bit for
//   bit (and the golden runs keep their losses). They split the channels over
//   the pool and go 8 channels (one packet) at a time. The CUDA kernels sum
//   in double instead.
// * Each row function exists for the build's baseline ISA and for AVX2,
//   picked at run time; no fused multiply-adds (-ffp-contract=off).
#define EIGEN_USE_THREADS
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "unsupported/Eigen/CXX11/Tensor"

#include "fused_common.h"
#include "quant_common.h"
#if GOOGLE_CUDA
#include "fused_kernels.cu.h"
#endif

namespace blpa {
namespace fused {
namespace {

using ::tensorflow::DataType;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
namespace errors = ::tensorflow::errors;
using CPUDevice = Eigen::ThreadPoolDevice;

constexpr int64_t kMinRow = 256;

// Sizes of one call: `pixels` = N*H*W, C = `channels`, `bytes` per pixel of
// the saved copy (C floats or ceil(C*nbits/8) code bytes).
struct Geometry {
  int64_t pixels = 0;
  int64_t channels = 0;
  int64_t bytes = 0;
  int nbits = 0;
};

int64_t GroupPixels(int64_t channels, int nbits) {
  if (nbits == 4 && channels % 2 == 1) return 1;
  return channels >= kMinRow ? 1 : (kMinRow + channels - 1) / channels;
}

// Per-channel values tiled over `group` pixels.
// Null `values`: all ones.
struct Tiled {
  Tiled(const float* values, int64_t channels, int64_t group)
      : v(channels * group, 1.0f) {
    if (values == nullptr) return;
    for (int64_t j = 0; j < group; ++j) {
      std::copy(values, values + channels, v.begin() + j * channels);
    }
  }
  const float* data() const { return v.data(); }
  std::vector<float> v;
};

// Quantizer tables of one call, tiled: shift s, clamp bounds [-s, n-1-s] of
// the codes and the mask threshold s-1 (q >= s iff q > s-1).
struct CodeTables {
  CodeTables(const float* offset, int64_t channels, int64_t group, int nbits)
      : shift(channels * group),
        lo(channels * group),
        hi(channels * group),
        threshold(channels * group) {
    if (nbits == 0) return;
    const int32_t bins = 1 << nbits;
    for (int64_t k = 0; k < channels; ++k) {
      const int32_t s = nbits == 4 ? Quant<4>::Shift(offset[k])
                                   : Quant<8>::Shift(offset[k]);
      for (int64_t j = 0; j < group; ++j) {
        shift[j * channels + k] = s;
        lo[j * channels + k] = static_cast<float>(-s);
        hi[j * channels + k] = static_cast<float>(bins - 1 - s);
        threshold[j * channels + k] = static_cast<uint8_t>(s - 1);
      }
    }
  }
  std::vector<int32_t> shift;
  std::vector<float> lo, hi;
  std::vector<uint8_t> threshold;
};

// Code of a = h/cs (Quant<kBits>::Code, rearranged as described above).
template <int kBits, bool kFloor>
inline uint8_t CodeOf(float a, float lo, float hi, int32_t shift) {
  using Q = Quant<kBits>;
  float t = (a - Q::kEps) * Q::kScale;
  t = (t > lo) ? t : lo;  // NaN -> lo
  t = (t < hi) ? t : hi;
  int32_t f;
  if (kFloor) {
    f = static_cast<int32_t>(floorf(t));
  } else {
    f = static_cast<int32_t>(t);
    f -= (static_cast<float>(f) > t) ? 1 : 0;
  }
  return static_cast<uint8_t>(f + shift);
}

// Packs `len` one-byte 4-bit codes of whole pixels (odd len: one pixel of
// odd C, whose last byte holds one code).
inline void PackNibbles(const uint8_t* __restrict q, int64_t len,
                        uint8_t* __restrict out) {
  for (int64_t k = 0; k < len / 2; ++k) {
    out[k] = static_cast<uint8_t>(q[2 * k] | (q[2 * k + 1] << 4));
  }
  if (len % 2 == 1) out[len / 2] = q[len - 1];
}

// Unpacks the 4-bit codes of `len` elements of whole pixels, one per byte.
inline void UnpackNibbles(const uint8_t* __restrict in, int64_t len,
                          uint8_t* __restrict q) {
  for (int64_t k = 0; k < len / 2; ++k) {
    q[2 * k] = in[k] & 0xF;
    q[2 * k + 1] = in[k] >> 4;
  }
  if (len % 2 == 1) q[len - 1] = in[len / 2] & 0xF;
}

// The codes of one row of `len` elements: 8-bit codes as stored, 4-bit
// codes unpacked into `scratch`.
template <int kBits>
inline const uint8_t* RowCodes(const uint8_t* packed, int64_t len,
                               uint8_t* scratch) {
  if (kBits == 8) return packed;
  UnpackNibbles(packed, len, scratch);
  return scratch;
}

// Tables shared by the three ops, tiled for one row of `group` pixels.
// `widen` (the gradient's y = saved value * widen) is all ones when null.
struct RowTables {
  RowTables(const Geometry& g, const float* scale, const float* center,
            const float* widen = nullptr)
      : group(GroupPixels(g.channels, g.nbits)),
        cs(scale, g.channels, group),
        center(center, g.channels, group),
        widen(widen, g.channels, group),
        codes(center, g.channels, group, g.nbits) {}
  int64_t group;
  Tiled cs, center, widen;
  CodeTables codes;
};

// ---------------------------------------------------------------------------
// Row bodies. kBits 0 is the full copy; kFloor selects floorf (AVX2) or
// truncation stepped down (baseline), which give the same integer.

template <int kBits, bool kRelu, bool kFloor>
struct ForwardRow {
  // `t` holds cs and the offset c = b/cs as center; mean, sigma, bias tiled.
  static inline void Run(const float* __restrict z, const float* mean,
                         const float* sigma, const float* bias,
                         const RowTables& t, int64_t len, float* __restrict out,
                         float* __restrict u_out, uint8_t* __restrict q) {
    const float* __restrict cs = t.cs.data();
    for (int64_t k = 0; k < len; ++k) {
      const float u = Normalize(z[k], mean[k], sigma[k]);
      const float h = PreActivation(u, cs[k], bias[k]);
      out[k] = kRelu ? Relu(h) : h;
      if (kBits == 0) {
        u_out[k] = u;
      } else {
        q[k] = CodeOf<kBits == 0 ? 8 : kBits, kFloor>(
            h / cs[k], t.codes.lo[k], t.codes.hi[k], t.codes.shift[k]);
      }
    }
  }
};

template <int kBits, bool kRelu, bool kFloor>
struct RestoreRow {
  static inline void Run(const void* saved, const RowTables& t, int64_t len,
                         uint8_t* scratch, float* __restrict act) {
    const float* __restrict cs = t.cs.data();
    if (kBits == 0) {
      const float* __restrict u = static_cast<const float*>(saved);
      const float* __restrict b = t.center.data();
      for (int64_t k = 0; k < len; ++k) {
        const float h = PreActivation(u[k], cs[k], b[k]);
        act[k] = kRelu ? Relu(h) : h;
      }
      return;
    }
    const uint8_t* __restrict q = RowCodes<kBits == 0 ? 8 : kBits>(
        static_cast<const uint8_t*>(saved), len, scratch);
    const int32_t* __restrict s = t.codes.shift.data();
    for (int64_t k = 0; k < len; ++k) {
      const float h = Quant<kBits == 0 ? 8 : kBits>::Approx(q[k], s[k]) * cs[k];
      act[k] = kRelu ? Relu(h) : h;
    }
  }
};

// y and the masked gradient of `len` elements, into y[] and gm[].
// `t` is read from channel k0 on (0 for rows of whole pixels); `saved` and g
// point at the row's first element, which is channel k0 (of a pixel).
template <int kBits, bool kRelu>
inline void MaskedRow(const float* __restrict g, const void* saved,
                      const RowTables& t, int64_t len, uint8_t* scratch,
                      float* __restrict y, float* __restrict gm,
                      int64_t k0 = 0) {
  const float* __restrict cs = t.cs.data() + k0;
  const float* __restrict c = t.center.data() + k0;
  const float* __restrict w = t.widen.data() + k0;
  if (kBits == 0) {
    const float* __restrict u = static_cast<const float*>(saved);
    for (int64_t k = 0; k < len; ++k) {
      const bool keep = !kRelu || PreActivation(u[k], cs[k], c[k]) > 0.0f;
      y[k] = u[k] * w[k];
      gm[k] = keep ? g[k] : 0.0f;
    }
    return;
  }
  const uint8_t* __restrict q = RowCodes<kBits == 0 ? 8 : kBits>(
      static_cast<const uint8_t*>(saved), len, scratch);
  const int32_t* __restrict s = t.codes.shift.data() + k0;
  const uint8_t* __restrict th = t.codes.threshold.data() + k0;
  for (int64_t k = 0; k < len; ++k) {
    const bool keep = !kRelu || q[k] > th[k];
    y[k] = (Quant<kBits == 0 ? 8 : kBits>::Approx(q[k], s[k]) - c[k]) * w[k];
    gm[k] = keep ? g[k] : 0.0f;
  }
}

// Eigen's packet size for float in TF's CPU build (AVX): channels below the
// last multiple of it are reduced as packets, the rest one by one.
constexpr int64_t kTfPacket = 8;

// One packet of 8 floats / ints (GCC vector extensions: one AVX register in
// the AVX2 variants, two SSE registers otherwise; lane-wise IEEE float32).
// (Passed by value only between inline functions: no ABI concern.)
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float V8 __attribute__((vector_size(32)));
typedef int32_t V8i __attribute__((vector_size(32)));
typedef uint32_t V8u __attribute__((vector_size(32)));
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "MaskedPacket reads 4-bit codes as a little-endian word");

inline V8 Load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Add8(float* p, V8 v) {
  V8 a = Load8(p) + v;
  std::memcpy(p, &a, sizeof(a));
}
inline V8i Load8i(const int32_t* p) {
  V8i v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The saved copy from channel k0 (even) of pixel p; `stride` values per
// pixel.
template <int kBits>
inline const void* SliceAt(const void* saved, int64_t p, int64_t k0,
                           int64_t stride) {
  if (kBits == 0) return static_cast<const float*>(saved) + p * stride + k0;
  return static_cast<const uint8_t*>(saved) + p * stride + k0 * kBits / 8;
}

// Accumulator of pixel p: p % 4 among the first `unrolled` pixels, else 0
// (see TfOrderSums).
inline int64_t Lane(int64_t p, int64_t unrolled) {
  return p < unrolled ? (p & 3) : 0;
}

// y and the masked gradient of the 8 channels from k of one pixel (`g` and
// `saved` at channel k): MaskedRow's element math, a packet at a time.
template <int kBits, bool kRelu>
inline void MaskedPacket(const float* g, const void* saved,
                         const RowTables& t, int64_t k, V8* y, V8* gm) {
  const V8 cs = Load8(t.cs.data() + k), c = Load8(t.center.data() + k);
  const V8 w = Load8(t.widen.data() + k);
  V8i keep;
  if (kBits == 0) {
    const V8 u = Load8(static_cast<const float*>(saved));
    const V8 h = u * cs;
    keep = (h + c) > V8{};
    *y = u * w;
  } else {
    constexpr int kB = kBits == 0 ? 8 : kBits;
    const uint8_t* bytes = static_cast<const uint8_t*>(saved);
    V8i q;
    if (kB == 4) {  // channel j in bits 4j..4j+3 of the little-endian word
      uint32_t word;
      std::memcpy(&word, bytes, 4);
      const V8i w = V8i{} + static_cast<int32_t>(word);
      q = reinterpret_cast<V8i>(
              reinterpret_cast<V8u>(w) >> V8u{0, 4, 8, 12, 16, 20, 24, 28}) &
          0xF;
    } else {
      int32_t codes[8];
      for (int j = 0; j < 8; ++j) codes[j] = bytes[j];
      q = Load8i(codes);
    }
    const V8i shift = Load8i(t.codes.shift.data() + k);
    const V8 approx =
        (__builtin_convertvector(q - shift, V8) + 0.5f) * Quant<kB>::kWidth;
    *y = (approx - c) * w;
    keep = q >= shift;
  }
  if (!kRelu) keep = ~V8i{};
  // keep ? g : +0.0f, as a bit mask.
  *gm = reinterpret_cast<V8>(reinterpret_cast<V8i>(Load8(g)) & keep);
}

// The backward sums of channels [k0, k0+len) over pixels [p0, p1), added to
// the accumulators `acc` (4 lanes of nsums arrays of len; Lane): pass 1
// (m1 == nullptr) adds gm, gm*y and gm*cs; pass 2 adds (gm*cs - m1)*y. These
// are the float32 terms that the unfused formulas reduce. `g` and `saved`
// are the whole tensors; `stride` is saved's bytes (or floats) per pixel.
// Whole packets (len a multiple of 8) go 8 channels at a time.
template <int kBits, bool kRelu, bool kFloor>
struct GradSumRows {
  static inline void Run(const float* g, const void* saved,
                         const RowTables& t, const float* m1,
                         int64_t channels, int64_t stride, int64_t k0,
                         int64_t len, int64_t p0, int64_t p1,
                         int64_t unrolled, uint8_t* scratch, float* y,
                         float* gm, float* acc) {
    const int64_t nsums = m1 == nullptr ? 3 : 1;
    const bool packets = len % kTfPacket == 0;
    for (int64_t p = p0; p < p1; ++p) {
      float* lane = acc + Lane(p, unrolled) * nsums * len;
      if (packets) {
        for (int64_t u = 0; u < len; u += kTfPacket) {
          AddPacket(g + p * channels + k0 + u,
                    SliceAt<kBits>(saved, p, k0 + u, stride), t, m1, k0 + u,
                    len, lane + u);
        }
      } else {
        MaskedRow<kBits, kRelu>(g + p * channels + k0,
                                SliceAt<kBits>(saved, p, k0, stride), t, len,
                                scratch, y, gm, k0);
        AddRow(t.cs.data() + k0, m1 ? m1 + k0 : nullptr, y, gm, len, lane);
      }
    }
  }

  static inline void AddPacket(const float* g, const void* saved,
                               const RowTables& t, const float* m1, int64_t k,
                               int64_t len, float* lane) {
    V8 y, gm;
    MaskedPacket<kBits, kRelu>(g, saved, t, k, &y, &gm);
    const V8 cs = Load8(t.cs.data() + k);
    if (m1 == nullptr) {
      Add8(lane, gm);
      Add8(lane + len, gm * y);
      Add8(lane + 2 * len, gm * cs);
    } else {
      const V8 g2 = gm * cs;
      const V8 g3 = g2 - Load8(m1 + k);
      Add8(lane, g3 * y);
    }
  }

  static inline void AddRow(const float* cs, const float* m1, const float* y,
                            const float* gm, int64_t len, float* lane) {
    for (int64_t k = 0; k < len; ++k) {
      if (m1 == nullptr) {
        lane[k] += gm[k];
        lane[len + k] += gm[k] * y[k];
        lane[2 * len + k] += gm[k] * cs[k];
      } else {
        const float g3 = gm[k] * cs[k] - m1[k];
        lane[k] += g3 * y[k];
      }
    }
  }
};

// Sums `nsums` per-channel values over all pixels in the order of TF's CPU
// reduce_sum over [N,H,W] (Eigen's InnerMostDimPreserver): for packet
// channels and at least 16 pixels, four float accumulators take pixels
// 4j, 4j+1, 4j+2, 4j+3, are added (0+1, +2, +3), then the last pixels are
// added in order; otherwise one accumulator in pixel order. The channels
// are split into one contiguous range per thread.
// rows(k0, len, p0, p1, unrolled, acc) adds the values of channels
// [k0, k0+len) of pixels [p0, p1) to acc (lanes as Lane). Writes
// out[s*C + k].
template <typename Rows>
void TfOrderSums(OpKernelContext* ctx, const Geometry& g, int nsums,
                 const Rows& rows, float* out) {
  const int64_t c = g.channels, pixels = g.pixels;
  const int64_t packet_end = c / kTfPacket * kTfPacket;
  auto part = [&](int64_t k0, int64_t len, bool packet) {
    if (len <= 0) return;
    const int64_t n = nsums * len;
    std::vector<float> acc(4 * n, 0.0f);
    const int64_t unrolled = (packet && pixels >= 16) ? pixels / 4 * 4 : 0;
    rows(k0, len, int64_t{0}, unrolled, unrolled, acc.data());
    for (int j = 1; j < 4; ++j) {
      for (int64_t k = 0; k < n; ++k) acc[k] += acc[j * n + k];
    }
    rows(k0, len, unrolled, pixels, unrolled, acc.data());
    for (int s = 0; s < nsums; ++s) {
      std::copy(acc.begin() + s * len, acc.begin() + (s + 1) * len,
                out + s * c + k0);
    }
  };
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const int64_t units = (c + kTfPacket - 1) / kTfPacket;
  const int64_t blocks = std::min<int64_t>(units, pool->NumThreads());
  pool->ParallelFor(blocks, int64_t{1} << 40, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t k0 = b * units / blocks * kTfPacket;
      const int64_t k1 = std::min((b + 1) * units / blocks * kTfPacket, c);
      const int64_t split = std::max(k0, std::min(k1, packet_end));
      part(k0, split - k0, true);
      part(split, k1 - split, false);
    }
  });
}

template <int kBits, bool kRelu, bool kFloor>
struct GradOutRow {
  static inline void Run(const float* g, const void* saved,
                         const RowTables& t, const float* __restrict m1,
                         const float* __restrict m2,
                         const float* __restrict sigma, int64_t len,
                         uint8_t* scratch, float* __restrict y,
                         float* __restrict gm, float* out) {
    // out may be g itself (in place): g is read into gm first.
    MaskedRow<kBits, kRelu>(g, saved, t, len, scratch, y, gm);
    const float* __restrict cs = t.cs.data();
    for (int64_t k = 0; k < len; ++k) {
      out[k] = GradIn(gm[k], y[k], cs[k], m1[k], m2[k], sigma[k]);
    }
  }
};

// Baseline and AVX2 variants of a row body Row<kFloor>::Run.
template <template <bool> class Row, typename... Args>
void RunBase(Args... args) {
  Row<false>::Run(args...);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define BLPA_FUSED_AVX2 1
template <template <bool> class Row, typename... Args>
__attribute__((target("avx2"))) void RunAvx2(Args... args) {
  Row<true>::Run(args...);
}
#endif

template <template <bool> class Row, typename... Args>
auto PickRow() -> void (*)(Args...) {
#ifdef BLPA_FUSED_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return RunAvx2<Row, Args...>;
#endif
  return RunBase<Row, Args...>;
}

// Runs fn(first_pixel, end_pixel) over all pixels on the intra-op pool, in
// blocks of whole rows of `group` pixels; `cost` cycles per element.
template <typename Fn>
void ForEachRowRange(OpKernelContext* ctx, const Geometry& g, int64_t group,
                     int64_t cost, Fn fn) {
  const int64_t rows = (g.pixels + group - 1) / group;
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
      rows, cost * g.channels * group + 1, [&](int64_t begin, int64_t end) {
        fn(begin * group, std::min(end * group, g.pixels));
      });
}

// ---------------------------------------------------------------------------
// CPU implementations, one per (kBits, kRelu).

template <int kBits, bool kRelu>
struct CpuImpl {
  template <bool kFloor>
  using Fwd = ForwardRow<kBits, kRelu, kFloor>;
  template <bool kFloor>
  using Rst = RestoreRow<kBits, kRelu, kFloor>;
  template <bool kFloor>
  using Sum = GradSumRows<kBits, kRelu, kFloor>;
  template <bool kFloor>
  using Out = GradOutRow<kBits, kRelu, kFloor>;

  static void Forward(OpKernelContext* ctx, const Geometry& g,
                      const ForwardArgs& a) {
    const int64_t c = g.channels;
    std::vector<float> offset(c);
    for (int64_t k = 0; k < c; ++k) offset[k] = a.bias[k] / a.scale[k];
    const RowTables t(g, a.scale, offset.data());
    const Tiled mean(a.mean, c, t.group), sigma(a.sigma, c, t.group),
        bias(a.bias, c, t.group);
    const auto row = PickRow<Fwd, const float*, const float*, const float*,
                             const float*, const RowTables&, int64_t, float*,
                             float*, uint8_t*>();
    ForEachRowRange(ctx, g, t.group, 6, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> q(kBits ? c * t.group : 0);
      for (int64_t p = begin; p < end; p += t.group) {
        const int64_t len = std::min(t.group, end - p) * c;
        float* u = kBits ? nullptr : static_cast<float*>(a.saved) + p * c;
        uint8_t* codes = static_cast<uint8_t*>(a.saved) + p * g.bytes;
        row(a.z + p * c, mean.data(), sigma.data(), bias.data(), t, len,
            a.out + p * c, u, kBits == 8 ? codes : q.data());
        if (kBits == 4) PackNibbles(q.data(), len, codes);
      }
    });
  }

  static void Restore(OpKernelContext* ctx, const Geometry& g,
                      const RestoreArgs& a) {
    const int64_t c = g.channels;
    const RowTables t(g, a.scale, a.center);
    const auto row = PickRow<Rst, const void*, const RowTables&, int64_t,
                             uint8_t*, float*>();
    ForEachRowRange(ctx, g, t.group, 3, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> q(kBits == 4 ? c * t.group : 0);
      for (int64_t p = begin; p < end; p += t.group) {
        const int64_t len = std::min(t.group, end - p) * c;
        row(SavedAt(a.saved, p, g), t, len, q.data(), a.act + p * c);
      }
    });
  }

  static void Grad(OpKernelContext* ctx, const Geometry& g,
                   const GradArgs& a) {
    const int64_t c = g.channels;
    const RowTables t(g, a.scale, a.center, a.widen);
    std::vector<float> m1(c), m2(c);
    Sums(ctx, g, a, t, m1.data(), m2.data());
    const Tiled tm1(m1.data(), c, t.group), tm2(m2.data(), c, t.group),
        sigma(a.sigma, c, t.group);
    const auto row = PickRow<Out, const float*, const void*, const RowTables&,
                             const float*, const float*, const float*, int64_t,
                             uint8_t*, float*, float*, float*>();
    ForEachRowRange(ctx, g, t.group, 6, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> q(kBits == 4 ? c * t.group : 0);
      std::vector<float> y(c * t.group), gm(c * t.group);
      for (int64_t p = begin; p < end; p += t.group) {
        const int64_t len = std::min(t.group, end - p) * c;
        row(a.grad + p * c, SavedAt(a.saved, p, g), t, tm1.data(), tm2.data(),
            sigma.data(), len, q.data(), y.data(), gm.data(),
            a.grad_in + p * c);
      }
    });
  }

 private:
  static const void* SavedAt(const void* saved, int64_t pixel,
                             const Geometry& g) {
    if (kBits == 0) return static_cast<const float*>(saved) + pixel * g.bytes;
    return static_cast<const uint8_t*>(saved) + pixel * g.bytes;
  }

  // The sums of the unfused formulas in TF's order: dbias = sum gm,
  // dscale = sum gm*y, m1 = sum(gm*cs)/N, then m2 = sum((gm*cs - m1)*y)/N.
  static void Sums(OpKernelContext* ctx, const Geometry& g, const GradArgs& a,
                   const RowTables& t, float* m1, float* m2) {
    const int64_t c = g.channels;
    const float count = static_cast<float>(g.pixels);
    const auto sum_rows =
        PickRow<Sum, const float*, const void*, const RowTables&,
                const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                int64_t, int64_t, uint8_t*, float*, float*, float*>();
    auto rows = [&](const float* mean1) {
      return [&, mean1](int64_t k0, int64_t len, int64_t p0, int64_t p1,
                        int64_t unrolled, float* acc) {
        std::vector<uint8_t> q(len);
        std::vector<float> y(len), gm(len);
        sum_rows(a.grad, a.saved, t, mean1, c, g.bytes, k0, len, p0, p1,
                 unrolled, q.data(), y.data(), gm.data(), acc);
      };
    };
    std::vector<float> sums(3 * c);
    TfOrderSums(ctx, g, 3, rows(nullptr), sums.data());
    for (int64_t k = 0; k < c; ++k) {
      a.dbias[k] = sums[k];
      a.dscale[k] = sums[c + k];
      m1[k] = sums[2 * c + k] / count;
    }
    TfOrderSums(ctx, g, 1, rows(m1), m2);
    for (int64_t k = 0; k < c; ++k) m2[k] = m2[k] / count;
  }
};

// ---------------------------------------------------------------------------
// Batch moments as tf.nn.moments computes them on the CPU: mean = sum(z)/N,
// var = sum((z - mean)^2)/N, float32 sums in TF's order.

template <bool kFloor>
struct MomentRows {
  // Adds z (mean == nullptr) or (z - mean)^2 of channels [k0, k0+len) of
  // pixels [p0, p1) to acc (lanes as Lane).
  static inline void Run(const float* z, const float* mean, int64_t channels,
                         int64_t k0, int64_t len, int64_t p0, int64_t p1,
                         int64_t unrolled, float* acc) {
    const bool packets = len % kTfPacket == 0;
    for (int64_t p = p0; p < p1; ++p) {
      const float* row = z + p * channels + k0;
      float* a = acc + Lane(p, unrolled) * len;
      if (packets) {
        for (int64_t u = 0; u < len; u += kTfPacket) {
          const V8 v = Load8(row + u);
          if (mean == nullptr) {
            Add8(a + u, v);
          } else {
            const V8 d = v - Load8(mean + k0 + u);
            Add8(a + u, d * d);
          }
        }
        continue;
      }
      for (int64_t k = 0; k < len; ++k) {
        const float d = mean == nullptr ? row[k] : row[k] - mean[k0 + k];
        a[k] += mean == nullptr ? d : d * d;
      }
    }
  }
};

void MomentsCpu(OpKernelContext* ctx, const Geometry& g, const float* z,
                float* mean, float* var) {
  const int64_t c = g.channels;
  const float count = static_cast<float>(g.pixels);
  const auto moment_rows =
      PickRow<MomentRows, const float*, const float*, int64_t, int64_t,
              int64_t, int64_t, int64_t, int64_t, float*>();
  auto rows = [&](const float* m) {
    return [&, m](int64_t k0, int64_t len, int64_t p0, int64_t p1,
                  int64_t unrolled, float* acc) {
      moment_rows(z, m, c, k0, len, p0, p1, unrolled, acc);
    };
  };
  TfOrderSums(ctx, g, 1, rows(nullptr), mean);
  for (int64_t k = 0; k < c; ++k) mean[k] = mean[k] / count;
  TfOrderSums(ctx, g, 1, rows(mean), var);
  for (int64_t k = 0; k < c; ++k) var[k] = var[k] / count;
}

class MomentsOp : public OpKernel {
 public:
  using OpKernel::OpKernel;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& z = ctx->input(0);
    OP_REQUIRES(ctx, z.dims() == 4,
                errors::InvalidArgument("z must have rank 4 [N,H,W,C], got "
                                        "shape ",
                                        z.shape().DebugString()));
    Geometry g;
    g.pixels = z.dim_size(0) * z.dim_size(1) * z.dim_size(2);
    g.channels = z.dim_size(3);
    OP_REQUIRES(ctx, g.channels >= 1 && g.pixels >= 1,
                errors::InvalidArgument(
                    "z must have at least one pixel and one channel, got "
                    "shape ",
                    z.shape().DebugString()));
    Tensor *mean = nullptr, *var = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({g.channels}),
                                             &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({g.channels}),
                                             &var));
    MomentsCpu(ctx, g, z.flat<float>().data(), mean->flat<float>().data(),
               var->flat<float>().data());
  }
};

REGISTER_KERNEL_BUILDER(
    Name("BlpaBnMoments").Device(::tensorflow::DEVICE_CPU), MomentsOp);

// Calls Impl<kBits, kRelu>::fn for the run-time nbits and relu.
#define BLPA_FUSED_DISPATCH(Impl, nbits, relu, fn, ...)                  \
  do {                                                                   \
    if ((nbits) == 0) {                                                  \
      (relu) ? Impl<0, true>::fn(__VA_ARGS__)                            \
             : Impl<0, false>::fn(__VA_ARGS__);                          \
    } else if ((nbits) == 4) {                                           \
      (relu) ? Impl<4, true>::fn(__VA_ARGS__)                            \
             : Impl<4, false>::fn(__VA_ARGS__);                          \
    } else {                                                             \
      (relu) ? Impl<8, true>::fn(__VA_ARGS__)                            \
             : Impl<8, false>::fn(__VA_ARGS__);                          \
    }                                                                    \
  } while (0)

template <typename Device>
struct Impl;

template <>
struct Impl<CPUDevice> {
  static void Forward(OpKernelContext* ctx, const Geometry& g, bool relu,
                      const ForwardArgs& a) {
    BLPA_FUSED_DISPATCH(CpuImpl, g.nbits, relu, Forward, ctx, g, a);
  }
  static void Restore(OpKernelContext* ctx, const Geometry& g, bool relu,
                      const RestoreArgs& a) {
    BLPA_FUSED_DISPATCH(CpuImpl, g.nbits, relu, Restore, ctx, g, a);
  }
  static void Grad(OpKernelContext* ctx, const Geometry& g, bool relu,
                   const GradArgs& a) {
    BLPA_FUSED_DISPATCH(CpuImpl, g.nbits, relu, Grad, ctx, g, a);
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
  static cudaStream_t Stream(OpKernelContext* ctx) {
    return ctx->eigen_device<GPUDevice>().stream();
  }
  static void Forward(OpKernelContext* ctx, const Geometry& g, bool relu,
                      const ForwardArgs& a) {
    CheckLaunch(ctx, "BlpaBnReluForward",
                LaunchBnReluForward(a, g.pixels, g.channels, g.nbits, relu,
                                    Stream(ctx)));
  }
  static void Restore(OpKernelContext* ctx, const Geometry& g, bool relu,
                      const RestoreArgs& a) {
    CheckLaunch(ctx, "BlpaBnReluRestore",
                LaunchBnReluRestore(a, g.pixels, g.channels, g.nbits, relu,
                                    Stream(ctx)));
  }
  static void Grad(OpKernelContext* ctx, const Geometry& g, bool relu,
                   GradArgs a) {
    Tensor scratch;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(
                            ::tensorflow::DT_UINT8,
                            TensorShape({GradScratchBytes(g.pixels,
                                                          g.channels)}),
                            &scratch));
    a.scratch = scratch.flat<uint8_t>().data();
    CheckLaunch(ctx, "BlpaBnReluGrad",
                LaunchBnReluGrad(a, g.pixels, g.channels, g.nbits, relu,
                                 Stream(ctx)));
  }
};
#endif  // GOOGLE_CUDA

// ---------------------------------------------------------------------------
// Op kernels: validation and allocation, then Impl<Device>.

class FusedOpBase : public OpKernel {
 public:
  explicit FusedOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    DataType type;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &type));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nbits", &nbits_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("relu", &relu_));
    if (type == ::tensorflow::DT_FLOAT) {
      OP_REQUIRES(ctx, nbits_ == 0,
                  errors::InvalidArgument("nbits must be 0 for a full-"
                                          "precision (float) copy, got ",
                                          nbits_));
    } else {
      OP_REQUIRES(ctx, nbits_ == 4 || nbits_ == 8,
                  errors::InvalidArgument(
                      "nbits must be 4 or 8 for K-bit codes (uint8), got ",
                      nbits_));
    }
  }

 protected:
  // Checks that input `index` (`name`) has rank 4; fills pixels.
  void CheckActivation(OpKernelContext* ctx, int index, const char* name,
                       Geometry* g) {
    const Tensor& t = ctx->input(index);
    OP_REQUIRES(ctx, t.dims() == 4,
                errors::InvalidArgument(name, " must have rank 4 [N,H,W,C], "
                                        "got shape ",
                                        t.shape().DebugString()));
    g->pixels = t.dim_size(0) * t.dim_size(1) * t.dim_size(2);
  }

  // Sets C (>= 1) and the bytes per pixel of the saved copy.
  void SetChannels(OpKernelContext* ctx, int64_t channels, Geometry* g) {
    OP_REQUIRES(ctx, channels >= 1,
                errors::InvalidArgument(
                    "the number of channels C must be >= 1, got ", channels));
    g->channels = channels;
    g->nbits = nbits_;
    g->bytes = nbits_ ? PackedChannels(channels, nbits_) : channels;
  }

  // Checks that the inputs `indices` (`names`) are [C] vectors.
  void CheckChannelInputs(OpKernelContext* ctx,
                          std::initializer_list<int> indices,
                          std::initializer_list<const char*> names,
                          const Geometry& g) {
    auto name = names.begin();
    for (int i : indices) {
      const Tensor& t = ctx->input(i);
      OP_REQUIRES(ctx, t.dims() == 1 && t.dim_size(0) == g.channels,
                  errors::InvalidArgument(
                      *name, " must have shape [C] = [", g.channels,
                      "] (C = channels of the activation), got shape ",
                      t.shape().DebugString()));
      ++name;
    }
  }

  // Checks that `saved` (input `index`) is the copy of an activation of
  // shape `act`: same N, H, W and g.bytes per pixel.
  void CheckSaved(OpKernelContext* ctx, int index, const TensorShape& act,
                  const Geometry& g) {
    const Tensor& saved = ctx->input(index);
    TensorShape want = act;
    want.set_dim(3, g.bytes);
    OP_REQUIRES(ctx, saved.shape() == want,
                errors::InvalidArgument(
                    "saved must have shape ", want.DebugString(),
                    " (nbits = ", nbits_, ", C = ", g.channels, "), got ",
                    saved.shape().DebugString()));
  }

  int nbits_ = 0;
  bool relu_ = true;
};

const float* In(OpKernelContext* ctx, int i) {
  return ctx->input(i).flat<float>().data();
}

template <typename Device>
class ForwardOp : public FusedOpBase {
 public:
  using FusedOpBase::FusedOpBase;

  void Compute(OpKernelContext* ctx) override {
    Geometry g;
    CheckActivation(ctx, 0, "z", &g);
    if (!ctx->status().ok()) return;
    const Tensor& z = ctx->input(0);
    SetChannels(ctx, z.dim_size(3), &g);
    if (!ctx->status().ok()) return;
    CheckChannelInputs(ctx, {1, 2, 3, 4}, {"mean", "sigma", "scale", "bias"},
                       g);
    if (!ctx->status().ok()) return;
    TensorShape saved_shape = z.shape();
    saved_shape.set_dim(3, g.bytes);
    Tensor *out = nullptr, *saved = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, z.shape(), &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, saved_shape, &saved));
    if (g.pixels == 0) return;
    const ForwardArgs a{In(ctx, 0), In(ctx, 1), In(ctx, 2), In(ctx, 3),
                        In(ctx, 4), out->flat<float>().data(),
                        saved->data()};
    Impl<Device>::Forward(ctx, g, relu_, a);
  }
};

template <typename Device>
class RestoreOp : public FusedOpBase {
 public:
  using FusedOpBase::FusedOpBase;

  void Compute(OpKernelContext* ctx) override {
    Geometry g;
    CheckActivation(ctx, 0, "saved", &g);
    if (!ctx->status().ok()) return;
    const Tensor& scale = ctx->input(1);
    OP_REQUIRES(ctx, scale.dims() == 1,
                errors::InvalidArgument("scale must have rank 1 [C], got "
                                        "shape ",
                                        scale.shape().DebugString()));
    SetChannels(ctx, scale.dim_size(0), &g);
    if (!ctx->status().ok()) return;
    CheckChannelInputs(ctx, {1, 2}, {"scale", "center"}, g);
    if (!ctx->status().ok()) return;
    TensorShape act_shape = ctx->input(0).shape();
    act_shape.set_dim(3, g.channels);
    CheckSaved(ctx, 0, act_shape, g);
    if (!ctx->status().ok()) return;
    Tensor* act = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, act_shape, &act));
    if (g.pixels == 0) return;
    const RestoreArgs a{ctx->input(0).data(), In(ctx, 1), In(ctx, 2),
                        act->flat<float>().data()};
    Impl<Device>::Restore(ctx, g, relu_, a);
  }
};

template <typename Device>
class GradOp : public FusedOpBase {
 public:
  using FusedOpBase::FusedOpBase;

  void Compute(OpKernelContext* ctx) override {
    Geometry g;
    CheckActivation(ctx, 0, "grad", &g);
    if (!ctx->status().ok()) return;
    const Tensor& grad = ctx->input(0);
    SetChannels(ctx, grad.dim_size(3), &g);
    if (!ctx->status().ok()) return;
    CheckChannelInputs(ctx, {2, 3, 4, 5},
                       {"scale", "center", "sigma", "widen"}, g);
    if (!ctx->status().ok()) return;
    CheckSaved(ctx, 1, grad.shape(), g);
    if (!ctx->status().ok()) return;
    Tensor *grad_in = nullptr, *dbias = nullptr, *dscale = nullptr;
    // grad_in overwrites grad when nothing else reads it: the kernels read
    // each element of grad (both sums first) before writing its grad_in.
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, grad.shape(), &grad_in));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({g.channels}),
                                             &dbias));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({g.channels}),
                                             &dscale));
    // With no pixels, the kernels still write dbias = dscale = 0.
    const GradArgs a{In(ctx, 0), ctx->input(1).data(), In(ctx, 2),
                     In(ctx, 3), In(ctx, 4), In(ctx, 5),
                     grad_in->flat<float>().data(),
                     dbias->flat<float>().data(),
                     dscale->flat<float>().data(), nullptr};
    Impl<Device>::Grad(ctx, g, relu_, a);
  }
};

#define BLPA_REGISTER_FUSED(name, Op, device_name, DeviceType)       \
  REGISTER_KERNEL_BUILDER(                                           \
      Name(name).Device(device_name).TypeConstraint<float>("T"),     \
      Op<DeviceType>);                                               \
  REGISTER_KERNEL_BUILDER(                                           \
      Name(name).Device(device_name).TypeConstraint<uint8_t>("T"),   \
      Op<DeviceType>)

BLPA_REGISTER_FUSED("BlpaBnReluForward", ForwardOp, ::tensorflow::DEVICE_CPU,
                    CPUDevice);
BLPA_REGISTER_FUSED("BlpaBnReluRestore", RestoreOp, ::tensorflow::DEVICE_CPU,
                    CPUDevice);
BLPA_REGISTER_FUSED("BlpaBnReluGrad", GradOp, ::tensorflow::DEVICE_CPU,
                    CPUDevice);

#if GOOGLE_CUDA
// All inputs and outputs, per-channel ones included, live in device memory.
BLPA_REGISTER_FUSED("BlpaBnReluForward", ForwardOp, ::tensorflow::DEVICE_GPU,
                    GPUDevice);
BLPA_REGISTER_FUSED("BlpaBnReluRestore", RestoreOp, ::tensorflow::DEVICE_GPU,
                    GPUDevice);
BLPA_REGISTER_FUSED("BlpaBnReluGrad", GradOp, ::tensorflow::DEVICE_GPU,
                    GPUDevice);
#endif  // GOOGLE_CUDA

}  // namespace
}  // namespace fused
}  // namespace blpa

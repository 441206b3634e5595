// Element math of the blpa activation quantizer, shared by the CPU kernels,
// the CUDA kernels and the standalone CUDA check (no TensorFlow includes).
//
// With n = 2**nbits bins of width 6/n and S = float32(n/6):
//   shift(c) = clamp(n/2 - floor(c*S), 1, n)        per channel offset c
//                                                    (subnormal c taken as 0)
//   q(a)     = clip(floor((a - 1e-6f) * S) + shift, 0, n-1)
//   approx   = (float(q - shift) + 0.5f) * (6.0f/n),  mask = (q >= shift)
// Every float32 operation happens in this order in both the kernels and the
// pure-TF fallback of blpa/quant.py, so the two agree bit for bit.
#ifndef BLPA_OPS_QUANT_COMMON_H_
#define BLPA_OPS_QUANT_COMMON_H_

#include <cfloat>
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define BLPA_HOST_DEVICE __host__ __device__
#else
#define BLPA_HOST_DEVICE
#endif

namespace blpa {

// Bytes of codes per pixel for C channels: ceil(C * nbits / 8).
BLPA_HOST_DEVICE inline int64_t PackedChannels(int64_t channels, int nbits) {
  return (channels * nbits + 7) / 8;
}

template <int kBits>
struct Quant {
  static_assert(kBits == 4 || kBits == 8, "nbits must be 4 or 8");
  static constexpr int kBins = 1 << kBits;
  // The float32 nearest to n/6 (n/6 is no float midpoint, so rounding the
  // double quotient gives the same float).
  static constexpr float kScale = static_cast<float>(kBins / 6.0);
  static constexpr float kWidth = 6.0f / kBins;  // exact: 0.375, 0.0234375
  static constexpr float kEps = 1e-6f;

  // Per-channel shift, computed in float then converted. Clamped to [1, n]:
  // the upper bound keeps the int conversion defined (and matches the
  // unclamped reference whenever shift < n); a NaN offset gives 1, +inf
  // gives 1, -inf gives n. A subnormal offset counts as 0 whatever the
  // flush-to-zero mode (TF's CPU threads flush subnormals, CUDA does not by
  // default; a tiny negative offset would otherwise floor to -1 on one side
  // and 0 on the other).
  BLPA_HOST_DEVICE static int32_t Shift(float offset) {
    offset = (fabsf(offset) < FLT_MIN) ? 0.0f : offset;  // NaN stays NaN
    float s = static_cast<float>(kBins / 2) - floorf(offset * kScale);
    s = (s >= 1.0f) ? s : 1.0f;  // NaN fails the comparison -> 1
    s = (s <= static_cast<float>(kBins)) ? s : static_cast<float>(kBins);
    return static_cast<int32_t>(s);
  }

  // Code of one activation. t is clamped to [-2n, n] before the floor: with
  // shift in [1, n] every t below -2n gives code 0 and every t above n gives
  // code n-1 either way, so this equals clip(floor(t) + shift, 0, n-1) for
  // all t, including +-inf; a NaN activation gives code 0. Inside the range
  // the floor is exact through int conversion (truncate, then step down).
  BLPA_HOST_DEVICE static int32_t Code(float a, int32_t shift) {
    const float lo = static_cast<float>(-2 * kBins);
    const float hi = static_cast<float>(kBins);
    float t = (a - kEps) * kScale;
    t = (t >= lo) ? t : lo;  // NaN -> lo
    t = (t <= hi) ? t : hi;
    int32_t f = static_cast<int32_t>(t);
    f -= (static_cast<float>(f) > t) ? 1 : 0;
    int32_t q = f + shift;
    q = (q >= 0) ? q : 0;
    return (q <= kBins - 1) ? q : kBins - 1;
  }

  BLPA_HOST_DEVICE static float Approx(int32_t code, int32_t shift) {
    return (static_cast<float>(code - shift) + 0.5f) * kWidth;
  }

  BLPA_HOST_DEVICE static bool Mask(int32_t code, int32_t shift) {
    return code >= shift;
  }

  // Packing: nbits=8 stores channel k in byte k; nbits=4 stores channel 2k in
  // the low nibble and channel 2k+1 in the high nibble of byte k (the high
  // nibble of the last byte is 0 when C is odd).
  // Code of channel k from the packed bytes of one pixel.
  BLPA_HOST_DEVICE static int32_t Unpack(const uint8_t* row, int64_t k) {
    if (kBits == 8) return row[k];
    return (row[k >> 1] >> ((k & 1) * 4)) & 0xF;
  }

  // Byte k of the packed codes of one pixel. `shifts[j]` gives the shift of
  // channel j (an int32 array, or ShiftsFromOffset below).
  template <typename Shifts>
  BLPA_HOST_DEVICE static uint8_t EncodeByte(const float* act_row,
                                             const Shifts& shifts,
                                             int64_t channels, int64_t k) {
    if (kBits == 8) return static_cast<uint8_t>(Code(act_row[k], shifts[k]));
    const int64_t c0 = 2 * k;
    const int32_t lo = Code(act_row[c0], shifts[c0]);
    const int32_t hi =
        (c0 + 1 < channels) ? Code(act_row[c0 + 1], shifts[c0 + 1]) : 0;
    return static_cast<uint8_t>(lo | (hi << 4));
  }

  // Restores channel k of one pixel from its packed bytes.
  template <typename Shifts>
  BLPA_HOST_DEVICE static void DecodeElement(const uint8_t* code_row,
                                             const Shifts& shifts, int64_t k,
                                             float* approx, bool* mask) {
    const int32_t q = Unpack(code_row, k);
    const int32_t s = shifts[k];
    *approx = Approx(q, s);
    *mask = Mask(q, s);
  }
};

// Shift source that computes each channel's shift from its offset on the fly
// (used by the CUDA kernels, which keep no per-channel scratch buffer).
template <int kBits>
struct ShiftsFromOffset {
  const float* offset;
  BLPA_HOST_DEVICE int32_t operator[](int64_t k) const {
    return Quant<kBits>::Shift(offset[k]);
  }
};

}  // namespace blpa

#endif  // BLPA_OPS_QUANT_COMMON_H_

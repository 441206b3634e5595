// Element math of BlpaRoundFixed (fixed-point rounding, Q(bd.ad)), shared by
// the CPU kernel, the CUDA kernel and the standalone GPU check (no
// TensorFlow includes). The pure-TF fallback in blpa/fixedpoint/rounding.py
// does the same float32 operations in the same order, so all agree bit for
// bit.
//
// Format Q(bd.ad): bd bits before the binary point including the sign bit,
// ad after it; 1 <= bd, 0 <= ad, bd + ad <= 24. With S = 2^ad and the integer
// M = 2^(bd-1+ad) - 1 (MAXVAL = M / S = 2^(bd-1) - 2^-ad):
//
//   deterministic: t = min(|x|*S, M); f = floor(t) + (t - floor(t) >= 0.5)
//                  y = f / S, negated (as 0 - y) when x < 0
//                  (C's round: halves away from zero, not to even)
//   stochastic:    t = clamp(x*S, -M, M); f = floor(t) + (t - floor(t) + U >= 1)
//                  y = f / S, U in [0, 1) from the hash below
//
// Clamping t to the integer M before rounding gives the same value as
// rounding and then saturating. NaN stays NaN (the input is returned); +-inf
// saturate to +-MAXVAL. No -0.0 is ever produced. All steps are exact in
// float32 except the sum t - floor(t) + U (rounded the same way everywhere).
//
// Stochastic U: a counter-based hash of (seed, flat element index i mod 2^32):
//   fmix32 = murmur3's 32-bit finalizer
//   k1 = fmix32(lo32(seed) ^ 0x9E3779B9), k2 = fmix32(hi32(seed) ^ k1 ^ 0x7F4A7C15)
//   h  = fmix32(fmix32(i ^ k1) ^ k2);  U = (h >> 8) * 2^-24
#ifndef BLPA_OPS_FIXEDPOINT_COMMON_H_
#define BLPA_OPS_FIXEDPOINT_COMMON_H_

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define BLPA_FXP_HD __host__ __device__
#else
#define BLPA_FXP_HD
#endif

namespace blpa {
namespace fixedpoint {

constexpr int kMaxWordBits = 24;  // bd + ad: every code exact in float32

// Whether Q(bd.ad) is a valid format.
BLPA_FXP_HD inline bool ValidFormat(int bd, int ad) {
  return bd >= 1 && ad >= 0 && bd + ad <= kMaxWordBits;
}

// Constants of one format (all exact in float32).
struct Format {
  float scale;      // 2^ad
  float inv_scale;  // 2^-ad
  float max_code;   // M = 2^(bd-1+ad) - 1
};

BLPA_FXP_HD inline Format MakeFormat(int bd, int ad) {
  Format f;
  f.scale = ldexpf(1.0f, ad);
  f.inv_scale = ldexpf(1.0f, -ad);
  f.max_code = ldexpf(1.0f, bd - 1 + ad) - 1.0f;
  return f;
}

// murmur3's 32-bit finalizer (a bijection on uint32).
BLPA_FXP_HD inline uint32_t Fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The two 32-bit keys of one seed.
struct StreamKey {
  uint32_t k1, k2;
};

BLPA_FXP_HD inline StreamKey KeyFromSeed(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  StreamKey key;
  key.k1 = Fmix32(static_cast<uint32_t>(s) ^ 0x9E3779B9u);
  key.k2 = Fmix32(static_cast<uint32_t>(s >> 32) ^ key.k1 ^ 0x7F4A7C15u);
  return key;
}

// U in [0, 1), a multiple of 2^-24, for the element with flat index i
// (`index` = i mod 2^32).
BLPA_FXP_HD inline float Uniform(const StreamKey& key, uint32_t index) {
  const uint32_t h = Fmix32(Fmix32(index ^ key.k1) ^ key.k2);
  return static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
}

// floor(t) for |t| <= 2^23 (t may be NaN: the result is then unspecified and
// the callers return x). kFloorf: one rounding instruction (SSE4.1/AVX/CUDA);
// otherwise truncation stepped down (vectorizes with SSE2). Same value.
template <bool kFloorf>
BLPA_FXP_HD inline float FloorSmall(float t) {
  if (kFloorf) return floorf(t);
  const float r = static_cast<float>(static_cast<int32_t>(t));
  return (r > t) ? r - 1.0f : r;
}

template <bool kFloorf = true>
BLPA_FXP_HD inline float RoundDeterministic(float x, const Format& f) {
  float t = fabsf(x) * f.scale;
  t = (t > f.max_code) ? f.max_code : t;  // NaN stays NaN, inf -> M
  float r = FloorSmall<kFloorf>(t);
  r += (t - r >= 0.5f) ? 1.0f : 0.0f;
  const float y = r * f.inv_scale;
  const float s = (x < 0.0f) ? 0.0f - y : y;
  return (x == x) ? s : x;
}

template <bool kFloorf = true>
BLPA_FXP_HD inline float RoundStochastic(float x, float u, const Format& f) {
  float t = x * f.scale;
  t = (t > f.max_code) ? f.max_code : t;
  t = (t < -f.max_code) ? -f.max_code : t;
  float r = FloorSmall<kFloorf>(t);
  r += ((t - r) + u >= 1.0f) ? 1.0f : 0.0f;
  const float y = r * f.inv_scale;
  return (x == x) ? y : x;
}

}  // namespace fixedpoint
}  // namespace blpa

#endif  // BLPA_OPS_FIXEDPOINT_COMMON_H_

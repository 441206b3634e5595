// Standalone check of the BlpaRoundFixed CUDA kernel (no TensorFlow).
//
//   nvcc -std=c++17 -O3 -fmad=false -o fixedpoint_check ops/fixedpoint_check.cu
//   ./fixedpoint_check [seed]
//
// 1. Runs LaunchRoundFixed on random data (grid points, half-step ties of
//    both signs and their float neighbours, values beyond +-MAXVAL, +-inf,
//    NaN, subnormals, Gaussian noise) for formats from Q1.0 to Q24.0 and
//    Q1.23, both roundings and several seeds, and compares bit for bit with
//    the host functions of fixedpoint_common.h (both floor variants).
// 2. Reports throughput on a [128,32,32,64] tensor (4 bytes read + 4 written
//    per element) next to a device-to-device cudaMemcpy of the tensor.
// Exits 1 on any mismatch or CUDA error.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "fixedpoint_kernels.cu.cc"
#include "cuda_check_common.h"

namespace {

using blpa::check::TimeMs;

namespace fxp = blpa::fixedpoint;

struct DeviceFloats {
  float* ptr = nullptr;
  explicit DeviceFloats(size_t n) {
    CHECK_CUDA(cudaMalloc(&ptr, n * sizeof(float) + 4));  // n may be 0
  }
  ~DeviceFloats() { cudaFree(ptr); }
  DeviceFloats(const DeviceFloats&) = delete;
  DeviceFloats& operator=(const DeviceFloats&) = delete;
};

// Values on and beside the grid of Q(bd.ad), beyond the range, non-finite.
float RandomValue(std::mt19937& rng, int bd, int ad) {
  const float step = std::ldexp(1.0f, -ad);
  const float maxval = std::ldexp(1.0f, bd - 1) - step;
  std::uniform_int_distribution<int> kind(0, 9);
  std::uniform_real_distribution<float> span(-1.2f * maxval, 1.2f * maxval);
  const float grid = std::round(span(rng) / step) * step;
  switch (kind(rng)) {
    case 0: return grid;
    case 1: return grid + 0.5f * step;  // half-step tie (either sign)
    case 2: return std::nextafter(grid + 0.5f * step, 1e30f);
    case 3: return std::nextafter(grid + 0.5f * step, -1e30f);
    case 4: return maxval + step * static_cast<float>(kind(rng)) * 0.37f;
    case 5: return -maxval - step * static_cast<float>(kind(rng)) * 0.37f;
    case 6: {
      const float special[] = {std::numeric_limits<float>::infinity(),
                               -std::numeric_limits<float>::infinity(),
                               std::numeric_limits<float>::quiet_NaN(),
                               0.0f, -0.0f, 1e-40f, -1e-40f, 1e30f, -1e30f,
                               0.49999997f};
      std::uniform_int_distribution<int> pick(0, 9);
      return special[pick(rng)];
    }
    default: return span(rng);
  }
}

// Host result of element i, with the given floor variant.
template <bool kFloorf>
float HostRound(float x, uint32_t i, const fxp::Format& f, bool stochastic,
                const fxp::StreamKey& key) {
  if (!stochastic) return fxp::RoundDeterministic<kFloorf>(x, f);
  return fxp::RoundStochastic<kFloorf>(x, fxp::Uniform(key, i), f);
}

// One case; returns 1 on a mismatch (reported), 0 otherwise.
int CheckCase(std::mt19937& rng, int64_t n, int bd, int ad, bool stochastic,
              int64_t seed) {
  std::vector<float> x(n), got(n);
  for (float& v : x) v = RandomValue(rng, bd, ad);
  DeviceFloats d_x(n), d_y(n);
  CHECK_CUDA(cudaMemcpy(d_x.ptr, x.data(), n * sizeof(float),
                        cudaMemcpyHostToDevice));
  CHECK_CUDA(fxp::LaunchRoundFixed(d_x.ptr, d_y.ptr, n, bd, ad, stochastic,
                                   seed, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaMemcpy(got.data(), d_y.ptr, n * sizeof(float),
                        cudaMemcpyDeviceToHost));
  const fxp::Format f = fxp::MakeFormat(bd, ad);
  const fxp::StreamKey key = fxp::KeyFromSeed(seed);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t idx = static_cast<uint32_t>(i);
    const float a = HostRound<true>(x[i], idx, f, stochastic, key);
    const float b = HostRound<false>(x[i], idx, f, stochastic, key);
    if (std::memcmp(&a, &got[i], 4) != 0 || std::memcmp(&a, &b, 4) != 0) {
      std::printf("MISMATCH Q%d.%d %s seed %lld at %lld: x=%.9g gpu=%.9g "
                  "host=%.9g host(trunc)=%.9g\n", bd, ad,
                  stochastic ? "stochastic" : "deterministic",
                  static_cast<long long>(seed), static_cast<long long>(i),
                  x[i], got[i], a, b);
      return 1;
    }
  }
  return 0;
}

void Throughput(std::mt19937& rng) {
  const int64_t n = int64_t{128} * 32 * 32 * 64;
  std::vector<float> x(n);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (float& v : x) v = normal(rng);
  DeviceFloats d_x(n), d_y(n);
  CHECK_CUDA(cudaMemcpy(d_x.ptr, x.data(), n * sizeof(float),
                        cudaMemcpyHostToDevice));
  const double moved = 8.0 * n;  // bytes read + written
  const float copy_ms = TimeMs(
      [&] {
        CHECK_CUDA(cudaMemcpyAsync(d_y.ptr, d_x.ptr, n * sizeof(float),
                                   cudaMemcpyDeviceToDevice));
      },
      50);
  std::printf("throughput, x [128,32,32,64] (%.1f MB moved per call):\n",
              moved / 1e6);
  std::printf("  %-14s %7.3f ms %7.1f GB/s\n", "cudaMemcpy", copy_ms,
              moved / (copy_ms * 1e6));
  for (bool stochastic : {false, true}) {
    const float ms = TimeMs(
        [&] {
          CHECK_CUDA(fxp::LaunchRoundFixed(d_x.ptr, d_y.ptr, n, 8, 8,
                                           stochastic, 42, 0));
        },
        50);
    std::printf("  %-14s %7.3f ms %7.1f GB/s | %5.1f%% of memcpy\n",
                stochastic ? "Q8.8 stoch." : "Q8.8 determ.", ms,
                moved / (ms * 1e6), 100.0 * copy_ms / ms);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937 rng(blpa::check::SeedAndDevice(argc, argv));
  const int formats[][2] = {{1, 0},  {1, 15}, {1, 23}, {2, 2},  {3, 13},
                            {4, 4},  {5, 11}, {8, 8},  {12, 12}, {16, 0},
                            {16, 8}, {24, 0}};
  std::uniform_int_distribution<int64_t> rand_n(1, 200000);
  const int64_t seeds[] = {0, 1, -1, int64_t{1} << 40, 987654321};
  int failures = 0, cases = 0;
  for (const auto& fmt : formats) {
    for (bool stochastic : {false, true}) {
      for (int64_t s : seeds) {
        failures += CheckCase(rng, rand_n(rng), fmt[0], fmt[1], stochastic, s);
        ++cases;
      }
    }
  }
  failures += CheckCase(rng, 0, 8, 8, true, 3);
  ++cases;
  // Invalid formats must be refused by the launcher.
  const int bad[][2] = {{0, 8}, {1, -1}, {20, 5}};
  for (const auto& fmt : bad) {
    if (fxp::LaunchRoundFixed(nullptr, nullptr, 1, fmt[0], fmt[1], false, 0,
                              0) != cudaErrorInvalidValue) {
      std::printf("MISMATCH: Q%d.%d was not refused\n", fmt[0], fmt[1]);
      ++failures;
    }
  }
  std::printf("%d cases, %d mismatches\n", cases, failures);
  Throughput(rng);
  if (failures) {
    std::printf("FAILED\n");
    return 1;
  }
  std::printf("OK: GPU kernel matches fixedpoint_common.h bit for bit\n");
  return 0;
}

// Standalone check of the blpa CUDA kernels (no TensorFlow).
//
//   nvcc -O3 -o cuda_check ops/cuda_check.cu && ./cuda_check [seed]
//
// 1. Runs LaunchSaveAct / LaunchRestoreAct on random data (random shapes, odd
//    channel counts, values on and beside bin edges, far outside the range,
//    +-inf, NaN and subnormal, random/huge/non-finite/subnormal offsets, both
//    nbits) and compares bit for bit against the host functions of
//    quant_common.h.
// 2. Reports throughput on a [128,32,32,64] activation: bytes read + written
//    per second, next to a device-to-device cudaMemcpy that moves as many
//    bytes (copy of (read + written) / 2 bytes).
// Exits 1 on any mismatch or CUDA error.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "quant_kernels.cu.cc"
#include "cuda_check_common.h"

namespace {

using blpa::check::TimeMs;

using blpa::PackedChannels;

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  explicit DeviceBuffer(size_t n) {
    CHECK_CUDA(cudaMalloc(&ptr, n * sizeof(T) + 1));  // +1: n may be 0
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

template <typename T>
T* ToDevice(DeviceBuffer<T>& d, const std::vector<T>& h) {
  CHECK_CUDA(cudaMemcpy(d.ptr, h.data(), h.size() * sizeof(T),
                        cudaMemcpyHostToDevice));
  return d.ptr;
}

template <typename T>
std::vector<T> ToHost(const T* d, size_t n) {
  std::vector<T> h(n);
  CHECK_CUDA(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// Activation values: bin edges k*6/n and their +-1e-6 and +-1 ulp
// neighbours, zero, far outside the range, non-finite, and Gaussian noise.
float RandomActivation(std::mt19937& rng, int nbits) {
  const int n = 1 << nbits;
  std::uniform_int_distribution<int> kind(0, 9), bin(-2 * n, 2 * n);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const float edge = static_cast<float>(bin(rng)) * (6.0f / n);
  switch (kind(rng)) {
    case 0: return edge;
    case 1: return edge + 1e-6f;
    case 2: return edge - 1e-6f;
    case 3: return std::nextafter(edge, 1e30f);
    case 4: return std::nextafter(edge, -1e30f);
    case 5: return 0.0f;
    case 6: {
      const float far[] = {1e30f, -1e30f, 1e9f, -1e9f,
                           std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN(), -0.0f,
                           1e-40f, -1e-40f};  // subnormals
      std::uniform_int_distribution<int> pick(0, 9);
      return far[pick(rng)];
    }
    default: return normal(rng);
  }
}

float RandomOffset(std::mt19937& rng) {
  std::uniform_int_distribution<int> kind(0, 19);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  switch (kind(rng)) {
    case 0: return 0.0f;
    case 1: return 1e20f;
    case 2: return -1e20f;
    case 3: return std::numeric_limits<float>::quiet_NaN();
    case 4: return std::numeric_limits<float>::infinity();
    case 5: return -std::numeric_limits<float>::infinity();
    case 6: return -1e-40f;  // subnormal: counts as 0
    case 7: return -std::numeric_limits<float>::min() / 2;
    default: return normal(rng);
  }
}

template <int kBits>
void HostSave(const std::vector<float>& act, const std::vector<float>& offset,
              int64_t pixels, int64_t channels, std::vector<uint8_t>* codes) {
  const int64_t bytes = PackedChannels(channels, kBits);
  const blpa::ShiftsFromOffset<kBits> shifts{offset.data()};
  codes->assign(pixels * bytes, 0);
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t k = 0; k < bytes; ++k) {
      (*codes)[p * bytes + k] = blpa::Quant<kBits>::EncodeByte(
          act.data() + p * channels, shifts, channels, k);
    }
  }
}

template <int kBits>
void HostRestore(const std::vector<uint8_t>& codes,
                 const std::vector<float>& offset, int64_t pixels,
                 int64_t channels, std::vector<float>* approx,
                 std::vector<uint8_t>* mask) {
  const int64_t bytes = PackedChannels(channels, kBits);
  const blpa::ShiftsFromOffset<kBits> shifts{offset.data()};
  approx->assign(pixels * channels, 0.0f);
  mask->assign(pixels * channels, 0);
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t k = 0; k < channels; ++k) {
      bool m;
      blpa::Quant<kBits>::DecodeElement(codes.data() + p * bytes, shifts, k,
                                        &(*approx)[p * channels + k], &m);
      (*mask)[p * channels + k] = m;
    }
  }
}

// Index of the first differing element of two equally long arrays (bitwise),
// or -1.
template <typename T>
int64_t FirstMismatch(const std::vector<T>& a, const std::vector<T>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return i;
  }
  return -1;
}

// One random case: save on device vs host, then restore (of the device codes
// and of random bytes) on device vs host. Returns the number of failures.
template <int kBits>
int CheckCase(std::mt19937& rng, int64_t pixels, int64_t channels) {
  const int64_t bytes = PackedChannels(channels, kBits);
  std::vector<float> act(pixels * channels), offset(channels);
  for (float& a : act) a = RandomActivation(rng, kBits);
  for (float& c : offset) c = RandomOffset(rng);

  DeviceBuffer<float> d_act(act.size()), d_off(offset.size()),
      d_approx(act.size());
  DeviceBuffer<uint8_t> d_codes(pixels * bytes);
  DeviceBuffer<bool> d_mask(act.size());
  ToDevice(d_act, act);
  ToDevice(d_off, offset);

  int failures = 0;
  auto report = [&](const char* what, int64_t at) {
    if (at < 0) return;
    ++failures;
    std::printf("MISMATCH nbits=%d pixels=%lld C=%lld %s at index %lld\n",
                kBits, static_cast<long long>(pixels),
                static_cast<long long>(channels), what,
                static_cast<long long>(at));
  };

  CHECK_CUDA(blpa::LaunchSaveAct(d_act.ptr, d_off.ptr, d_codes.ptr, pixels,
                                 channels, kBits, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<uint8_t> want_codes;
  HostSave<kBits>(act, offset, pixels, channels, &want_codes);
  std::vector<uint8_t> got_codes = ToHost(d_codes.ptr, want_codes.size());
  report("codes", FirstMismatch(got_codes, want_codes));

  for (int round = 0; round < 2; ++round) {
    std::vector<uint8_t> codes = want_codes;
    if (round == 1) {  // every byte value, high nibble of odd C included
      std::uniform_int_distribution<int> byte(0, 255);
      for (uint8_t& b : codes) b = static_cast<uint8_t>(byte(rng));
      ToDevice(d_codes, codes);
    }
    CHECK_CUDA(blpa::LaunchRestoreAct(d_codes.ptr, d_off.ptr, d_approx.ptr,
                                      d_mask.ptr, pixels, channels, kBits, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<float> want_approx;
    std::vector<uint8_t> want_mask;
    HostRestore<kBits>(codes, offset, pixels, channels, &want_approx,
                       &want_mask);
    std::vector<float> got_approx = ToHost(d_approx.ptr, act.size());
    std::vector<uint8_t> got_mask =
        ToHost(reinterpret_cast<uint8_t*>(d_mask.ptr), act.size());
    report(round ? "approx (random codes)" : "approx",
           FirstMismatch(got_approx, want_approx));
    report(round ? "mask (random codes)" : "mask",
           FirstMismatch(got_mask, want_mask));
  }
  return failures;
}

template <int kBits>
void Throughput(std::mt19937& rng) {
  const int64_t pixels = 128 * 32 * 32, channels = 64;
  const int64_t elems = pixels * channels;
  const int64_t bytes = pixels * PackedChannels(channels, kBits);
  std::vector<float> act(elems), offset(channels);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (float& a : act) a = normal(rng);
  for (float& c : offset) c = normal(rng);
  DeviceBuffer<float> d_act(elems), d_off(channels), d_approx(elems);
  DeviceBuffer<uint8_t> d_codes(bytes);
  DeviceBuffer<bool> d_mask(elems);
  ToDevice(d_act, act);
  ToDevice(d_off, offset);

  const int iters = 50;
  auto line = [](const char* what, double moved, float ms) {
    DeviceBuffer<uint8_t> src(static_cast<size_t>(moved / 2));
    DeviceBuffer<uint8_t> dst(static_cast<size_t>(moved / 2));
    const float copy_ms = TimeMs(
        [&] {
          CHECK_CUDA(cudaMemcpyAsync(dst.ptr, src.ptr,
                                     static_cast<size_t>(moved / 2),
                                     cudaMemcpyDeviceToDevice));
        },
        50);
    const double gbs = moved / (ms * 1e6), copy_gbs = moved / (copy_ms * 1e6);
    std::printf(
        "  %-8s %8.1f MB moved  %7.3f ms  %7.1f GB/s | cudaMemcpy %7.3f ms "
        "%7.1f GB/s | %5.1f%% of memcpy\n",
        what, moved / 1e6, ms, gbs, copy_ms, copy_gbs, 100.0 * gbs / copy_gbs);
  };
  std::printf("throughput nbits=%d, act [128,32,32,64]:\n", kBits);
  const float save_ms = TimeMs(
      [&] {
        CHECK_CUDA(blpa::LaunchSaveAct(d_act.ptr, d_off.ptr, d_codes.ptr,
                                       pixels, channels, kBits, 0));
      },
      iters);
  line("save", 4.0 * elems + bytes, save_ms);
  const float restore_ms = TimeMs(
      [&] {
        CHECK_CUDA(blpa::LaunchRestoreAct(d_codes.ptr, d_off.ptr,
                                          d_approx.ptr, d_mask.ptr, pixels,
                                          channels, kBits, 0));
      },
      iters);
  line("restore", bytes + 5.0 * elems, restore_ms);
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937 rng(blpa::check::SeedAndDevice(argc, argv));

  // Fixed shapes (odd, large and tiny C; empty batch), then random ones.
  const int64_t fixed_channels[] = {1, 2, 3, 5, 7, 8, 16, 17, 33, 64, 257};
  std::uniform_int_distribution<int64_t> rand_px(1, 3000), rand_c(1, 300);
  int failures = 0, cases = 0;
  for (int64_t c : fixed_channels) {
    for (int64_t px : {int64_t{0}, int64_t{1}, rand_px(rng)}) {
      failures += CheckCase<4>(rng, px, c) + CheckCase<8>(rng, px, c);
      cases += 2;
    }
  }
  for (int i = 0; i < 40; ++i) {
    const int64_t px = rand_px(rng), c = rand_c(rng);
    failures += CheckCase<4>(rng, px, c) + CheckCase<8>(rng, px, c);
    cases += 2;
  }
  // Invalid nbits must be refused by the launchers.
  if (blpa::LaunchSaveAct(nullptr, nullptr, nullptr, 1, 1, 5, 0) !=
          cudaErrorInvalidValue ||
      blpa::LaunchRestoreAct(nullptr, nullptr, nullptr, nullptr, 1, 1, 5, 0) !=
          cudaErrorInvalidValue) {
    std::printf("MISMATCH: nbits=5 was not refused\n");
    ++failures;
  }
  std::printf("%d cases, %d mismatches\n", cases, failures);

  Throughput<4>(rng);
  Throughput<8>(rng);
  if (failures) {
    std::printf("FAILED\n");
    return 1;
  }
  std::printf("OK: GPU kernels match quant_common.h bit for bit\n");
  return 0;
}

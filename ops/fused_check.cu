// Standalone check of the fused BN-ReLU-quantize CUDA kernels (no
// TensorFlow).
//
//   nvcc -std=c++17 -O3 -fmad=false -o fused_check ops/fused_check.cu
//   ./fused_check [seed]
//
// 1. Runs LaunchBnReluForward / Restore / Grad on random data (random and
//    fixed shapes, odd channel counts, C = 1, an empty batch; nbits 0, 4, 8;
//    with and without ReLU) and compares bit for bit against host code of
//    the same math (fused_common.h, quant_common.h; the gradient's sums in
//    the same chunks, in double, in the same order).
// 2. Reports each kernel's throughput on a [128,32,32,64] activation as a
//    fraction of a device-to-device cudaMemcpy moving as many bytes
//    ((read + written) / 2).
// Exits 1 on any mismatch or CUDA error.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "fused_kernels.cu.cc"
#include "cuda_check_common.h"

namespace {

using blpa::check::TimeMs;

using namespace blpa::fused;  // NOLINT
using blpa::PackedChannels;
using blpa::Quant;

// A device copy of a host vector, freed at scope end.
template <typename T>
struct Device {
  T* ptr = nullptr;
  size_t n = 0;
  explicit Device(size_t count) : n(count) {
    CHECK_CUDA(cudaMalloc(&ptr, n * sizeof(T) + 8));
  }
  explicit Device(const std::vector<T>& h) : Device(h.size()) {
    CHECK_CUDA(cudaMemcpy(ptr, h.data(), n * sizeof(T),
                          cudaMemcpyHostToDevice));
  }
  ~Device() { cudaFree(ptr); }
  std::vector<T> Host() const {
    std::vector<T> h(n);
    CHECK_CUDA(cudaMemcpy(h.data(), ptr, n * sizeof(T),
                          cudaMemcpyDeviceToHost));
    return h;
  }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
};

// Host reference of one call: the element math of fused_common.h.
struct Case {
  int64_t px, c, bytes;
  int nbits;
  bool relu;
  std::vector<float> z, mean, sigma, scale, bias, grad, widen;
};

template <int kBits>
int32_t CodeOf(float h, float cs, float b) {
  return Quant<kBits>::Code(h / cs, Quant<kBits>::Shift(b / cs));
}

// Saved bytes (float or codes) of the forward pass, and out.
void HostForward(const Case& k, std::vector<float>* out,
                 std::vector<uint8_t>* saved) {
  out->assign(k.px * k.c, 0.0f);
  saved->assign(k.px * k.bytes * (k.nbits ? 1 : 4), 0);
  for (int64_t p = 0; p < k.px; ++p) {
    for (int64_t ch = 0; ch < k.c; ++ch) {
      const int64_t i = p * k.c + ch;
      const float u = Normalize(k.z[i], k.mean[ch], k.sigma[ch]);
      const float h = PreActivation(u, k.scale[ch], k.bias[ch]);
      (*out)[i] = k.relu ? Relu(h) : h;
      uint8_t* row = saved->data() + p * k.bytes;
      if (k.nbits == 0) {
        std::memcpy(saved->data() + 4 * i, &u, 4);
      } else if (k.nbits == 8) {
        row[ch] = CodeOf<8>(h, k.scale[ch], k.bias[ch]);
      } else {
        row[ch / 2] |= CodeOf<4>(h, k.scale[ch], k.bias[ch]) << (4 * (ch % 2));
      }
    }
  }
}

// y, mask and h~ of element i from the saved bytes.
float HostY(const Case& k, const std::vector<uint8_t>& saved,
            const std::vector<float>& center, int64_t i, bool* keep,
            float* h) {
  const int64_t p = i / k.c, ch = i % k.c;
  if (k.nbits == 0) {
    float u;
    std::memcpy(&u, saved.data() + 4 * i, 4);
    *h = PreActivation(u, k.scale[ch], center[ch]);
    *keep = !k.relu || *h > 0.0f;
    return u;
  }
  int32_t q, s;
  float approx;
  if (k.nbits == 8) {
    q = Quant<8>::Unpack(saved.data() + p * k.bytes, ch);
    s = Quant<8>::Shift(center[ch]);
    approx = Quant<8>::Approx(q, s);
  } else {
    q = Quant<4>::Unpack(saved.data() + p * k.bytes, ch);
    s = Quant<4>::Shift(center[ch]);
    approx = Quant<4>::Approx(q, s);
  }
  *h = approx * k.scale[ch];
  *keep = !k.relu || q >= s;
  return approx - center[ch];
}

void HostBackward(const Case& k, const std::vector<uint8_t>& saved,
                  const std::vector<float>& center, std::vector<float>* act,
                  std::vector<float>* grad_in, std::vector<float>* db,
                  std::vector<float>* ds) {
  const int64_t n = k.px * k.c, chunks = ReduceChunks(k.px);
  act->assign(n, 0.0f);
  grad_in->assign(n, 0.0f);
  db->assign(k.c, 0.0f);
  ds->assign(k.c, 0.0f);
  std::vector<float> m1(k.c), m2(k.c);
  for (int64_t ch = 0; ch < k.c; ++ch) {
    double t1 = 0, t2 = 0, t3 = 0;
    for (int64_t j = 0; j < chunks; ++j) {
      double s1 = 0, s2 = 0, s3 = 0;
      for (int64_t p = ChunkBegin(j, chunks, k.px);
           p < ChunkBegin(j + 1, chunks, k.px); ++p) {
        bool keep;
        float h;
        const float y =
            HostY(k, saved, center, p * k.c + ch, &keep, &h) * k.widen[ch];
        const float gm = keep ? k.grad[p * k.c + ch] : 0.0f;
        const float gy = gm * y;
        s1 += gm;
        s2 += gy;
        s3 += y;
      }
      t1 += s1;
      t2 += s2;
      t3 += s3;
    }
    if (k.px == 0) continue;
    const GradStats st = FinishSums(t1, t2, t3, k.scale[ch], k.px);
    (*db)[ch] = st.dbias;
    (*ds)[ch] = st.dscale;
    m1[ch] = st.m1;
    m2[ch] = st.m2;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ch = i % k.c;
    bool keep;
    float h;
    const float y = HostY(k, saved, center, i, &keep, &h) * k.widen[ch];
    (*act)[i] = k.relu ? Relu(h) : h;
    const float gm = keep ? k.grad[i] : 0.0f;
    (*grad_in)[i] = GradIn(gm, y, k.scale[ch], m1[ch], m2[ch], k.sigma[ch]);
  }
}

Case MakeCase(std::mt19937& rng, int64_t px, int64_t c, int nbits, bool relu) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.5f, 2.0f);
  Case k{px, c, nbits ? PackedChannels(c, nbits) : c, nbits, relu};
  for (int64_t i = 0; i < px * c; ++i) {
    k.z.push_back(2.0f * normal(rng) + 0.5f);
    k.grad.push_back(normal(rng));
  }
  for (int64_t ch = 0; ch < c; ++ch) {
    k.mean.push_back(0.5f + 0.1f * normal(rng));
    k.sigma.push_back(uniform(rng) * 2.0f);
    k.scale.push_back(uniform(rng));
    k.bias.push_back(normal(rng));
    // Half the channels widened (codes spanning more than ±3), half not.
    k.widen.push_back(ch % 2 ? 1.0f + uniform(rng) : 1.0f);
  }
  return k;
}

template <typename T>
int Compare(const char* what, const Case& k, const std::vector<T>& got,
            const std::vector<T>& want) {
  if (got.size() == want.size() &&
      std::memcmp(got.data(), want.data(), got.size() * sizeof(T)) == 0) {
    return 0;
  }
  std::printf("MISMATCH %s: pixels %lld, C %lld, nbits %d, relu %d\n", what,
              static_cast<long long>(k.px), static_cast<long long>(k.c),
              k.nbits, k.relu);
  return 1;
}

std::vector<float> Centers(const Case& k) {
  std::vector<float> center(k.c);
  for (int64_t ch = 0; ch < k.c; ++ch) {
    center[ch] = k.nbits ? k.bias[ch] / k.scale[ch] : k.bias[ch];
  }
  return center;
}

int CheckCase(std::mt19937& rng, int64_t px, int64_t c, int nbits, bool relu) {
  const Case k = MakeCase(rng, px, c, nbits, relu);
  const int64_t n = px * c;
  std::vector<float> out;
  std::vector<uint8_t> saved;
  HostForward(k, &out, &saved);
  const std::vector<float> center = Centers(k);
  std::vector<float> act, grad_in, db, ds;
  HostBackward(k, saved, center, &act, &grad_in, &db, &ds);

  Device<float> z(k.z), mean(k.mean), sigma(k.sigma), scale(k.scale),
      bias(k.bias), grad(k.grad), cen(center), widen(k.widen), d_out(n),
      d_act(n), d_gin(n), d_db(c), d_ds(c);
  Device<uint8_t> d_saved(saved.size()), scratch(GradScratchBytes(px, c));
  CHECK_CUDA(LaunchBnReluForward({z.ptr, mean.ptr, sigma.ptr, scale.ptr,
                                  bias.ptr, d_out.ptr, d_saved.ptr},
                                 px, c, nbits, relu, 0));
  CHECK_CUDA(LaunchBnReluRestore({d_saved.ptr, scale.ptr, cen.ptr, d_act.ptr},
                                 px, c, nbits, relu, 0));
  CHECK_CUDA(cudaMemset(d_db.ptr, 0, c * 4));
  CHECK_CUDA(cudaMemset(d_ds.ptr, 0, c * 4));
  CHECK_CUDA(LaunchBnReluGrad({grad.ptr, d_saved.ptr, scale.ptr, cen.ptr,
                               sigma.ptr, widen.ptr, d_gin.ptr, d_db.ptr,
                               d_ds.ptr, scratch.ptr},
                              px, c, nbits, relu, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  return Compare("out", k, d_out.Host(), out) +
         Compare("saved", k, d_saved.Host(), saved) +
         Compare("act", k, d_act.Host(), act) +
         Compare("grad_in", k, d_gin.Host(), grad_in) +
         Compare("dbias", k, d_db.Host(), db) +
         Compare("dscale", k, d_ds.Host(), ds);
}

// Throughput of each kernel as a fraction of a copy moving as many bytes.
void Throughput(std::mt19937& rng, int nbits) {
  const int64_t px = 128 * 32 * 32, c = 64, n = px * c;
  const Case k = MakeCase(rng, px, c, nbits, true);
  const int64_t saved_bytes = nbits ? px * PackedChannels(c, nbits) : 4 * n;
  Device<float> z(k.z), mean(k.mean), sigma(k.sigma), scale(k.scale),
      bias(k.bias), grad(k.grad), widen(k.widen), out(n), act(n), gin(n),
      db(c), ds(c);
  Device<uint8_t> saved(saved_bytes), scratch(GradScratchBytes(px, c)),
      copy_a(8 * n + saved_bytes), copy_b(8 * n + saved_bytes);
  auto copy_ms = [&](int64_t bytes) {
    return TimeMs([&] {
      CHECK_CUDA(cudaMemcpyAsync(copy_b.ptr, copy_a.ptr, bytes,
                                 cudaMemcpyDeviceToDevice));
    });
  };
  auto report = [&](const char* name, float ms, int64_t moved) {
    std::printf("  %-8s nbits %d: %.3f ms, %.1f GB/s, %.0f%% of a copy\n",
                name, nbits, ms, moved / ms * 1e-6,
                100.0f * copy_ms(moved / 2) / ms);
  };
  report("forward", TimeMs([&] {
           CHECK_CUDA(LaunchBnReluForward({z.ptr, mean.ptr, sigma.ptr,
                                           scale.ptr, bias.ptr, out.ptr,
                                           saved.ptr},
                                          px, c, nbits, true, 0));
         }),
         8 * n + saved_bytes);
  report("restore", TimeMs([&] {
           CHECK_CUDA(LaunchBnReluRestore({saved.ptr, scale.ptr, bias.ptr,
                                           act.ptr},
                                          px, c, nbits, true, 0));
         }),
         4 * n + saved_bytes);
  // Two reads of grad and saved (sums, then output), one write.
  report("grad", TimeMs([&] {
           CHECK_CUDA(LaunchBnReluGrad({grad.ptr, saved.ptr, scale.ptr,
                                        bias.ptr, sigma.ptr, widen.ptr,
                                        gin.ptr, db.ptr, ds.ptr, scratch.ptr},
                                       px, c, nbits, true, 0));
         }),
         12 * n + 2 * saved_bytes);
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937 rng(blpa::check::SeedAndDevice(argc, argv));
  std::uniform_int_distribution<int64_t> rand_px(1, 3000), rand_c(1, 300);
  int failures = 0, cases = 0;
  for (int nbits : {0, 4, 8}) {
    for (bool relu : {true, false}) {
      for (int64_t c : {1, 3, 8, 13, 16, 64, 257}) {
        for (int64_t px : {int64_t{0}, int64_t{1}, rand_px(rng)}) {
          failures += CheckCase(rng, px, c, nbits, relu);
          ++cases;
        }
      }
      for (int i = 0; i < 5; ++i) {
        failures += CheckCase(rng, rand_px(rng), rand_c(rng), nbits, relu);
        ++cases;
      }
    }
  }
  if (LaunchBnReluForward({}, 1, 1, 5, true, 0) != cudaErrorInvalidValue) {
    std::printf("MISMATCH: nbits=5 was not refused\n");
    ++failures;
  }
  std::printf("%d cases, %d mismatches\n", cases, failures);
  std::printf("throughput on [128,32,32,64]:\n");
  for (int nbits : {0, 4, 8}) Throughput(rng, nbits);
  if (failures) {
    std::printf("FAILED\n");
    return 1;
  }
  std::printf("OK\n");
  return 0;
}

// Element math of the fused BN-ReLU-quantize ops, shared by the CPU kernels
// (fused_kernels.cc), the CUDA kernels (fused_kernels.cu.cc) and the
// standalone GPU check (fused_check.cu). No TensorFlow includes.
//
// Per channel k: mean m, standard deviation sigma (sqrt(var + eps), computed
// by the caller), clamped scale cs, bias b.
//   forward  u = (z - m) / sigma;  h = u * cs;  h = h + b;  out = relu(h)
//            saved = u (full copy) or the K-bit code of a = h / cs with the
//            offset c = b / cs (quant_common.h, bit-identical to BlpaSaveAct)
//   restore  act = relu(h~): h~ = u * cs + b, or approx * cs from the codes
//   grad     y = u*w, mask = (u*cs + b > 0); or y = (approx - c)*w,
//            mask = q >= shift (w: the per-channel widening from code units
//            to normalized units, 1 for codes of exactly normalized values)
//            gm = mask ? g : 0; S1 = sum gm, S2 = sum gm*y, S3 = sum y
//            dbias = S1, dscale = S2, m1 = cs*S1/N, m2 = (cs*S2 - m1*S3)/N
//            grad_in = ((gm*cs - m1) - y*m2) / sigma
// Every float32 operation happens in this order, without fused multiply-adds,
// in the kernels and in the pure-TF fallback of blpa/fused.py (the unfused
// formulas), so the forward and restore outputs agree bit for bit. The sums:
// * CPU kernels: the fallback's float32 reductions in TF's order
//   (fused_kernels.cc, TfOrderSums): m1 = sum(gm*cs)/N and
//   m2 = sum((gm*cs - m1)*y)/N, so the gradients equal the fallback's.
// * CUDA kernels: S1..S3 in double over fixed chunks of pixels
//   (ReduceChunks), each chunk in pixel order, then the chunks in order
//   (FinishSums), whatever the launch shape; equal to the host reference of
//   fused_check.cu, and to the CPU kernels up to float rounding.
#ifndef BLPA_OPS_FUSED_COMMON_H_
#define BLPA_OPS_FUSED_COMMON_H_

#include <cstdint>

#include "quant_common.h"

namespace blpa {
namespace fused {

// ReLU that keeps NaN (as tf.nn.relu does).
BLPA_HOST_DEVICE inline float Relu(float h) { return (h < 0.0f) ? 0.0f : h; }

// Normalized value u of one input z.
BLPA_HOST_DEVICE inline float Normalize(float z, float mean, float sigma) {
  return (z - mean) / sigma;
}

// Pre-activation h = u*cs + b (two roundings, no FMA).
BLPA_HOST_DEVICE inline float PreActivation(float u, float cs, float b) {
  const float h = u * cs;
  return h + b;
}

// Gradient w.r.t. the BN input of one element.
BLPA_HOST_DEVICE inline float GradIn(float gm, float y, float cs, float m1,
                                     float m2, float sigma) {
  const float g2 = gm * cs;
  const float g3 = g2 - m1;
  const float yg = y * m2;
  return (g3 - yg) / sigma;
}

// Chunks of pixels over which the backward sums are taken: at most 256, of
// at least 256 pixels each (one chunk below that).
BLPA_HOST_DEVICE inline int64_t ReduceChunks(int64_t pixels) {
  int64_t chunks = pixels / 256;
  if (chunks < 1) chunks = 1;
  return chunks > 256 ? 256 : chunks;
}

// First pixel of chunk i of `chunks` (chunk i ends where i+1 begins).
BLPA_HOST_DEVICE inline int64_t ChunkBegin(int64_t i, int64_t chunks,
                                           int64_t pixels) {
  return i * pixels / chunks;
}

// Pointers of one call (device pointers for the CUDA launchers). `saved` is
// float for nbits = 0, packed uint8 codes otherwise.
struct ForwardArgs {
  const float* z;
  const float* mean;
  const float* sigma;
  const float* scale;
  const float* bias;
  float* out;
  void* saved;
};

struct RestoreArgs {
  const void* saved;
  const float* scale;
  const float* center;
  float* act;
};

struct GradArgs {
  const float* grad;
  const void* saved;
  const float* scale;
  const float* center;
  const float* sigma;
  const float* widen;
  float* grad_in;
  float* dbias;
  float* dscale;
  // CUDA only: device scratch of GradScratchBytes(pixels, channels) bytes.
  void* scratch;
};

// The per-channel results of the sums, in double, rounded once to float.
struct GradStats {
  float dbias, dscale, m1, m2;
};

BLPA_HOST_DEVICE inline GradStats FinishSums(double s1, double s2, double s3,
                                             float cs, int64_t pixels) {
  const double n = static_cast<double>(pixels);
  GradStats out;
  out.dbias = static_cast<float>(s1);
  out.dscale = static_cast<float>(s2);
  out.m1 = static_cast<float>(static_cast<double>(cs) * s1 / n);
  out.m2 = static_cast<float>(
      (static_cast<double>(cs) * s2 - static_cast<double>(out.m1) * s3) / n);
  return out;
}

}  // namespace fused
}  // namespace blpa

#endif  // BLPA_OPS_FUSED_COMMON_H_

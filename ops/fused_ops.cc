// Registration of the fused BN-ReLU-quantize ops (kernels: fused_kernels.cc,
// math: fused_common.h). One layer's elementwise work before its convolution
// (forward) and after the convolution's input gradient (backward):
//
//   BlpaBnMoments      z                           -> mean, variance
//   BlpaBnReluForward  z, mean, sigma, scale, bias -> out, saved
//   BlpaBnReluRestore  saved, scale, center        -> act
//   BlpaBnReluGrad     grad, saved, scale, center, sigma, widen
//                                                  -> grad_in, dbias, dscale
//
// `saved` is the full copy u (T = float, nbits = 0) or the packed K-bit codes
// of BlpaSaveAct (T = uint8, nbits 4 or 8). `center` is the bias b for a full
// copy and the quantizer offset c = b/scale for codes. `scale` is the clamped
// scale max(s, 1e-8). All per-channel inputs are [C]; activations are
// [N,H,W,C] (codes [N,H,W,ceil(C*nbits/8)]).
#include <initializer_list>
#include <string>
#include <utility>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "quant_common.h"

namespace blpa {
namespace fused {
namespace {

using ::tensorflow::DataType;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
namespace errors = ::tensorflow::errors;

// Checks nbits against the saved type T: 0 with float, 4 or 8 with uint8.
absl::Status GetNbits(InferenceContext* c, int* nbits) {
  DataType type;
  TF_RETURN_IF_ERROR(c->GetAttr("nbits", nbits));
  TF_RETURN_IF_ERROR(c->GetAttr("T", &type));
  if (type == ::tensorflow::DT_FLOAT && *nbits != 0) {
    return errors::InvalidArgument(
        "nbits must be 0 for a full-precision (float) copy, got ", *nbits);
  }
  if (type == ::tensorflow::DT_UINT8 && *nbits != 4 && *nbits != 8) {
    return errors::InvalidArgument(
        "nbits must be 4 or 8 for K-bit codes (uint8), got ", *nbits);
  }
  return absl::OkStatus();
}

absl::Status WithRank(InferenceContext* c, int index, int rank,
                      const std::string& name, ShapeHandle* out) {
  ShapeHandle s = c->input(index);
  if (c->RankKnown(s) && c->Rank(s) != rank) {
    return errors::InvalidArgument(name, " must have rank ", rank,
                                   ", got shape ", c->DebugString(s));
  }
  return c->WithRank(s, rank, out);
}

// Merges the lengths of the per-channel inputs (index, name) into
// *channels.
absl::Status ChannelInputs(
    InferenceContext* c,
    std::initializer_list<std::pair<int, const char*>> inputs,
    DimensionHandle* channels) {
  for (const auto& [index, name] : inputs) {
    ShapeHandle s;
    TF_RETURN_IF_ERROR(WithRank(c, index, 1, name, &s));
    DimensionHandle d = c->Dim(s, 0);
    if (c->ValueKnown(d) && c->ValueKnown(*channels) &&
        c->Value(d) != c->Value(*channels)) {
      return errors::InvalidArgument(
          name, " has length ", c->Value(d),
          " but the number of channels C is ", c->Value(*channels));
    }
    TF_RETURN_IF_ERROR(c->Merge(*channels, d, channels));
  }
  if (c->ValueKnown(*channels) && c->Value(*channels) == 0) {
    return errors::InvalidArgument("the number of channels C must be >= 1");
  }
  return absl::OkStatus();
}

// Shape of `saved` for an activation shape `act` with C = channels.
absl::Status SavedShape(InferenceContext* c, ShapeHandle act,
                        DimensionHandle channels, int nbits,
                        ShapeHandle* out) {
  if (nbits == 0) return c->ReplaceDim(act, 3, channels, out);
  DimensionHandle bytes = c->UnknownDim();
  if (c->ValueKnown(channels)) {
    bytes = c->MakeDim(PackedChannels(c->Value(channels), nbits));
  }
  return c->ReplaceDim(act, 3, bytes, out);
}

// Checks that input `index` (`saved`) fits the activation shape `act`.
absl::Status CheckSaved(InferenceContext* c, int index, ShapeHandle act,
                        DimensionHandle channels, int nbits) {
  ShapeHandle saved, want, merged;
  TF_RETURN_IF_ERROR(WithRank(c, index, 4, "saved", &saved));
  TF_RETURN_IF_ERROR(SavedShape(c, act, channels, nbits, &want));
  if (!c->Merge(saved, want, &merged).ok()) {
    return errors::InvalidArgument("saved has shape ", c->DebugString(saved),
                                   " but ", c->DebugString(want),
                                   " was expected (nbits = ", nbits, ")");
  }
  return absl::OkStatus();
}

absl::Status ForwardShape(InferenceContext* c) {
  int nbits;
  ShapeHandle z, saved;
  TF_RETURN_IF_ERROR(GetNbits(c, &nbits));
  TF_RETURN_IF_ERROR(WithRank(c, 0, 4, "z", &z));
  DimensionHandle channels = c->Dim(z, 3);
  TF_RETURN_IF_ERROR(ChannelInputs(
      c, {{1, "mean"}, {2, "sigma"}, {3, "scale"}, {4, "bias"}}, &channels));
  TF_RETURN_IF_ERROR(c->ReplaceDim(z, 3, channels, &z));
  TF_RETURN_IF_ERROR(SavedShape(c, z, channels, nbits, &saved));
  c->set_output(0, z);
  c->set_output(1, saved);
  return absl::OkStatus();
}

absl::Status MomentsShape(InferenceContext* c) {
  ShapeHandle z;
  TF_RETURN_IF_ERROR(WithRank(c, 0, 4, "z", &z));
  c->set_output(0, c->Vector(c->Dim(z, 3)));
  c->set_output(1, c->Vector(c->Dim(z, 3)));
  return absl::OkStatus();
}

absl::Status RestoreShape(InferenceContext* c) {
  int nbits;
  ShapeHandle saved, act;
  TF_RETURN_IF_ERROR(GetNbits(c, &nbits));
  TF_RETURN_IF_ERROR(WithRank(c, 0, 4, "saved", &saved));
  DimensionHandle channels = nbits ? c->UnknownDim() : c->Dim(saved, 3);
  TF_RETURN_IF_ERROR(ChannelInputs(c, {{1, "scale"}, {2, "center"}}, &channels));
  TF_RETURN_IF_ERROR(c->ReplaceDim(saved, 3, channels, &act));
  TF_RETURN_IF_ERROR(CheckSaved(c, 0, act, channels, nbits));
  c->set_output(0, act);
  return absl::OkStatus();
}

absl::Status GradShape(InferenceContext* c) {
  int nbits;
  ShapeHandle grad;
  TF_RETURN_IF_ERROR(GetNbits(c, &nbits));
  TF_RETURN_IF_ERROR(WithRank(c, 0, 4, "grad", &grad));
  DimensionHandle channels = c->Dim(grad, 3);
  TF_RETURN_IF_ERROR(ChannelInputs(
      c, {{2, "scale"}, {3, "center"}, {4, "sigma"}, {5, "widen"}},
      &channels));
  TF_RETURN_IF_ERROR(c->ReplaceDim(grad, 3, channels, &grad));
  TF_RETURN_IF_ERROR(CheckSaved(c, 1, grad, channels, nbits));
  c->set_output(0, grad);
  c->set_output(1, c->Vector(channels));
  c->set_output(2, c->Vector(channels));
  return absl::OkStatus();
}

}  // namespace
}  // namespace fused
}  // namespace blpa

// BlpaBnMoments: the batch mean and variance over N, H, W of z [N,H,W,C],
// equal to tf.nn.moments(z, [0, 1, 2]) on the CPU (same float32 sums in the
// same order; no squared differences kept). CPU only.
REGISTER_OP("BlpaBnMoments")
    .Input("z: float")
    .Output("mean: float")
    .Output("variance: float")
    .SetShapeFn(blpa::fused::MomentsShape);

// BlpaBnReluForward: u = (z - mean)/sigma, h = u*scale + bias,
// out = relu(h) (h without relu); saved = u (T = float, nbits = 0) or the
// codes of h/scale with offset bias/scale (T = uint8, nbits 4 or 8; equal to
// BlpaSaveAct's).
REGISTER_OP("BlpaBnReluForward")
    .Input("z: float")
    .Input("mean: float")
    .Input("sigma: float")
    .Input("scale: float")
    .Input("bias: float")
    .Output("out: float")
    .Output("saved: T")
    .Attr("T: {float, uint8}")
    .Attr("nbits: int")
    .Attr("relu: bool = true")
    .SetShapeFn(blpa::fused::ForwardShape);

// BlpaBnReluRestore: act = relu(h~) (h~ without relu), h~ = u*scale + center
// from a full copy, approx*scale from codes (center = offset).
REGISTER_OP("BlpaBnReluRestore")
    .Input("saved: T")
    .Input("scale: float")
    .Input("center: float")
    .Output("act: float")
    .Attr("T: {float, uint8}")
    .Attr("nbits: int")
    .Attr("relu: bool = true")
    .SetShapeFn(blpa::fused::RestoreShape);

// BlpaBnReluGrad: the ReLU mask, BN backward, bias and scale gradients from
// the gradient w.r.t. out (see fused_common.h). `widen` [C] multiplies the
// saved copy's value into the normalized value y (ones for codes of exactly
// normalized values; > 1 for codes whose range was widened per channel).
REGISTER_OP("BlpaBnReluGrad")
    .Input("grad: float")
    .Input("saved: T")
    .Input("scale: float")
    .Input("center: float")
    .Input("sigma: float")
    .Input("widen: float")
    .Output("grad_in: float")
    .Output("dbias: float")
    .Output("dscale: float")
    .Attr("T: {float, uint8}")
    .Attr("nbits: int")
    .Attr("relu: bool = true")
    .SetShapeFn(blpa::fused::GradShape);

// Registration of the channel-selection ops (kernels: channels_kernels.cc).
//
// The gather and the scatter act on one axis (attr `axis`, default -1: the
// last) of a tensor of any rank >= 1, seen as [O, C, I] (O: product of the
// dimensions before the axis, C its size, I: product of those after it);
// the square sums on the last axis, seen as rows [R, C]:
//
//   BlpaGatherChannels(x [O, C, I], indices [k]) -> y [O, k, I],
//       y[o, j, i] = x[o, indices[j], i]
//   BlpaScatterChannels(y [O, k, I], indices [k]; channels = C)
//       -> x [O, C, I], x[o, c, i] = sum of y[o, j, i] over the j with
//       indices[j] == c (0 if none); the gradient of BlpaGatherChannels
//   BlpaChannelSquareSums(x [R, C]) -> s [C] (float32),
//       s[c] = sum over r of x[r, c]^2, accumulated in float32 over fixed
//       blocks of rows, then the blocks in order (deterministic)
//
// Every index must lie in [0, C). tf.gather(x, indices, axis) computes the
// gather too, but for an axis other than the first its gradient transposes
// the whole tensor twice around an UnsortedSegmentSum, and
// tf.reduce_sum(tf.square(x)) writes a full-size square first: these ops
// read and write each element once. CPU only.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace blpa {
namespace {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
namespace errors = ::tensorflow::errors;

// data (input 0) of rank >= 1 and indices (input 1) of rank 1; the `axis`
// attr in [-rank, rank); `out` is data with that axis's dimension replaced
// by `size`, and *dim the dimension it had (unknown if the rank is).
absl::Status ReplaceAxis(InferenceContext* c, DimensionHandle size,
                         ShapeHandle* out, DimensionHandle* dim) {
  ShapeHandle data, indices;
  int axis;
  TF_RETURN_IF_ERROR(c->GetAttr("axis", &axis));
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &data));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &indices));
  if (!c->RankKnown(data)) {
    *out = c->UnknownShape();
    *dim = c->UnknownDim();
    return absl::OkStatus();
  }
  const int rank = c->Rank(data);
  if (axis < -rank || axis >= rank) {
    return errors::InvalidArgument("axis ", axis, " is out of range for rank ",
                                   rank);
  }
  if (axis < 0) axis += rank;
  *dim = c->Dim(data, axis);
  return c->ReplaceDim(data, axis, size, out);
}

absl::Status GatherChannelsShape(InferenceContext* c) {
  ShapeHandle out;
  DimensionHandle dim;
  TF_RETURN_IF_ERROR(ReplaceAxis(c, c->Dim(c->input(1), 0), &out, &dim));
  c->set_output(0, out);
  return absl::OkStatus();
}

absl::Status ScatterChannelsShape(InferenceContext* c) {
  int channels;
  TF_RETURN_IF_ERROR(c->GetAttr("channels", &channels));
  ShapeHandle out;
  DimensionHandle dim, k = c->Dim(c->input(1), 0);
  TF_RETURN_IF_ERROR(ReplaceAxis(c, c->MakeDim(channels), &out, &dim));
  TF_RETURN_IF_ERROR(c->Merge(dim, k, &k));
  c->set_output(0, out);
  return absl::OkStatus();
}

absl::Status ChannelSquareSumsShape(InferenceContext* c) {
  ShapeHandle data;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &data));
  c->set_output(0, c->RankKnown(data) ? c->Vector(c->Dim(data, -1))
                                       : c->Vector(c->UnknownDim()));
  return absl::OkStatus();
}

}  // namespace
}  // namespace blpa

REGISTER_OP("BlpaGatherChannels")
    .Input("x: T")
    .Input("indices: int32")
    .Output("y: T")
    .Attr("T: {float, double, half, bfloat16}")
    .Attr("axis: int = -1")
    .SetShapeFn(blpa::GatherChannelsShape);

REGISTER_OP("BlpaScatterChannels")
    .Input("y: T")
    .Input("indices: int32")
    .Output("x: T")
    .Attr("T: {float, double, half, bfloat16}")
    .Attr("channels: int >= 1")
    .Attr("axis: int = -1")
    .SetShapeFn(blpa::ScatterChannelsShape);

REGISTER_OP("BlpaChannelSquareSums")
    .Input("x: T")
    .Output("sums: float")
    .Attr("T: {float, double, half, bfloat16}")
    .SetShapeFn(blpa::ChannelSquareSumsShape);

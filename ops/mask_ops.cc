// Registration of the 1-bit mask ops (kernels: mask_kernels.cc).
//
//   BlpaPackMask(mask: bool, any shape) -> packed: uint8 [ceil(n/8)],
//       bit j (value 2^j) of packed[i] = mask.flat[8i + j] (0 past n)
//   BlpaMaskedSelect(x: float, packed: uint8 [ceil(n/8)]; scale)
//       -> y (shape of x), y.flat[e] = x.flat[e] * scale where bit e of
//       packed is set, else +0.0
//
// n is the number of elements. The masks that the compressed Keras layers
// keep for their backward pass (ReLU, ReLU6's upper bound, Dropout, max
// pools) are packed with the first and applied to the incoming gradient
// with the second, which reads the packed bits directly: no full-size
// boolean tensor is made in either pass. CPU only.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace blpa {
namespace {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
namespace errors = ::tensorflow::errors;

// The length ceil(n/8) of the packed mask of `shape` (unknown if n is).
DimensionHandle PackedLength(InferenceContext* c, ShapeHandle shape) {
  if (!c->FullyDefined(shape)) return c->UnknownDim();
  int64_t n = 1;
  for (int i = 0; i < c->Rank(shape); ++i) n *= c->Value(c->Dim(shape, i));
  return c->MakeDim((n + 7) / 8);
}

absl::Status PackMaskShape(InferenceContext* c) {
  c->set_output(0, c->Vector(PackedLength(c, c->input(0))));
  return absl::OkStatus();
}

absl::Status MaskedSelectShape(InferenceContext* c) {
  ShapeHandle packed;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &packed));
  DimensionHandle want = PackedLength(c, c->input(0));
  DimensionHandle got = c->Dim(packed, 0);
  if (c->ValueKnown(want) && c->ValueKnown(got) &&
      c->Value(want) != c->Value(got)) {
    return errors::InvalidArgument(
        "packed has ", c->Value(got), " bytes but x has ",
        c->Value(c->NumElements(c->input(0))),
        " elements (needs ceil(n/8) = ", c->Value(want), ")");
  }
  c->set_output(0, c->input(0));
  return absl::OkStatus();
}

}  // namespace
}  // namespace blpa

REGISTER_OP("BlpaPackMask")
    .Input("mask: bool")
    .Output("packed: uint8")
    .SetShapeFn(blpa::PackMaskShape);

REGISTER_OP("BlpaMaskedSelect")
    .Input("x: float")
    .Input("packed: uint8")
    .Output("y: float")
    .Attr("scale: float = 1.0")
    .SetShapeFn(blpa::MaskedSelectShape);

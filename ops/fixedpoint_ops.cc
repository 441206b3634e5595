// Registration of BlpaRoundFixed (kernels: fixedpoint_kernels.cc; element
// math and the stochastic hash: fixedpoint_common.h).
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "fixedpoint_common.h"

namespace blpa {
namespace fixedpoint {
namespace {

using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
namespace errors = ::tensorflow::errors;

absl::Status RoundFixedShape(InferenceContext* c) {
  int bd, ad;
  TF_RETURN_IF_ERROR(c->GetAttr("bd", &bd));
  TF_RETURN_IF_ERROR(c->GetAttr("ad", &ad));
  if (!ValidFormat(bd, ad)) {
    return errors::InvalidArgument(
        "fixed-point format Q", bd, ".", ad, " is invalid: need bd >= 1, "
        "ad >= 0 and bd + ad <= ", kMaxWordBits);
  }
  ShapeHandle seed = c->input(1);
  if (c->RankKnown(seed) && c->Rank(seed) != 0) {
    return errors::InvalidArgument("seed must be a scalar, got shape ",
                                   c->DebugString(seed));
  }
  c->set_output(0, c->input(0));
  return absl::OkStatus();
}

}  // namespace
}  // namespace fixedpoint
}  // namespace blpa

// BlpaRoundFixed: rounds x (float32, any shape) to the fixed-point format
// Q(bd.ad) with symmetric saturation at +-(2^(bd-1) - 2^-ad). `rounding`:
// 'deterministic' (halves away from zero) or 'stochastic' (floor(x*2^ad + U),
// U from a hash of `seed` and the element index). `seed` (int64 scalar) is
// read only by stochastic rounding.
REGISTER_OP("BlpaRoundFixed")
    .Input("x: float")
    .Input("seed: int64")
    .Output("y: float")
    .Attr("bd: int")
    .Attr("ad: int")
    .Attr("rounding: {'deterministic', 'stochastic'} = 'deterministic'")
    .SetShapeFn(blpa::fixedpoint::RoundFixedShape);

// Registration of the blpa quantization ops (kernels: quant_kernels.cc).
//
// n = 2**nbits bins of width 6/n, S = float32(n/6). For each channel with
// offset c: shift = clamp(n/2 - floor(c*S), 1, n) (NaN offset -> 1). For each
// activation a: q = clip(floor((a - 1e-6f)*S) + shift, 0, n-1) (NaN -> 0).
//
// Packing of `codes` ([N,H,W,B], uint8, B = ceil(C*nbits/8)):
//   nbits=8: byte k is the code of channel k.
//   nbits=4: byte k holds channel 2k in its low nibble and channel 2k+1 in its
//            high nibble; for odd C the last byte's high nibble is 0.
#include <string>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "quant_common.h"

namespace blpa {
namespace {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
namespace errors = ::tensorflow::errors;

absl::Status GetNbits(InferenceContext* c, int* nbits) {
  TF_RETURN_IF_ERROR(c->GetAttr("nbits", nbits));
  if (*nbits != 4 && *nbits != 8) {
    return errors::InvalidArgument("nbits must be 4 or 8, got ", *nbits);
  }
  return absl::OkStatus();
}

// Checks that input `index` (called `name`) has rank `rank` when known.
absl::Status InputWithRank(InferenceContext* c, int index, int rank,
                           const std::string& name, ShapeHandle* out) {
  ShapeHandle s = c->input(index);
  if (c->RankKnown(s) && c->Rank(s) != rank) {
    return errors::InvalidArgument(name, " must have rank ", rank,
                                   ", got rank ", c->Rank(s), " (shape ",
                                   c->DebugString(s), ")");
  }
  return c->WithRank(s, rank, out);
}

// Checks shared by both ops: nbits, input 0 (`name`: act [N,H,W,C] or codes
// [N,H,W,B]) of rank 4, offset [C] of rank 1 with C >= 1 where known.
absl::Status CommonShapes(InferenceContext* c, const std::string& name,
                          int* nbits, ShapeHandle* data,
                          DimensionHandle* channels) {
  TF_RETURN_IF_ERROR(GetNbits(c, nbits));
  ShapeHandle offset;
  TF_RETURN_IF_ERROR(InputWithRank(c, 0, 4, name, data));
  TF_RETURN_IF_ERROR(InputWithRank(c, 1, 1, "offset", &offset));
  *channels = c->Dim(offset, 0);
  if (c->ValueKnown(*channels) && c->Value(*channels) == 0) {
    return errors::InvalidArgument(
        "the number of channels C (length of offset) must be >= 1, got 0");
  }
  return absl::OkStatus();
}

absl::Status SaveActShape(InferenceContext* c) {
  int nbits;
  ShapeHandle act, out;
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(CommonShapes(c, "act", &nbits, &act, &channels));
  DimensionHandle act_channels = c->Dim(act, 3);
  if (c->ValueKnown(act_channels) && c->ValueKnown(channels) &&
      c->Value(act_channels) != c->Value(channels)) {
    return errors::InvalidArgument(
        "offset length (", c->Value(channels),
        ") must equal the number of channels C of act (",
        c->Value(act_channels), ")");
  }
  TF_RETURN_IF_ERROR(c->Merge(act_channels, channels, &channels));
  DimensionHandle bytes = c->UnknownDim();
  if (c->ValueKnown(channels)) {
    if (c->Value(channels) == 0) {  // offset length unknown, act C = 0
      return errors::InvalidArgument(
          "the number of channels C must be >= 1, got 0 (act shape ",
          c->DebugString(act), ")");
    }
    bytes = c->MakeDim(PackedChannels(c->Value(channels), nbits));
  }
  TF_RETURN_IF_ERROR(c->ReplaceDim(act, 3, bytes, &out));
  c->set_output(0, out);
  return absl::OkStatus();
}

// SaveActShape, and scale (input 2) of rank 1 and length C where known.
absl::Status SaveScaledActShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(SaveActShape(c));
  ShapeHandle scale;
  TF_RETURN_IF_ERROR(InputWithRank(c, 2, 1, "scale", &scale));
  DimensionHandle channels = c->Dim(c->input(0), 3);
  DimensionHandle length = c->Dim(scale, 0);
  if (c->ValueKnown(channels) && c->ValueKnown(length) &&
      c->Value(channels) != c->Value(length)) {
    return errors::InvalidArgument(
        "scale length (", c->Value(length),
        ") must equal the number of channels C of act (", c->Value(channels),
        ")");
  }
  return absl::OkStatus();
}

absl::Status RestoreActShape(InferenceContext* c) {
  int nbits;
  ShapeHandle codes, out;
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(CommonShapes(c, "codes", &nbits, &codes, &channels));
  DimensionHandle bytes = c->Dim(codes, 3);
  if (c->ValueKnown(channels) && c->ValueKnown(bytes) &&
      c->Value(bytes) != PackedChannels(c->Value(channels), nbits)) {
    return errors::InvalidArgument(
        "codes last dimension must be ceil(C*nbits/8) = ",
        PackedChannels(c->Value(channels), nbits), " for C = ",
        c->Value(channels), ", nbits = ", nbits, "; got ", c->Value(bytes));
  }
  TF_RETURN_IF_ERROR(c->ReplaceDim(codes, 3, channels, &out));
  c->set_output(0, out);
  c->set_output(1, out);
  return absl::OkStatus();
}

}  // namespace
}  // namespace blpa

// BlpaSaveAct: quantizes act [N,H,W,C] (float32) with the per-channel offset
// [C] to nbits-bit codes, packed as described above: codes [N,H,W,B].
REGISTER_OP("BlpaSaveAct")
    .Input("act: float")
    .Input("offset: float")
    .Output("codes: uint8")
    .Attr("nbits: int")
    .SetShapeFn(blpa::SaveActShape);

// BlpaSaveScaledAct: the codes of act / scale (scale [C], per channel, IEEE
// float division), with the per-channel offset [C]: equal to
// BlpaSaveAct(act / scale, offset) without the full-size quotient. CPU only.
REGISTER_OP("BlpaSaveScaledAct")
    .Input("act: float")
    .Input("offset: float")
    .Input("scale: float")
    .Output("codes: uint8")
    .Attr("nbits: int")
    .SetShapeFn(blpa::SaveScaledActShape);

// BlpaRestoreAct: unpacks codes [N,H,W,B] with offset [C] and returns
// approx = (float(q - shift) + 0.5f) * (6.0f/n) (float32 [N,H,W,C]) and
// mask = (q >= shift) (bool [N,H,W,C]; equal to approx > 0).
REGISTER_OP("BlpaRestoreAct")
    .Input("codes: uint8")
    .Input("offset: float")
    .Output("approx: float")
    .Output("mask: bool")
    .Attr("nbits: int")
    .SetShapeFn(blpa::RestoreActShape);

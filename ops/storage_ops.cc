// Registration of the variable-storage ops (kernels: storage_kernels.cc).
//
// BlpaWriteVariable writes `value` into the resource variable `resource`, in the variable's
// own buffer when it already holds a tensor of value's dtype and shape that
// nothing else references; otherwise the variable takes value's buffer, as
// AssignVariableOp does. Unlike AssignVariableOp (which always adopts the
// value's buffer) and ResourceStridedSliceAssign (which turns on the
// variable's copy-on-read mode, so that every later read copies it), the
// variable keeps its buffer and its reads stay aliases.
//
// BlpaResizeVariable gives the variable a new zeroed buffer whose first
// dimension is `rows`, unless it has that size already: each call allocates
// its own buffer (identical tf.zeros of several variables could share one).
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

REGISTER_OP("BlpaWriteVariable")
    .Input("resource: resource")
    .Input("value: dtype")
    .Attr("dtype: type")
    .SetIsStateful()
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      return absl::OkStatus();
    })
    .Doc(R"doc(
Writes value into the variable's existing buffer when dtype and shape agree
and the buffer is not shared; otherwise the variable adopts value's buffer.
)doc");

REGISTER_OP("BlpaResizeVariable")
    .Input("resource: resource")
    .Input("rows: int64")
    .Attr("dtype: type")
    .SetIsStateful()
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle rows;
      return c->WithRank(c->input(1), 0, &rows);
    })
    .Doc(R"doc(
Gives the variable a new zeroed buffer with first dimension rows (the other
dimensions unchanged), unless its first dimension is rows already.
)doc");

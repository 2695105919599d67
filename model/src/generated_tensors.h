#pragma once
// The generator's view of a checkpoint (internal to model/): the output tensors of one layout
// and dtype mode, each assembled from deterministic parameter values, and how to produce any
// range of their rows. Rows of an output tensor can be filled independently and in any order:
// the bytes depend only on (seed, names), which makes threaded generation reproducible.

#include <cstdint>
#include <vector>

#include "dserve/model/model_init.h"
#include "param_specs.h"
#include "safetensors.h"

namespace dserve::model {

// Values of rows [row0, row0 + rows) of a floating-point parameter (row = last dimension).
void generate_values(const ParamSpec& spec, uint64_t seed, int64_t row0, int64_t rows, float* out);
// Rows [row0, row0 + rows) of a tid2eid table: each row `cols()` distinct ids in [0, n_experts).
void generate_ids(const ParamSpec& spec, uint64_t seed, int64_t n_experts, int64_t row0,
                  int64_t rows, int64_t* out);

enum class OutputEncoding { kF32, kBf16, kFp8Weight, kFp8Scale, kFp4Weight, kFp4Scale, kI64 };

struct OutputPiece {
  const ParamSpec* spec;
  int64_t first_row;  // output row where the parameter's first row goes (plain encodings)
};

struct OutputTensor {
  TensorDecl decl;
  OutputEncoding encoding = OutputEncoding::kF32;
  std::vector<OutputPiece> pieces;  // one, or several fused experts, by first_row
  int64_t rows = 0;                 // output rows (the first dimension for 2-D, 1 for 1-D)
  int64_t row_bytes = 0;
  int64_t row_align = 1;  // fill ranges must start at multiples of this (FP8 block rows)
  int64_t row_cost = 1;   // values generated per output row, for sizing work
};

// The output tensors, sorted by name. Errors: packed dtype with the transformers layout, or an
// MXFP4 weight whose input width is not a multiple of 32 (InvalidArgument).
Result<std::vector<OutputTensor>> plan_output_tensors(const std::vector<ParamSpec>& specs,
                                                      ModelInitOptions::Layout layout,
                                                      ModelInitOptions::DType dtype);

// Writes the bytes of rows [row0, row1) to `dst`; row0 is a multiple of row_align.
void fill_output_rows(const OutputTensor& t, uint64_t seed, int64_t n_experts, int64_t row0,
                      int64_t row1, uint8_t* dst);

}  // namespace dserve::model

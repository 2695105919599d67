#pragma once
// StepUndo: what one step changed in a request's state, kept so that the step's last rows can be
// taken back (Model::rewind). Speculative decoding runs a request's next token and its draft
// tokens as one step, then keeps only the rows the target accepts: the state after the rewind
// equals, bit for bit, the state of a run that only ever saw the kept rows.
//
// A step changes four things per layer; the undo keeps what restores each:
//   - the sliding window: the window before the step and the step's rows (the window after
//     keeping m rows is the tail of the first window_before + m of them),
//   - the compressors' open windows: their state before the step and the step's projected rows
//     (feeding the kept rows again closes the same windows with the same bits),
//   - the compressed entries and indexer keys: their counts before the step (the entries the
//     kept rows close are appended again by the compressors),
//   - pages: rows past the kept ones are truncated, which frees the pages they alone took.

#include <cstdint>
#include <vector>

#include "dserve/model/request_state.h"

namespace dserve::model {

struct LayerUndo {
  std::vector<float> keys;    // [window_before + rows, head_dim]: the window, then the step's rows
  int64_t window_before = 0;  // rows of `keys` that were the window before the step
  // The compressors before the step, the rows they had, and the step's projected rows
  // ([rows, series * width] kv and gate logits) to feed again.
  CompressorState kv_compressor;
  CompressorState index_compressor;
  int64_t compressed_rows = 0;
  int64_t index_rows = 0;
  std::vector<float> kv_rows, kv_gate;
  std::vector<float> index_kv_rows, index_gate;
};

struct StepUndo {
  int64_t first_position = -1;  // the request's position before the step; -1: nothing recorded
  int64_t rows = 0;             // rows the step ran
  std::vector<LayerUndo> layers;

  bool recorded() const { return first_position >= 0; }
};

}  // namespace dserve::model

// Token-window compressors (MODEL-V4.md "The compressors"; DeepSeek-V4 paper §2.3.1-2.3.2).
// Each window of `rate` tokens becomes one entry: a per-channel softmax over the window's gate
// logits (plus a learned position bias) weights the window's projected kv, then RMSNorm and
// RoPE at the window's first absolute position. Overlapping (CSA-style) compressors project
// to two series [Ca | Cb]: entry w pools window w's Cb with window w-1's Ca (width 2 * rate,
// stride rate), so the previous window's Ca is carried across calls.

#include <algorithm>
#include <cmath>
#include <limits>

#include "dserve/core/check.h"
#include "dserve/kernels/cpu_ops.h"
#include "layers.h"

namespace dserve::model::detail {
namespace cpu = kernels::cpu;

namespace {

// Pools one window. kv/gate: [rate, series * width] rows of the window (gate without bias);
// ape: [rate, series * width]. Writes `width` channels into entry and updates the overlap.
void pool_window(const float* kv, const float* gate, const float* ape, CompressorState& state,
                 float* entry) {
  const int64_t rate = state.rate;
  const int64_t width = state.width;
  const int64_t row = state.series * width;
  const bool overlapping = state.series == 2;
  // Slots: for an overlapping compressor the previous window's Ca (if any) then this
  // window's Cb; otherwise just this window.
  const int64_t prior = overlapping && state.has_overlap() ? rate : 0;
  const int64_t cb_offset = overlapping ? width : 0;
  std::vector<float> logits(static_cast<size_t>(prior + rate));
  for (int64_t c = 0; c < width; ++c) {
    for (int64_t j = 0; j < prior; ++j) {
      logits[static_cast<size_t>(j)] = state.overlap_gate[static_cast<size_t>(j * width + c)];
    }
    for (int64_t j = 0; j < rate; ++j) {
      logits[static_cast<size_t>(prior + j)] =
          gate[j * row + cb_offset + c] + ape[j * row + cb_offset + c];
    }
    cpu::softmax(logits.data(), prior + rate);
    float sum = 0.0f;
    for (int64_t j = 0; j < prior; ++j) {
      sum += logits[static_cast<size_t>(j)] * state.overlap_kv[static_cast<size_t>(j * width + c)];
    }
    for (int64_t j = 0; j < rate; ++j) {
      sum += logits[static_cast<size_t>(prior + j)] * kv[j * row + cb_offset + c];
    }
    entry[c] = sum;
  }
  if (overlapping) {
    state.overlap_kv.resize(static_cast<size_t>(rate * width));
    state.overlap_gate.resize(static_cast<size_t>(rate * width));
    for (int64_t j = 0; j < rate; ++j) {
      for (int64_t c = 0; c < width; ++c) {
        state.overlap_kv[static_cast<size_t>(j * width + c)] = kv[j * row + c];
        state.overlap_gate[static_cast<size_t>(j * width + c)] =
            gate[j * row + c] + ape[j * row + c];
      }
    }
  }
}

}  // namespace

CompressorRows project_compressor(const float* x, int64_t n, const CompressorWeights& w) {
  const int64_t row = w.wkv.dim(0);
  const int64_t hidden = w.wkv.dim(1);
  CompressorRows out{row, std::vector<float>(static_cast<size_t>(n * row)),
                     std::vector<float>(static_cast<size_t>(n * row))};
  cpu::matmul(x, n, hidden, w.wkv, out.kv.data());
  cpu::matmul(x, n, hidden, w.wgate, out.gate.data());
  return out;
}

int64_t compress(const CompressorRows& rows, int64_t first_row, int64_t n,
                 const CompressorWeights& w, float norm_eps, const kernels::RopeTable& rope,
                 CompressorState& state, kvstore::PagedRows& entries) {
  const int64_t width = state.width;
  const int64_t row = state.series * width;
  DSERVE_CHECK(rows.width == row && w.wkv.dim(0) == row && w.ape.dim(0) == state.rate);
  const auto from = static_cast<std::ptrdiff_t>(first_row * row);
  const auto to = static_cast<std::ptrdiff_t>((first_row + n) * row);
  state.pending_kv.insert(state.pending_kv.end(), rows.kv.begin() + from, rows.kv.begin() + to);
  state.pending_gate.insert(state.pending_gate.end(), rows.gate.begin() + from,
                            rows.gate.begin() + to);

  const int64_t windows = state.pending_tokens() / state.rate;
  if (windows == 0) return 0;
  const int64_t half = rope.rope_dim() / 2;
  std::vector<float> cos(static_cast<size_t>(half)), sin(static_cast<size_t>(half));
  std::vector<float> entry(static_cast<size_t>(width));
  for (int64_t win = 0; win < windows; ++win) {
    const size_t offset = static_cast<size_t>(win * state.rate * row);
    pool_window(state.pending_kv.data() + offset, state.pending_gate.data() + offset, w.ape.data(),
                state, entry.data());
    cpu::rms_norm(entry.data(), 1, width, w.norm.span(), norm_eps);
    rope.angles(state.entries * state.rate, cos.data(), sin.data());
    cpu::rope_interleaved(entry.data(), width, cos, sin, /*inverse=*/false);
    entries.append(entry.data(), 1);
    ++state.entries;
  }
  const auto consumed = static_cast<std::ptrdiff_t>(windows * state.rate * row);
  state.pending_kv.erase(state.pending_kv.begin(), state.pending_kv.begin() + consumed);
  state.pending_gate.erase(state.pending_gate.begin(), state.pending_gate.begin() + consumed);
  return windows;
}

}  // namespace dserve::model::detail

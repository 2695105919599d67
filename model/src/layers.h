#pragma once
// The sublayers of a DeepSeek-V4 decoder layer, each a plain function over a chunk of n
// tokens of one request (row-major fp32 buffers). Model::forward (model.cc) strings them
// together; this header is internal to the model module.

#include <cstdint>
#include <span>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/kernels/rope.h"
#include "dserve/model/config.h"
#include "dserve/model/request_state.h"
#include "dserve/model/step_undo.h"
#include "dserve/model/weights.h"

namespace dserve::model::detail {

// --- mHC (MODEL-V4.md "One decoder layer", steps 1 and 3) ---------------------------------
struct HyperMix {
  std::vector<float> post;       // [n, hc]
  std::vector<float> comb;       // [n, hc, hc], doubly stochastic, comb[j][k]: stream j -> k
  std::vector<float> collapsed;  // [n, hidden]: sum_k pre[k] * stream[k]
};
// streams: [n, hc, hidden].
HyperMix hyper_connection_in(const float* streams, int64_t n, const ModelConfig& config,
                             const HyperConnectionWeights& w);
// streams[t][k] <- post[t][k] * out[t] + sum_j comb[t][j][k] * streams[t][j].
void hyper_connection_out(float* streams, const float* out, const HyperMix& mix, int64_t n,
                          const ModelConfig& config);
// The final 4 -> 1 collapse: out [n, hidden].
void hyper_head(const float* streams, int64_t n, const ModelConfig& config,
                const HyperHeadWeights& w, float* out);

// OutOfRange naming the first token id outside [0, vocab_size) and its index; OK otherwise.
Status check_token_ids(std::span<const int32_t> tokens, int64_t vocab_size);

// --- Compressors (MODEL-V4.md "The compressors") ---------------------------------------
// A compressor's projections of a step's rows (row-wise): kv and gate logits, [n, width].
struct CompressorRows {
  int64_t width = 0;  // series * entry width
  std::vector<float> kv;
  std::vector<float> gate;
};
CompressorRows project_compressor(const float* x, int64_t n, const CompressorWeights& w);
// Appends rows [first_row, first_row + n) of `rows` (one request's chunk) to the compressor's
// pending buffer, closes every complete window and appends the new entries (normed, RoPE at
// the window's first position) to `entries` ([*, width]). Returns the number of entries
// appended.
int64_t compress(const CompressorRows& rows, int64_t first_row, int64_t n,
                 const CompressorWeights& w, float norm_eps, const kernels::RopeTable& rope,
                 CompressorState& state, kvstore::PagedRows& entries);

// --- Attention (step 2) ----------------------------------------------------------------
struct RopeTables {
  kernels::RopeTable main;      // sliding-only layers
  kernels::RopeTable compress;  // CSA / HCA layers, their compressors and indexers
};
// The config's two tables (the compress one YaRN-scaled when configured).
RopeTables rope_tables(const ModelConfig& config);
// Attention in three parts, so that a step's projections run over all of its rows at once
// (each weight read once per step) and only the part that needs a request's state runs per
// request. x: [n, hidden], already normed, every row of the step.
struct AttentionRows {
  std::vector<float> q_residual;     // [n, q_lora_rank], normed (the indexer reads it too)
  std::vector<float> q;              // [n, heads * head_dim], normed per head; rotated by the core
  std::vector<float> kv;             // [n, head_dim], normed, not rotated
  std::vector<float> attn_out;       // [n, heads * head_dim], written by the core
  CompressorRows compressor;         // CSA / HCA layers
  CompressorRows index_compressor;   // CSA layers: the indexer's keys
  std::vector<float> index_q;        // CSA: [n, index_heads * index_head_dim], not rotated
  std::vector<float> index_weights;  // CSA: [n, index_heads]
};
// Row-wise: wq_a, q_norm, wq_b, the per-head norm, wkv, kv_norm, and the compressors' and the
// indexer's projections.
AttentionRows attention_project(const float* x, int64_t n, const ModelConfig& config,
                                const AttentionWeights& w);
// One request's rows [row, row + n) of the step, its tokens at positions first_pos ..: RoPE,
// the window, the compressors' windows and the indexer's choice, and the attention itself into
// rows.attn_out. Reads and updates the layer's state.
// With `undo`, keeps what rewind_attention needs to take the rows back.
void attention_core(int64_t row, int64_t n, int64_t first_pos, const ModelConfig& config,
                    const AttentionWeights& w, const RopeTables& rope, LayerState& state,
                    AttentionRows& rows, LayerUndo* undo = nullptr);
// Only the window's part of attention_core for rows [row, row + n) of a sliding-window layer:
// their keys appended to the window, nothing attended (rows whose output nobody reads).
void append_window_keys(int64_t row, int64_t n, int64_t first_pos, const ModelConfig& config,
                        const RopeTables& rope, LayerState& state, const AttentionRows& rows);
// Takes the layer's state back to after the first `keep` rows of the step `undo` recorded.
void rewind_attention(const LayerUndo& undo, int64_t keep, const ModelConfig& config,
                      const AttentionWeights& w, const RopeTables& rope, LayerState& state);
// Row-wise: the grouped output projection (wo_a per group, wo_b), out [n, hidden].
void attention_output(const AttentionRows& rows, int64_t n, const ModelConfig& config,
                      const AttentionWeights& w, float* out);

// --- MoE (step 4) -----------------------------------------------------------------------
// x: [n, hidden] (already normed); tokens: the chunk's token ids (hash routing).
void moe(const float* x, std::span<const int32_t> tokens, const ModelConfig& config,
         const MoeWeights& w, RoutingKind routing, float* out);

}  // namespace dserve::model::detail

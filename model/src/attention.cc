// DeepSeek-V4 attention for a chunk of one request (MODEL-V4.md "One decoder layer", step 2;
// DeepSeek-V4 paper §2.3): low-rank queries, one shared key/value head (MQA, K = V), partial
// interleaved RoPE, a sliding window over the last `sliding_window` tokens, the layer's
// compressed entries (all causally complete ones for HCA, the indexer's top-k for CSA), a
// learned per-head sink in the softmax, de-rotation of the output, grouped output projection.

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "dserve/core/check.h"
#include "dserve/kernels/cpu_ops.h"
#include "dserve/kernels/invariant_gemm.h"
#include "layers.h"

namespace dserve::model::detail {
namespace cpu = kernels::cpu;

namespace {

// Queries of one chunk per part when its attention is split over the cores.
constexpr int64_t kQueriesPerPart = 16;

// cos/sin of every position of the chunk: [n, half] each.
struct ChunkAngles {
  std::vector<float> cos, sin;
  int64_t half = 0;
  std::span<const float> cos_at(int64_t t) const {
    return {cos.data() + t * half, static_cast<size_t>(half)};
  }
  std::span<const float> sin_at(int64_t t) const {
    return {sin.data() + t * half, static_cast<size_t>(half)};
  }
};

ChunkAngles angles_for(const kernels::RopeTable& table, int64_t first_pos, int64_t n) {
  ChunkAngles a;
  a.half = table.rope_dim() / 2;
  a.cos.resize(static_cast<size_t>(n * a.half));
  a.sin.resize(static_cast<size_t>(n * a.half));
  for (int64_t t = 0; t < n; ++t) {
    table.angles(first_pos + t, a.cos.data() + t * a.half, a.sin.data() + t * a.half);
  }
  return a;
}

// Number of compressed entries a query at `pos` may see: entry w summarises tokens below
// (w + 1) * rate, so it is visible once that window is complete.
int64_t visible_entries(int64_t pos, int64_t rate, int64_t available) {
  return std::min(available, (pos + 1) / rate);
}

// Lightning Indexer (paper §2.3.1, eqs. 13-17): for each query, the indices of the top-k
// causally visible compressed entries by score(t, s) = sum_h w[t,h] * relu(q[t,h] . K[s]).
// q_proj: the chunk's indexer queries (wq_b of q_residual), [n, heads * dim], not rotated;
// weights: its head weights (weights_proj of x), [n, heads].
std::vector<std::vector<int64_t>> select_entries(const float* q_proj, const float* weights,
                                                 int64_t n, int64_t first_pos,
                                                 const ModelConfig& config,
                                                 const ChunkAngles& angles,
                                                 const LayerState& state) {
  const int64_t heads = config.index_n_heads;
  const int64_t dim = config.index_head_dim;
  const int64_t available = state.index_keys.rows();
  std::vector<float> q(q_proj, q_proj + n * heads * dim);
  // fp32 keys are read in place, page by page; encoded ones (fp4, in the rotated basis) are
  // decoded once for the chunk, and the queries are rotated and rounded the same way.
  const kvstore::RowFormat& key_format = state.index_keys.format();
  const bool encoded = key_format.encoding != kvstore::RowEncoding::kFp32;
  std::vector<float> decoded_keys;
  if (encoded) {
    decoded_keys.resize(static_cast<size_t>(available * dim));
    state.index_keys.read_rows(0, available, decoded_keys.data());
  }
  const auto keys_at = [&](int64_t first) {
    return encoded ? decoded_keys.data() + first * dim : state.index_keys.fp32_row(first);
  };
  const float weight_scale = 1.0f / std::sqrt(static_cast<float>(heads));
  const float score_scale = 1.0f / std::sqrt(static_cast<float>(dim));

  std::vector<std::vector<int64_t>> selected(static_cast<size_t>(n));
  // The queries are independent: parts of them on the cores, the same bits for each.
  cpu::parallel_rows(n, kQueriesPerPart, [&](int64_t begin, int64_t end) {
    std::vector<float> dots;
    std::vector<float> scores;
    for (int64_t t = begin; t < end; ++t) {
      float* qt = q.data() + t * heads * dim;
      for (int64_t h = 0; h < heads; ++h) {
        cpu::rope_interleaved(qt + h * dim, dim, angles.cos_at(t), angles.sin_at(t), false);
      }
      if (encoded) kvstore::round_trip_rows(key_format, qt, heads);
      const int64_t visible = visible_entries(first_pos + t, config.csa_rate, available);
      auto& picks = selected[static_cast<size_t>(t)];
      if (visible == 0) continue;
      dots.resize(static_cast<size_t>(heads * visible));
      // The keys are paged: one gemm per page fills that page's columns of `dots`.
      const int64_t per_page = state.index_keys.rows_per_page();
      for (int64_t first = 0; first < visible; first += per_page) {
        const int64_t count = std::min(per_page, visible - first);
        cpu::gemm(true, heads, count, dim, qt, dim, keys_at(first), dim, 0.0f, dots.data() + first,
                  visible);
      }
      scores.assign(static_cast<size_t>(visible), 0.0f);
      for (int64_t h = 0; h < heads; ++h) {
        const float wh = weights[t * heads + h] * weight_scale;
        for (int64_t s = 0; s < visible; ++s) {
          scores[static_cast<size_t>(s)] +=
              std::max(dots[static_cast<size_t>(h * visible + s)], 0.0f) * score_scale * wh;
        }
      }
      picks.resize(static_cast<size_t>(visible));
      std::iota(picks.begin(), picks.end(), 0);
      const int64_t k = std::min(config.index_topk, visible);
      if (k < visible) {
        // Highest score first; the lower index wins a tie so that selection is deterministic.
        std::partial_sort(picks.begin(), picks.begin() + k, picks.end(), [&](int64_t a, int64_t b) {
          const float sa = scores[static_cast<size_t>(a)], sb = scores[static_cast<size_t>(b)];
          return sa > sb || (sa == sb && a < b);
        });
        picks.resize(static_cast<size_t>(k));
      }
      std::sort(picks.begin(), picks.end());
    }
  });
  return selected;
}

// Softmax over one head's logits with the learned sink joining the denominator only.
void softmax_with_sink(float* logits, int64_t count, float sink) {
  float max_v = sink;
  for (int64_t i = 0; i < count; ++i)
    max_v = std::max(max_v, logits[i]);
  float sum = std::exp(sink - max_v);
  for (int64_t i = 0; i < count; ++i) {
    logits[i] = std::exp(logits[i] - max_v);
    sum += logits[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < count; ++i)
    logits[i] *= inv;
}

// The window's cached keys, then the keys of rows [row, row + n) of the step: RoPE at their
// positions and, with fp8 KV, rounded to the served entry's values (as the compressed entries
// are: the chunk's own tokens attend to those values, and they are what the window keeps).
std::vector<float> window_and_keys(int64_t row, int64_t n, const ModelConfig& config,
                                   const ChunkAngles& angles, const LayerState& state,
                                   const AttentionRows& rows) {
  const int64_t hd = config.head_dim;
  const int64_t cached = state.window_tokens();
  std::vector<float> keys(state.window);
  keys.resize(static_cast<size_t>((cached + n) * hd));
  float* kv = keys.data() + cached * hd;
  std::copy_n(rows.kv.data() + row * hd, n * hd, kv);
  for (int64_t t = 0; t < n; ++t) {
    cpu::rope_interleaved(kv + t * hd, hd, angles.cos_at(t), angles.sin_at(t), false);
  }
  kvstore::round_trip_rows(kvstore::RowFormat::entry(config.kv_dtype, hd, config.rope_head_dim), kv,
                           n);
  return keys;
}

// The window the next call sees: the last sliding_window - 1 of `keys` (the window, then rows).
void keep_window(std::span<const float> keys, const ModelConfig& config, LayerState& state) {
  const int64_t hd = config.head_dim;
  const int64_t keep =
      std::min<int64_t>(static_cast<int64_t>(keys.size()) / hd, config.sliding_window - 1);
  state.window.assign(keys.end() - keep * hd, keys.end());
}

// Keeps what rewinding a compressor needs: its state and entry count before the step, and the
// step's projected rows [row, row + n).
void keep_for_undo(const CompressorRows& rows, int64_t row, int64_t n,
                   const CompressorState& compressor, const kvstore::PagedRows& entries,
                   CompressorState& kept_state, int64_t& kept_rows, std::vector<float>& kv,
                   std::vector<float>& gate) {
  kept_state = compressor;
  kept_rows = entries.rows();
  const auto from = static_cast<std::ptrdiff_t>(row * rows.width);
  const auto to = static_cast<std::ptrdiff_t>((row + n) * rows.width);
  kv.assign(rows.kv.begin() + from, rows.kv.begin() + to);
  gate.assign(rows.gate.begin() + from, rows.gate.begin() + to);
}

}  // namespace

AttentionRows attention_project(const float* x, int64_t n, const ModelConfig& config,
                                const AttentionWeights& w) {
  const int64_t hidden = config.hidden_size;
  const int64_t heads = config.num_heads;
  const int64_t hd = config.head_dim;
  const auto eps = static_cast<float>(config.rms_norm_eps);
  AttentionRows rows;
  // Queries: q = rmsnorm_per_head(wq_b(rmsnorm(wq_a x))); RoPE comes per request.
  rows.q_residual.resize(static_cast<size_t>(n * config.q_lora_rank));
  cpu::matmul(x, n, hidden, w.wq_a, rows.q_residual.data());
  cpu::rms_norm(rows.q_residual.data(), n, config.q_lora_rank, w.q_norm.span(), eps);
  rows.q.resize(static_cast<size_t>(n * heads * hd));
  cpu::matmul(rows.q_residual.data(), n, config.q_lora_rank, w.wq_b, rows.q.data());
  cpu::rms_norm(rows.q.data(), n * heads, hd, {}, eps);
  // The shared key/value head.
  rows.kv.resize(static_cast<size_t>(n * hd));
  cpu::matmul(x, n, hidden, w.wkv, rows.kv.data());
  cpu::rms_norm(rows.kv.data(), n, hd, w.kv_norm.span(), eps);
  rows.attn_out.resize(static_cast<size_t>(n * heads * hd));
  if (w.compressor) rows.compressor = project_compressor(x, n, *w.compressor);
  if (w.indexer) {
    rows.index_compressor = project_compressor(x, n, w.indexer->compressor);
    const int64_t index_width = config.index_n_heads * config.index_head_dim;
    rows.index_q.resize(static_cast<size_t>(n * index_width));
    cpu::matmul(rows.q_residual.data(), n, config.q_lora_rank, w.indexer->wq_b,
                rows.index_q.data());
    rows.index_weights.resize(static_cast<size_t>(n * config.index_n_heads));
    cpu::matmul(x, n, hidden, w.indexer->weights_proj, rows.index_weights.data());
  }
  return rows;
}

void attention_core(int64_t row, int64_t n, int64_t first_pos, const ModelConfig& config,
                    const AttentionWeights& w, const RopeTables& rope, LayerState& state,
                    AttentionRows& rows, LayerUndo* undo) {
  const int64_t heads = config.num_heads;
  const int64_t hd = config.head_dim;
  const auto eps = static_cast<float>(config.rms_norm_eps);
  const bool sliding_only = state.kind == AttentionKind::kSliding;
  const ChunkAngles angles = angles_for(sliding_only ? rope.main : rope.compress, first_pos, n);

  float* q = rows.q.data() + row * heads * hd;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      cpu::rope_interleaved(q + (t * heads + h) * hd, hd, angles.cos_at(t), angles.sin_at(t),
                            false);
    }
  }

  const int64_t cached = state.window_tokens();
  std::vector<float> keys = window_and_keys(row, n, config, angles, state, rows);

  if (undo != nullptr) {
    undo->window_before = cached;
    if (w.compressor) {
      keep_for_undo(rows.compressor, row, n, state.kv_compressor, state.compressed,
                    undo->kv_compressor, undo->compressed_rows, undo->kv_rows, undo->kv_gate);
    }
    if (w.indexer) {
      keep_for_undo(rows.index_compressor, row, n, state.index_compressor, state.index_keys,
                    undo->index_compressor, undo->index_rows, undo->index_kv_rows,
                    undo->index_gate);
    }
  }

  // Compressed entries first: a window closed by this chunk is visible to its later tokens.
  int64_t rate = 0;
  std::vector<std::vector<int64_t>> selected;
  if (w.compressor) {
    rate = config.compress_rate(state.kind);
    compress(rows.compressor, row, n, *w.compressor, eps, rope.compress, state.kv_compressor,
             state.compressed);
  }
  if (w.indexer) {
    compress(rows.index_compressor, row, n, w.indexer->compressor, eps, rope.compress,
             state.index_compressor, state.index_keys);
    const int64_t index_width = config.index_n_heads * config.index_head_dim;
    selected = select_entries(rows.index_q.data() + row * index_width,
                              rows.index_weights.data() + row * config.index_n_heads, n, first_pos,
                              config, angles, state);
  }
  const int64_t entries = state.compressed_entries();

  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  float* attn_out = rows.attn_out.data() + row * heads * hd;
  // The queries are independent: parts of them on the cores, the same bits for each.
  cpu::parallel_rows(n, kQueriesPerPart, [&](int64_t begin, int64_t end) {
    std::vector<float> logits;
    std::vector<float> gathered;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t pos = first_pos + t;
      // Window keys: positions (pos - sliding_window, pos], stored at index pos - first_pos +
      // cached.
      const int64_t last = cached + t;
      const int64_t first = std::max<int64_t>(0, last - config.sliding_window + 1);
      const int64_t n_window = last - first + 1;
      const float* window_keys = keys.data() + first * hd;
      // Compressed keys: all visible entries (HCA) or the indexer's picks among them (CSA),
      // gathered from their pages.
      int64_t n_comp = rate > 0 ? visible_entries(pos, rate, entries) : 0;
      const std::vector<int64_t>* picks = w.indexer ? &selected[static_cast<size_t>(t)] : nullptr;
      if (picks != nullptr) n_comp = static_cast<int64_t>(picks->size());
      gathered.resize(static_cast<size_t>(n_comp * hd));
      for (int64_t i = 0; i < n_comp; ++i) {
        state.compressed.read_rows(picks ? (*picks)[static_cast<size_t>(i)] : i, 1,
                                   gathered.data() + i * hd);
      }
      const float* comp_keys = gathered.data();
      const int64_t total = n_window + n_comp;
      logits.resize(static_cast<size_t>(heads * total));
      const float* qt = q + t * heads * hd;
      cpu::gemm(true, heads, n_window, hd, qt, hd, window_keys, hd, 0.0f, logits.data(), total);
      cpu::gemm(true, heads, n_comp, hd, qt, hd, comp_keys, hd, 0.0f, logits.data() + n_window,
                total);
      for (int64_t h = 0; h < heads; ++h) {
        float* lrow = logits.data() + h * total;
        for (int64_t i = 0; i < total; ++i)
          lrow[i] *= scale;
        softmax_with_sink(lrow, total, w.sinks.data()[h]);
      }
      // Values are the keys (K = V).
      float* ot = attn_out + t * heads * hd;
      cpu::gemm(false, heads, hd, n_window, logits.data(), total, window_keys, hd, 0.0f, ot, hd);
      cpu::gemm(false, heads, hd, n_comp, logits.data() + n_window, total, comp_keys, hd, 1.0f, ot,
                hd);
      // Undo the value's rotation at the query position (paper §2.3: the output then depends
      // on relative positions only).
      for (int64_t h = 0; h < heads; ++h) {
        cpu::rope_interleaved(ot + h * hd, hd, angles.cos_at(t), angles.sin_at(t), true);
      }
    }
  });

  keep_window(keys, config, state);
  if (undo != nullptr) undo->keys = std::move(keys);
}

void append_window_keys(int64_t row, int64_t n, int64_t first_pos, const ModelConfig& config,
                        const RopeTables& rope, LayerState& state, const AttentionRows& rows) {
  DSERVE_CHECK_MSG(state.kind == AttentionKind::kSliding, "keys alone for a compressed layer");
  const ChunkAngles angles = angles_for(rope.main, first_pos, n);
  keep_window(window_and_keys(row, n, config, angles, state, rows), config, state);
}

void rewind_attention(const LayerUndo& undo, int64_t keep, const ModelConfig& config,
                      const AttentionWeights& w, const RopeTables& rope, LayerState& state) {
  const auto seen = static_cast<size_t>((undo.window_before + keep) * config.head_dim);
  DSERVE_CHECK_MSG(keep >= 0 && undo.keys.size() >= seen, "a rewind past the rows the step ran");
  keep_window(std::span(undo.keys).first(seen), config, state);
  const auto eps = static_cast<float>(config.rms_norm_eps);
  // The compressors as they were, fed the kept rows again: the same windows close with the same
  // bits, and their entries replace the step's.
  const auto refeed = [&](const CompressorState& before, int64_t rows_before,
                          const std::vector<float>& kv, const std::vector<float>& gate,
                          const CompressorWeights& cw, CompressorState& compressor,
                          kvstore::PagedRows& entries) {
    compressor = before;
    entries.truncate(rows_before);
    const CompressorRows rows{before.series * before.width, kv, gate};
    compress(rows, 0, keep, cw, eps, rope.compress, compressor, entries);
  };
  if (w.compressor) {
    refeed(undo.kv_compressor, undo.compressed_rows, undo.kv_rows, undo.kv_gate, *w.compressor,
           state.kv_compressor, state.compressed);
  }
  if (w.indexer) {
    refeed(undo.index_compressor, undo.index_rows, undo.index_kv_rows, undo.index_gate,
           w.indexer->compressor, state.index_compressor, state.index_keys);
  }
}

void attention_output(const AttentionRows& rows, int64_t n, const ModelConfig& config,
                      const AttentionWeights& w, float* out) {
  // Grouped output projection: each group of heads -> o_lora_rank, then all groups -> hidden.
  const int64_t heads = config.num_heads;
  const int64_t hd = config.head_dim;
  const int64_t group_in = heads * hd / config.o_groups;
  const int64_t grouped_width = config.o_groups * config.o_lora_rank;
  std::vector<float> grouped(static_cast<size_t>(n * grouped_width));
  for (int64_t g = 0; g < config.o_groups; ++g) {
    kernels::cpu::invariant_matmul_strided(
        rows.attn_out.data() + g * group_in, heads * hd, n, group_in,
        w.wo_a.data() + g * config.o_lora_rank * group_in, config.o_lora_rank,
        grouped.data() + g * config.o_lora_rank, grouped_width);
  }
  cpu::matmul(grouped.data(), n, grouped_width, w.wo_b, out);
}

}  // namespace dserve::model::detail

#pragma once
// ModelWeights: every parameter of a DeepSeek-V4 model, dequantized to fp32, in the shapes of
// the official checkpoint (Linear weights are [out, in]). Filled by the checkpoint loader
// (checkpoint.h) from either the official names or the `transformers` names; read by the
// forward pass. Immutable after load and safe to share between threads.

#include <cstdint>
#include <optional>
#include <vector>

#include "dserve/kernels/tensor.h"
#include "dserve/model/config.h"

namespace dserve::model {

// A token-window compressor (MODEL-V4.md, "The compressors"). For CSA and the indexer the
// projections are 2x wide (two series Ca | Cb); for HCA they are 1x.
struct CompressorWeights {
  Tensor wkv;    // [ratio_mult * dim, hidden]           official `compressor.wkv.weight`
  Tensor wgate;  // [ratio_mult * dim, hidden]           official `compressor.wgate.weight`
  Tensor ape;    // [rate, ratio_mult * dim]             position bias, official `compressor.ape`
  Tensor norm;   // [dim]                                RMSNorm weight, `compressor.norm.weight`
};

// Lightning Indexer of a CSA layer.
struct IndexerWeights {
  Tensor wq_b;                   // [index_n_heads * index_head_dim, q_lora_rank]
  Tensor weights_proj;           // [index_n_heads, hidden]
  CompressorWeights compressor;  // dim = index_head_dim, 2x wide
};

struct AttentionWeights {
  Tensor wq_a;     // [q_lora_rank, hidden]
  Tensor q_norm;   // [q_lora_rank]
  Tensor wq_b;     // [num_heads * head_dim, q_lora_rank]
  Tensor wkv;      // [head_dim, hidden]
  Tensor kv_norm;  // [head_dim]
  Tensor wo_a;     // [o_groups * o_lora_rank, num_heads * head_dim / o_groups]
  Tensor wo_b;     // [hidden, o_groups * o_lora_rank]
  Tensor sinks;    // [num_heads]                       official `attn.attn_sink`
  std::optional<CompressorWeights> compressor;  // CSA and HCA layers
  std::optional<IndexerWeights> indexer;        // CSA layers
};

// Manifold-constrained hyper-connection around one sublayer (mHC in/out).
struct HyperConnectionWeights {
  Tensor fn;     // [(2 + hc_mult) * hc_mult, hc_mult * hidden]
  Tensor base;   // [(2 + hc_mult) * hc_mult]
  Tensor scale;  // [3]: pre, post, comb
};

// Final 4->1 stream collapse.
struct HyperHeadWeights {
  Tensor fn;     // [hc_mult, hc_mult * hidden]
  Tensor base;   // [hc_mult]
  Tensor scale;  // [1]
};

// A SwiGLU expert: down(silu(clamp(gate x)) * clamp(up x)).
struct ExpertWeights {
  Tensor w1;  // gate [intermediate, hidden]
  Tensor w2;  // down [hidden, intermediate]
  Tensor w3;  // up   [intermediate, hidden]
};

struct MoeWeights {
  Tensor gate;                         // router [n_routed_experts, hidden]
  Tensor bias;                         // e_score_correction_bias [n_routed_experts] (top-k layers)
  std::vector<int32_t> tid2eid;        // [vocab_size * experts_per_token] (hash layers)
  std::vector<ExpertWeights> experts;  // n_routed_experts
  ExpertWeights shared;                // the shared expert (width moe_intermediate * n_shared)
};

struct LayerWeights {
  Tensor attn_norm;  // [hidden]   transformers `input_layernorm`
  Tensor ffn_norm;   // [hidden]   transformers `post_attention_layernorm`
  HyperConnectionWeights hc_attn;
  HyperConnectionWeights hc_ffn;
  AttentionWeights attn;
  MoeWeights moe;
};

// The next-token-prediction block used for speculative decoding. Its decoder layer has
// sliding-window attention only and score-routed MoE; it shares embed and head.
struct MtpWeights {
  Tensor e_proj;  // [hidden, hidden]
  Tensor h_proj;  // [hidden, hidden]
  Tensor enorm;   // [hidden]
  Tensor hnorm;   // [hidden]
  Tensor norm;    // [hidden]
  HyperHeadWeights hc_head;
  LayerWeights layer;
};

struct ModelWeights {
  Tensor embed;  // [vocab, hidden]
  Tensor head;   // [vocab, hidden]  (lm_head)
  Tensor norm;   // [hidden]
  HyperHeadWeights hc_head;
  std::vector<LayerWeights> layers;
  std::vector<MtpWeights> mtp;  // num_nextn_predict_layers (may be empty)
};

}  // namespace dserve::model

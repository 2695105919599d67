#pragma once
// ModelConfig: a DeepSeek-V4 `config.json`, parsed once at the edge into typed fields and
// validated. Both the `transformers` keys (`layer_types`, `compress_rates`, `mlp_layer_types`,
// `rope_parameters`) and the legacy keys of the official release (`compress_ratios`,
// `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`, `compress_rate_csa/hca`) are read;
// see ../shared/design/MODEL-V4.md for what each field means.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/kvstore/row_format.h"

namespace dserve::model {

// Attention kind of one decoder layer.
enum class AttentionKind {
  kSliding,     // sliding window only ("sliding_attention", compress ratio 0)
  kCompressed,  // CSA: overlapping windows of `csa_rate` + Lightning Indexer top-k
  kHeavy,       // HCA: non-overlapping windows of `hca_rate`, all entries attended
};
// MoE routing of one decoder layer.
enum class RoutingKind {
  kHash,  // expert choice from the frozen tid2eid[token] table ("hash_moe")
  kTopK,  // top-k on scores + e_score_correction_bias ("moe")
};
enum class ScoringFunc { kSqrtSoftplus, kSigmoid, kSoftmax };

std::string_view attention_kind_name(AttentionKind kind);  // the transformers layer_types name

// YaRN scaling of the compress RoPE (only CSA/HCA layers use it). attention_factor is 1:
// the V4 reference does not scale cos/sin.
struct YarnScaling {
  double factor = 16.0;
  int64_t original_max_position_embeddings = 65536;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
};

struct ModelConfig {
  int64_t vocab_size = 129280;
  int64_t hidden_size = 4096;
  int64_t num_layers = 43;
  int64_t num_heads = 64;
  int64_t head_dim = 512;  // of which the last rope_head_dim channels carry RoPE
  int64_t rope_head_dim = 64;
  int64_t q_lora_rank = 1024;
  int64_t o_groups = 8;
  int64_t o_lora_rank = 1024;
  int64_t sliding_window = 128;
  int64_t csa_rate = 4;
  int64_t hca_rate = 128;
  int64_t index_n_heads = 64;
  int64_t index_head_dim = 128;
  int64_t index_topk = 512;
  int64_t n_routed_experts = 256;
  int64_t n_shared_experts = 1;
  int64_t experts_per_token = 6;
  int64_t moe_intermediate_size = 2048;
  ScoringFunc scoring_func = ScoringFunc::kSqrtSoftplus;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.5;
  double swiglu_limit = 10.0;
  int64_t hc_mult = 4;
  int64_t hc_sinkhorn_iters = 20;
  double hc_eps = 1e-6;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;               // "main" rope: sliding-only layers
  double compress_rope_theta = 160000.0;     // "compress" rope: CSA/HCA layers and compressors
  std::optional<YarnScaling> compress_yarn;  // YaRN on the compress rope, when configured
  int64_t max_position_embeddings = 1048576;
  int64_t num_nextn_predict_layers = 1;  // MTP layers in the checkpoint
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 1;
  bool tie_word_embeddings = false;
  std::vector<AttentionKind> layer_types;  // size num_layers
  std::vector<RoutingKind> mlp_types;      // size num_layers
  // How the KV is kept (kvstore/row_format.h): a serving choice, not part of config.json (set
  // from `--kv-dtype` / the manifest's `kv_dtype`; set_kv_dtype checks the model can take it).
  // fp8: compressed entries as V4's served fp8 entries, indexer keys as its fp4 keys, and the
  // sliding window's kv rounded to the fp8 entry's values before it is attended or kept.
  kvstore::KvDtype kv_dtype = kvstore::KvDtype::kFp32;

  int64_t compress_rate(AttentionKind kind) const {
    return kind == AttentionKind::kCompressed ? csa_rate
           : kind == AttentionKind::kHeavy    ? hca_rate
                                              : 0;
  }
};

// Parses config.json text. `source` names the file in error messages. Every problem found is
// reported at once: field, what was found, what was expected.
Result<ModelConfig> parse_model_config(std::string_view json_text, std::string_view source);
// Reads and parses `<dir>/config.json`.
Result<ModelConfig> load_model_config(const std::string& model_dir);
// Checks cross-field invariants (layer_types length, divisibility of heads by o_groups, ...).
Status validate_model_config(const ModelConfig& config, std::string_view source);
// Sets config.kv_dtype; InvalidArgument when the model's widths cannot take the format (fp8:
// the indexer's head_dim must be a power of two of at least 32).
Status set_kv_dtype(ModelConfig& config, kvstore::KvDtype dtype);
// Serialises in the `transformers` layout (model_type "deepseek_v4"), plus the legacy keys the
// official release ships, so that both readers load it.
std::string model_config_to_json(const ModelConfig& config);

}  // namespace dserve::model

// ModelConfig validation and serialisation to config.json.

#include <algorithm>
#include <nlohmann/json.hpp>

#include "dserve/model/config.h"

namespace dserve::model {
namespace {

std::string_view scoring_name(ScoringFunc f) {
  switch (f) {
    case ScoringFunc::kSqrtSoftplus:
      return "sqrtsoftplus";
    case ScoringFunc::kSigmoid:
      return "sigmoid";
    case ScoringFunc::kSoftmax:
      return "softmax";
  }
  return "?";
}

}  // namespace

Status validate_model_config(const ModelConfig& c, std::string_view source) {
  std::vector<std::string> errors;
  const auto positive = [&](std::string_view field, int64_t v) {
    if (v <= 0) {
      errors.push_back("`" + std::string(field) + "`: found " + std::to_string(v) +
                       ", expected > 0");
    }
  };
  const auto non_negative = [&](std::string_view field, int64_t v) {
    if (v < 0) {
      errors.push_back("`" + std::string(field) + "`: found " + std::to_string(v) +
                       ", expected >= 0");
    }
  };
  const auto positive_real = [&](std::string_view field, double v) {
    if (!(v > 0.0)) {
      errors.push_back("`" + std::string(field) + "`: found " + std::to_string(v) +
                       ", expected > 0");
    }
  };
  positive("vocab_size", c.vocab_size);
  positive("hidden_size", c.hidden_size);
  positive("num_hidden_layers", c.num_layers);
  positive("num_attention_heads", c.num_heads);
  positive("head_dim", c.head_dim);
  positive("q_lora_rank", c.q_lora_rank);
  positive("o_groups", c.o_groups);
  positive("o_lora_rank", c.o_lora_rank);
  positive("sliding_window", c.sliding_window);
  positive("compress_rates.compressed_sparse_attention", c.csa_rate);
  positive("compress_rates.heavily_compressed_attention", c.hca_rate);
  positive("index_n_heads", c.index_n_heads);
  positive("index_head_dim", c.index_head_dim);
  positive("n_routed_experts", c.n_routed_experts);
  positive("num_experts_per_tok", c.experts_per_token);
  positive("moe_intermediate_size", c.moe_intermediate_size);
  positive("hc_mult", c.hc_mult);
  positive("max_position_embeddings", c.max_position_embeddings);
  if (c.n_shared_experts != 1) {
    errors.push_back("`n_shared_experts`: found " + std::to_string(c.n_shared_experts) +
                     ", expected 1 (V4 has one shared expert)");
  }
  if (!c.norm_topk_prob) {
    errors.push_back(
        "`norm_topk_prob`: found false, expected true (V4 normalises the top-k "
        "weights)");
  }
  non_negative("num_nextn_predict_layers", c.num_nextn_predict_layers);
  non_negative("hc_sinkhorn_iters", c.hc_sinkhorn_iters);
  positive_real("rms_norm_eps", c.rms_norm_eps);
  positive_real("rope_theta", c.rope_theta);
  positive_real("compress_rope_theta", c.compress_rope_theta);
  positive_real("routed_scaling_factor", c.routed_scaling_factor);
  if (!(c.hc_eps >= 0.0)) errors.push_back("`hc_eps`: expected >= 0");
  if (!(c.swiglu_limit >= 0.0)) errors.push_back("`swiglu_limit`: expected >= 0");
  if (c.rope_head_dim <= 0 || c.rope_head_dim % 2 != 0 || c.rope_head_dim > c.head_dim ||
      c.rope_head_dim > c.index_head_dim) {
    errors.push_back("`qk_rope_head_dim`: found " + std::to_string(c.rope_head_dim) +
                     ", expected an even number in [2, min(head_dim " + std::to_string(c.head_dim) +
                     ", index_head_dim " + std::to_string(c.index_head_dim) + ")]");
  }
  if (c.o_groups > 0 && c.num_heads % c.o_groups != 0) {
    errors.push_back("`o_groups`: num_attention_heads " + std::to_string(c.num_heads) +
                     " is not divisible by o_groups " + std::to_string(c.o_groups));
  }
  if (c.index_topk < 1) {
    errors.push_back("`index_topk`: found " + std::to_string(c.index_topk) + ", expected >= 1");
  }
  if (c.experts_per_token > c.n_routed_experts) {
    errors.push_back("`num_experts_per_tok`: found " + std::to_string(c.experts_per_token) +
                     ", expected <= n_routed_experts " + std::to_string(c.n_routed_experts));
  }
  if (static_cast<int64_t>(c.layer_types.size()) != c.num_layers) {
    errors.push_back("`layer_types`: found length " + std::to_string(c.layer_types.size()) +
                     ", expected " + std::to_string(c.num_layers) + " (num_hidden_layers)");
  }
  if (static_cast<int64_t>(c.mlp_types.size()) != c.num_layers) {
    errors.push_back("`mlp_layer_types`: found length " + std::to_string(c.mlp_types.size()) +
                     ", expected " + std::to_string(c.num_layers) + " (num_hidden_layers)");
  }
  for (const auto& [field, id] :
       {std::pair{"bos_token_id", c.bos_token_id}, std::pair{"eos_token_id", c.eos_token_id}}) {
    if (id < 0 || id >= c.vocab_size) {
      errors.push_back("`" + std::string(field) + "`: found " + std::to_string(id) +
                       ", expected an id in [0, vocab_size " + std::to_string(c.vocab_size) + ")");
    }
  }
  if (c.compress_yarn) {
    positive_real("rope_parameters.compress.factor", c.compress_yarn->factor);
    positive("rope_parameters.compress.original_max_position_embeddings",
             c.compress_yarn->original_max_position_embeddings);
  }
  if (errors.empty()) return Status::ok();
  std::string msg = std::string(source) + ": invalid config:";
  for (const auto& e : errors)
    msg += "\n  " + e;
  return invalid_argument(msg);
}

std::string model_config_to_json(const ModelConfig& c) {
  using nlohmann::json;
  const double partial = static_cast<double>(c.rope_head_dim) / static_cast<double>(c.head_dim);
  json j;
  j["architectures"] = {"DeepseekV4ForCausalLM"};
  j["model_type"] = "deepseek_v4";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = 1;
  j["head_dim"] = c.head_dim;
  j["partial_rotary_factor"] = partial;
  j["q_lora_rank"] = c.q_lora_rank;
  j["num_experts_per_tok"] = c.experts_per_token;
  j["n_routed_experts"] = c.n_routed_experts;
  j["n_shared_experts"] = c.n_shared_experts;
  j["moe_intermediate_size"] = c.moe_intermediate_size;
  j["scoring_func"] = scoring_name(c.scoring_func);
  j["norm_topk_prob"] = c.norm_topk_prob;
  j["routed_scaling_factor"] = c.routed_scaling_factor;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rope_theta"] = c.rope_theta;
  j["compress_rope_theta"] = c.compress_rope_theta;
  j["hc_mult"] = c.hc_mult;
  j["hc_sinkhorn_iters"] = c.hc_sinkhorn_iters;
  j["hc_eps"] = c.hc_eps;
  j["swiglu_limit"] = c.swiglu_limit;
  j["sliding_window"] = c.sliding_window;
  j["o_groups"] = c.o_groups;
  j["o_lora_rank"] = c.o_lora_rank;
  j["index_n_heads"] = c.index_n_heads;
  j["index_head_dim"] = c.index_head_dim;
  j["index_topk"] = c.index_topk;
  j["num_nextn_predict_layers"] = c.num_nextn_predict_layers;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["compress_rates"] = {{"compressed_sparse_attention", c.csa_rate},
                         {"heavily_compressed_attention", c.hca_rate}};
  json layer_types = json::array();
  json ratios = json::array();
  for (AttentionKind k : c.layer_types) {
    layer_types.push_back(attention_kind_name(k));
    ratios.push_back(c.compress_rate(k));
  }
  // The official release lists one more (sliding-only) entry per MTP layer.
  for (int64_t i = 0; i < c.num_nextn_predict_layers; ++i)
    ratios.push_back(0);
  j["layer_types"] = layer_types;
  json mlp_types = json::array();
  int64_t hash_prefix = 0;
  bool prefix = true;
  for (RoutingKind k : c.mlp_types) {
    mlp_types.push_back(k == RoutingKind::kHash ? "hash_moe" : "moe");
    if (k == RoutingKind::kHash && prefix) ++hash_prefix;
    if (k != RoutingKind::kHash) prefix = false;
  }
  j["mlp_layer_types"] = mlp_types;
  json main = {
      {"rope_type", "default"}, {"rope_theta", c.rope_theta}, {"partial_rotary_factor", partial}};
  json compress = {{"rope_type", "default"},
                   {"rope_theta", c.compress_rope_theta},
                   {"partial_rotary_factor", partial}};
  if (c.compress_yarn) {
    compress["rope_type"] = "yarn";
    compress["factor"] = c.compress_yarn->factor;
    compress["original_max_position_embeddings"] =
        c.compress_yarn->original_max_position_embeddings;
    compress["beta_fast"] = c.compress_yarn->beta_fast;
    compress["beta_slow"] = c.compress_yarn->beta_slow;
    compress["attention_factor"] = 1.0;  // V4 does not scale cos/sin (transformers would)
  }
  j["rope_parameters"] = {{"main", main}, {"compress", compress}};
  // Legacy keys of the official release, for readers that predate layer_types. num_hash_layers
  // can only say "the first N": it is written when the hash layers are such a prefix.
  j["compress_ratios"] = ratios;
  j["qk_rope_head_dim"] = c.rope_head_dim;
  const bool hash_is_prefix = std::all_of(c.mlp_types.begin() + hash_prefix, c.mlp_types.end(),
                                          [](RoutingKind k) { return k == RoutingKind::kTopK; });
  if (hash_is_prefix) j["num_hash_layers"] = hash_prefix;
  return j.dump(2) + "\n";
}

}  // namespace dserve::model

// config.json parsing: transformers keys, legacy keys, validation errors, serialisation.

#include "dserve/model/config.h"

#include <gtest/gtest.h>

#include "dserve/model/model_init.h"

namespace dserve::model {
namespace {

// The tiny preset written by hand with the transformers keys.
constexpr const char* kTransformersJson = R"({
  "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 64,
  "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64,
  "q_lora_rank": 32, "num_experts_per_tok": 2, "n_routed_experts": 8, "n_shared_experts": 1,
  "moe_intermediate_size": 32, "scoring_func": "sqrtsoftplus", "norm_topk_prob": true,
  "routed_scaling_factor": 1.5, "max_position_embeddings": 1048576,
  "layer_types": ["sliding_attention", "compressed_sparse_attention",
                  "heavily_compressed_attention", "compressed_sparse_attention"],
  "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
  "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"],
  "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "swiglu_limit": 10.0,
  "sliding_window": 16, "o_groups": 2, "o_lora_rank": 32, "index_n_heads": 4,
  "index_head_dim": 32, "index_topk": 8, "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6,
  "bos_token_id": 0, "eos_token_id": [1, 2], "tie_word_embeddings": false,
  "rope_parameters": {
    "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16,
                 "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}},
  "some_future_field": {"ignored": true}
})";

// The same model with the legacy keys of the official release.
constexpr const char* kLegacyJson = R"({
  "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 64,
  "num_hidden_layers": 4, "num_attention_heads": 4, "head_dim": 64, "qk_rope_head_dim": 16,
  "q_lora_rank": 32, "num_experts_per_tok": 2, "n_routed_experts": 8, "n_shared_experts": 1,
  "moe_intermediate_size": 32, "scoring_func": "sqrtsoftplus", "norm_topk_prob": true,
  "routed_scaling_factor": 1.5, "max_position_embeddings": 1048576,
  "compress_ratios": [0, 4, 16, 4, 0], "compress_rate_csa": 4, "compress_rate_hca": 16,
  "num_hash_layers": 1, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
  "swiglu_limit": 10.0, "sliding_window": 16, "o_groups": 2, "o_lora_rank": 32,
  "index_n_heads": 4, "index_head_dim": 32, "index_topk": 8, "num_nextn_predict_layers": 1,
  "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1, "rope_theta": 10000,
  "compress_rope_theta": 160000,
  "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                   "beta_fast": 32, "beta_slow": 1}
})";

TEST(ModelConfig, ParsesTransformersKeys) {
  const auto c = parse_model_config(kTransformersJson, "config.json");
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->hidden_size, 64);
  EXPECT_EQ(c->rope_head_dim, 16);
  EXPECT_EQ(c->hca_rate, 16);
  EXPECT_EQ(c->eos_token_id, 1);
  ASSERT_EQ(c->layer_types.size(), 4u);
  EXPECT_EQ(c->layer_types[2], AttentionKind::kHeavy);
  EXPECT_EQ(c->mlp_types[0], RoutingKind::kHash);
  EXPECT_EQ(c->mlp_types[1], RoutingKind::kTopK);
  ASSERT_TRUE(c->compress_yarn.has_value());
  EXPECT_EQ(c->compress_yarn->original_max_position_embeddings, 65536);
  EXPECT_EQ(c->compress_rope_theta, 160000.0);
}

TEST(ModelConfig, LegacyKeysGiveTheSameConfig) {
  const auto a = parse_model_config(kTransformersJson, "a");
  const auto b = parse_model_config(kLegacyJson, "b");
  ASSERT_TRUE(a.is_ok()) << a.status().to_string();
  ASSERT_TRUE(b.is_ok()) << b.status().to_string();
  EXPECT_EQ(model_config_to_json(*a), model_config_to_json(*b));
  const auto tiny = preset_config("tiny");
  ASSERT_TRUE(tiny.is_ok());
  EXPECT_EQ(model_config_to_json(*a), model_config_to_json(*tiny));
}

TEST(ModelConfig, SerialisedConfigParsesBackForEveryPreset) {
  for (const char* name : {"tiny", "small", "v4-width"}) {
    const auto c = preset_config(name);
    ASSERT_TRUE(c.is_ok()) << name;
    const std::string json = model_config_to_json(*c);
    const auto back = parse_model_config(json, name);
    ASSERT_TRUE(back.is_ok()) << back.status().to_string();
    EXPECT_EQ(model_config_to_json(*back), json) << name;
    EXPECT_NE(json.find("\"compress_ratios\""), std::string::npos);
    EXPECT_NE(json.find("\"num_hash_layers\""), std::string::npos);
    EXPECT_NE(json.find("\"qk_rope_head_dim\""), std::string::npos);
  }
  EXPECT_EQ(preset_config("huge").status().code(), StatusCode::kInvalidArgument);
}

TEST(ModelConfig, WrongLayerTypesLengthNamesFieldAndLengths) {
  std::string json = kTransformersJson;
  json.replace(json.find("\"num_hidden_layers\": 4"), 22, "\"num_hidden_layers\": 5");
  const auto c = parse_model_config(json, "/m/config.json");
  ASSERT_FALSE(c.is_ok());
  const std::string& msg = c.status().message();
  EXPECT_NE(msg.find("/m/config.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("`layer_types`: found length 4, expected 5"), std::string::npos) << msg;
  EXPECT_NE(msg.find("`mlp_layer_types`: found length 4, expected 5"), std::string::npos) << msg;
}

// Settings that would make transformers compute a different network than V4 (and than ours)
// are refused with the field named, not silently ignored.
TEST(ModelConfig, RefusesSettingsThatChangeTheNetwork) {
  const auto refused = [](std::string_view from, std::string_view to, std::string_view field) {
    std::string json = kTransformersJson;
    const size_t at = json.find(from);
    ASSERT_NE(at, std::string::npos) << from;
    json.replace(at, from.size(), to);
    const auto c = parse_model_config(json, "cfg");
    ASSERT_FALSE(c.is_ok()) << to;
    EXPECT_NE(c.status().message().find(field), std::string::npos) << c.status().message();
  };
  refused("\"norm_topk_prob\": true", "\"norm_topk_prob\": false", "`norm_topk_prob`");
  refused("\"n_shared_experts\": 1", "\"n_shared_experts\": 2", "`n_shared_experts`");
  refused("\"beta_slow\": 1}", "\"beta_slow\": 1, \"attention_factor\": 1.2}",
          "`rope_parameters.compress.attention_factor`");
  refused("\"beta_slow\": 1}", "\"beta_slow\": 1, \"mscale\": 1}",
          "`rope_parameters.compress.mscale`");
  // factor 16 but 1048576 / 131072 = 8: the two references would disagree.
  refused("\"original_max_position_embeddings\": 65536",
          "\"original_max_position_embeddings\": 131072", "`max_position_embeddings`");
  // Equal mscales mean an attention factor of 1 and are accepted; without the original
  // length, it defaults to max_position_embeddings.
  std::string json = kTransformersJson;
  json.replace(json.find("\"beta_slow\": 1}"), 15,
               "\"beta_slow\": 1, \"mscale\": 1, \"mscale_all_dim\": 1}");
  json.replace(json.find("\"original_max_position_embeddings\": 65536, "), 43, "");
  const auto c = parse_model_config(json, "cfg");
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->compress_yarn->original_max_position_embeddings, 1048576);
}

TEST(ModelConfig, ReportsEveryProblemAtOnce) {
  auto c = *preset_config("tiny");
  c.o_groups = 3;
  c.experts_per_token = 9;
  c.rope_head_dim = 15;
  c.index_topk = 0;
  const Status s = validate_model_config(c, "cfg");
  ASSERT_FALSE(s.is_ok());
  for (const char* field :
       {"`o_groups`", "`num_experts_per_tok`", "`qk_rope_head_dim`", "`index_topk`"}) {
    EXPECT_NE(s.message().find(field), std::string::npos) << s.message();
  }
  std::string json = kTransformersJson;
  json.replace(json.find("\"sqrtsoftplus\""), 14, "\"relu\"");
  json.replace(json.find("\"hash_moe\""), 10, "\"dense\"");
  const auto parsed = parse_model_config(json, "cfg");
  ASSERT_FALSE(parsed.is_ok());
  EXPECT_NE(parsed.status().message().find("`scoring_func`"), std::string::npos);
  EXPECT_NE(parsed.status().message().find("`mlp_layer_types`: entry 0 is \"dense\""),
            std::string::npos)
      << parsed.status().message();
}

TEST(ModelConfig, RejectsOtherModelsAndMalformedJson) {
  EXPECT_NE(parse_model_config(R"({"model_type": "deepseek_v3"})", "c")
                .status()
                .message()
                .find("expected \"deepseek_v4\""),
            std::string::npos);
  EXPECT_NE(parse_model_config("{\"model_type\": ", "c").status().message().find("malformed JSON"),
            std::string::npos);
  std::string json = kLegacyJson;
  json.replace(json.find("[0, 4, 16, 4, 0]"), 16, "[0, 4, 16]");
  EXPECT_NE(parse_model_config(json, "c").status().message().find(
                "`compress_ratios`: found length 3, expected 4 (num_hidden_layers) or 5"),
            std::string::npos);
  json = kLegacyJson;
  json.replace(json.find("[0, 4, 16, 4, 0]"), 16, "[0, 4, 16, 5]");
  EXPECT_NE(parse_model_config(json, "c").status().message().find("entry 3 is 5"),
            std::string::npos);
  json = kLegacyJson;
  json.replace(json.find("\"num_attention_heads\": 4"), 24, "\"num_attention_heads\": \"4\"");
  EXPECT_NE(parse_model_config(json, "c").status().message().find(
                "`num_attention_heads`: expected an integer, found \"4\""),
            std::string::npos);
}

TEST(ModelConfig, DefaultsAreV4Flash) {
  const auto c = parse_model_config(R"({"model_type": "deepseek_v4"})", "c");
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->num_layers, 43);
  EXPECT_EQ(c->rope_head_dim, 64);
  int csa = 0, hca = 0, sliding = 0;
  for (AttentionKind k : c->layer_types) {
    csa += k == AttentionKind::kCompressed;
    hca += k == AttentionKind::kHeavy;
    sliding += k == AttentionKind::kSliding;
  }
  EXPECT_EQ(sliding, 2);
  EXPECT_EQ(csa, 21);
  EXPECT_EQ(hca, 20);
  EXPECT_EQ(c->mlp_types[2], RoutingKind::kHash);
  EXPECT_EQ(c->mlp_types[3], RoutingKind::kTopK);
}

}  // namespace
}  // namespace dserve::model

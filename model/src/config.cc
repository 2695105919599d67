// config.json -> ModelConfig: the transformers keys and the legacy keys of the official release.

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "dserve/model/config.h"

namespace dserve::model {
namespace {

using nlohmann::json;

constexpr std::string_view kSliding = "sliding_attention";
constexpr std::string_view kCsa = "compressed_sparse_attention";
constexpr std::string_view kHca = "heavily_compressed_attention";

// Reads typed fields out of one JSON object, collecting every problem.
class FieldReader {
 public:
  FieldReader(const json& obj, std::string prefix, std::vector<std::string>* errors)
      : obj_(obj), prefix_(std::move(prefix)), errors_(errors) {}

  const json* get(std::string_view key) const {
    if (!obj_.is_object()) return nullptr;
    const auto it = obj_.find(key);
    return it == obj_.end() || it->is_null() ? nullptr : &*it;
  }
  bool has(std::string_view key) const { return get(key) != nullptr; }
  void error(std::string_view key, std::string_view what) {
    errors_->push_back("`" + prefix_ + std::string(key) + "`: " + std::string(what));
  }
  void bad_type(std::string_view key, std::string_view expected, const json& v) {
    error(key, "expected " + std::string(expected) + ", found " + v.dump());
  }

  bool read(std::string_view key, int64_t* out) {
    const json* v = get(key);
    if (v == nullptr) return false;
    if (v->is_number_integer() &&
        !(v->is_number_unsigned() &&
          v->get<uint64_t>() > uint64_t{std::numeric_limits<int64_t>::max()})) {
      *out = v->get<int64_t>();
      return true;
    }
    if (v->is_number_float()) {  // 4.0 is accepted as 4
      const double d = v->get<double>();
      if (std::isfinite(d) && std::floor(d) == d && std::fabs(d) < 9.0e18) {
        *out = static_cast<int64_t>(d);
        return true;
      }
    }
    bad_type(key, "an integer", *v);
    return false;
  }
  bool read(std::string_view key, double* out) {
    const json* v = get(key);
    if (v == nullptr) return false;
    if (!v->is_number()) {
      bad_type(key, "a number", *v);
      return false;
    }
    *out = v->get<double>();
    return true;
  }
  bool read(std::string_view key, bool* out) {
    const json* v = get(key);
    if (v == nullptr) return false;
    if (!v->is_boolean()) {
      bad_type(key, "true or false", *v);
      return false;
    }
    *out = v->get<bool>();
    return true;
  }
  bool read(std::string_view key, std::string* out) {
    const json* v = get(key);
    if (v == nullptr) return false;
    if (!v->is_string()) {
      bad_type(key, "a string", *v);
      return false;
    }
    *out = v->get<std::string>();
    return true;
  }

 private:
  const json& obj_;
  std::string prefix_;
  std::vector<std::string>* errors_;
};

// YaRN parameters from a rope dict (`rope_scaling` or `rope_parameters.compress` or flat
// `rope_parameters`). Returns true when the dict configures YaRN.
bool read_yarn(FieldReader& r, std::string_view dict_name, YarnScaling* yarn,
               bool* original_given) {
  std::string type;
  if (!r.read("rope_type", &type)) r.read("type", &type);
  if (type.empty() || type == "default") return false;
  if (type != "yarn") {
    r.error("rope_type", "unsupported rope type \"" + type + "\" in " + std::string(dict_name) +
                             " (supported: default, yarn)");
    return false;
  }
  r.read("factor", &yarn->factor);
  *original_given =
      r.read("original_max_position_embeddings", &yarn->original_max_position_embeddings);
  r.read("beta_fast", &yarn->beta_fast);
  r.read("beta_slow", &yarn->beta_slow);
  // V4 applies YaRN to the angles only: cos/sin are not scaled. A config asking for another
  // attention factor describes a different network, so it is refused rather than ignored.
  double attention_factor = 1.0;
  if (r.read("attention_factor", &attention_factor) && attention_factor != 1.0) {
    r.error("attention_factor", "found " + std::to_string(attention_factor) +
                                    ", expected 1 (V4 does not scale the compress rope's cos/sin)");
  }
  double mscale = 0.0, mscale_all_dim = 0.0;
  const bool has_mscale = r.read("mscale", &mscale);
  const bool has_mscale_all_dim = r.read("mscale_all_dim", &mscale_all_dim);
  if ((has_mscale || has_mscale_all_dim) &&
      !(has_mscale && has_mscale_all_dim && mscale == mscale_all_dim)) {
    r.error("mscale",
            "expected mscale and mscale_all_dim both absent or equal (an attention "
            "factor of 1, as V4 uses)");
  }
  return true;
}

void read_rope(FieldReader& top, ModelConfig* c, std::optional<double>* partial_factor,
               bool* yarn_original_given, std::vector<std::string>* errors) {
  top.read("rope_theta", &c->rope_theta);
  top.read("compress_rope_theta", &c->compress_rope_theta);
  if (const json* legacy = top.get("rope_scaling"); legacy != nullptr && legacy->is_object()) {
    FieldReader r(*legacy, "rope_scaling.", errors);
    YarnScaling y;
    if (read_yarn(r, "rope_scaling", &y, yarn_original_given)) c->compress_yarn = y;
  }
  const json* params = top.get("rope_parameters");
  if (params == nullptr) return;
  if (!params->is_object()) {
    top.bad_type("rope_parameters", "an object", *params);
    return;
  }
  const bool nested = params->contains("main") || params->contains("compress");
  const json main_dict = nested ? params->value("main", json::object()) : *params;
  FieldReader main(main_dict, nested ? "rope_parameters.main." : "rope_parameters.", errors);
  main.read("rope_theta", &c->rope_theta);
  double f = 0.0;
  if (main.read("partial_rotary_factor", &f)) *partial_factor = f;
  if (!nested) {
    // A flat dict (the transformers standard): YaRN there only ever applies to the compress
    // rope, as in the official code (sliding-only layers run without it).
    YarnScaling y;
    if (read_yarn(main, "rope_parameters", &y, yarn_original_given)) c->compress_yarn = y;
    return;
  }
  if (const json* comp = FieldReader(*params, "", errors).get("compress"); comp != nullptr) {
    FieldReader r(*comp, "rope_parameters.compress.", errors);
    r.read("rope_theta", &c->compress_rope_theta);
    YarnScaling y;
    if (read_yarn(r, "rope_parameters.compress", &y, yarn_original_given)) {
      c->compress_yarn = y;
    }
  }
}

void read_layer_types(FieldReader& r, ModelConfig* c) {
  if (const json* lt = r.get("layer_types"); lt != nullptr) {
    if (!lt->is_array()) return r.bad_type("layer_types", "an array of strings", *lt);
    for (size_t i = 0; i < lt->size(); ++i) {
      const json& v = (*lt)[i];
      const std::string s = v.is_string() ? v.get<std::string>() : v.dump();
      if (s == kSliding) {
        c->layer_types.push_back(AttentionKind::kSliding);
      } else if (s == kCsa) {
        c->layer_types.push_back(AttentionKind::kCompressed);
      } else if (s == kHca) {
        c->layer_types.push_back(AttentionKind::kHeavy);
      } else {
        r.error("layer_types", "entry " + std::to_string(i) + " is " + v.dump() +
                                   ", expected \"sliding_attention\", "
                                   "\"compressed_sparse_attention\" or "
                                   "\"heavily_compressed_attention\"");
      }
    }
    return;
  }
  if (const json* cr = r.get("compress_ratios"); cr != nullptr) {
    if (!cr->is_array()) return r.bad_type("compress_ratios", "an array of integers", *cr);
    const auto n = static_cast<size_t>(std::max<int64_t>(c->num_layers, 0));
    const size_t with_mtp =
        n + static_cast<size_t>(std::max<int64_t>(c->num_nextn_predict_layers, 0));
    if (cr->size() != n && cr->size() != with_mtp) {
      return r.error("compress_ratios", "found length " + std::to_string(cr->size()) +
                                            ", expected " + std::to_string(n) +
                                            " (num_hidden_layers) or " + std::to_string(with_mtp) +
                                            " (num_hidden_layers + num_nextn_predict_layers)");
    }
    for (size_t i = 0; i < n; ++i) {
      const json& v = (*cr)[i];
      const int64_t rate = v.is_number_integer() ? v.get<int64_t>() : -1;
      if (rate == 0) {
        c->layer_types.push_back(AttentionKind::kSliding);
      } else if (rate == c->csa_rate) {
        c->layer_types.push_back(AttentionKind::kCompressed);
      } else if (rate == c->hca_rate) {
        c->layer_types.push_back(AttentionKind::kHeavy);
      } else {
        r.error("compress_ratios", "entry " + std::to_string(i) + " is " + v.dump() +
                                       ", expected 0, " + std::to_string(c->csa_rate) +
                                       " (CSA) or " + std::to_string(c->hca_rate) + " (HCA)");
      }
    }
    return;
  }
  // Neither key: the V4-Flash schedule, two sliding-only layers then CSA and HCA alternating.
  for (int64_t i = 0; i < c->num_layers; ++i) {
    c->layer_types.push_back(i < 2              ? AttentionKind::kSliding
                             : (i - 2) % 2 == 0 ? AttentionKind::kCompressed
                                                : AttentionKind::kHeavy);
  }
}

void read_mlp_types(FieldReader& r, ModelConfig* c) {
  if (const json* mt = r.get("mlp_layer_types"); mt != nullptr) {
    if (!mt->is_array()) return r.bad_type("mlp_layer_types", "an array of strings", *mt);
    for (size_t i = 0; i < mt->size(); ++i) {
      const json& v = (*mt)[i];
      if (v == "hash_moe") {
        c->mlp_types.push_back(RoutingKind::kHash);
      } else if (v == "moe") {
        c->mlp_types.push_back(RoutingKind::kTopK);
      } else {
        r.error("mlp_layer_types", "entry " + std::to_string(i) + " is " + v.dump() +
                                       ", expected \"hash_moe\" or \"moe\"");
      }
    }
    return;
  }
  int64_t hash_layers = 3;
  r.read("num_hash_layers", &hash_layers);
  for (int64_t i = 0; i < c->num_layers; ++i) {
    c->mlp_types.push_back(i < hash_layers ? RoutingKind::kHash : RoutingKind::kTopK);
  }
}

}  // namespace

std::string_view attention_kind_name(AttentionKind kind) {
  switch (kind) {
    case AttentionKind::kSliding:
      return kSliding;
    case AttentionKind::kCompressed:
      return kCsa;
    case AttentionKind::kHeavy:
      return kHca;
  }
  return "?";
}

Result<ModelConfig> parse_model_config(std::string_view json_text, std::string_view source) {
  const std::string src(source);
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    return invalid_argument(src + ": malformed JSON: " + e.what());
  }
  if (!root.is_object()) return invalid_argument(src + ": config is not a JSON object");
  std::vector<std::string> errors;
  FieldReader r(root, "", &errors);
  ModelConfig c;
  std::string model_type;
  r.read("model_type", &model_type);
  if (model_type != "deepseek_v4") {
    r.error("model_type", "found \"" + model_type + "\", expected \"deepseek_v4\"");
  }
  r.read("vocab_size", &c.vocab_size);
  r.read("hidden_size", &c.hidden_size);
  r.read("num_hidden_layers", &c.num_layers);
  r.read("num_attention_heads", &c.num_heads);
  int64_t kv_heads = 1;
  if (r.read("num_key_value_heads", &kv_heads) && kv_heads != 1) {
    r.error("num_key_value_heads",
            "found " + std::to_string(kv_heads) + ", expected 1 (V4 has one shared KV head)");
  }
  r.read("head_dim", &c.head_dim);
  r.read("q_lora_rank", &c.q_lora_rank);
  r.read("num_experts_per_tok", &c.experts_per_token);
  r.read("n_routed_experts", &c.n_routed_experts);
  if (r.read("n_shared_experts", &c.n_shared_experts) && c.n_shared_experts != 1) {
    r.error("n_shared_experts", "found " + std::to_string(c.n_shared_experts) +
                                    ", expected 1 (V4 has one shared expert)");
  }
  r.read("moe_intermediate_size", &c.moe_intermediate_size);
  std::string scoring;
  if (r.read("scoring_func", &scoring)) {
    if (scoring == "sqrtsoftplus") {
      c.scoring_func = ScoringFunc::kSqrtSoftplus;
    } else if (scoring == "sigmoid") {
      c.scoring_func = ScoringFunc::kSigmoid;
    } else if (scoring == "softmax") {
      c.scoring_func = ScoringFunc::kSoftmax;
    } else {
      r.error("scoring_func",
              "found \"" + scoring + "\", expected sqrtsoftplus, sigmoid or softmax");
    }
  }
  if (r.read("norm_topk_prob", &c.norm_topk_prob) && !c.norm_topk_prob) {
    r.error("norm_topk_prob", "found false, expected true (V4 normalises the top-k weights)");
  }
  r.read("routed_scaling_factor", &c.routed_scaling_factor);
  r.read("max_position_embeddings", &c.max_position_embeddings);
  r.read("hc_mult", &c.hc_mult);
  r.read("hc_sinkhorn_iters", &c.hc_sinkhorn_iters);
  r.read("hc_eps", &c.hc_eps);
  r.read("swiglu_limit", &c.swiglu_limit);
  r.read("sliding_window", &c.sliding_window);
  r.read("o_groups", &c.o_groups);
  r.read("o_lora_rank", &c.o_lora_rank);
  r.read("index_n_heads", &c.index_n_heads);
  r.read("index_head_dim", &c.index_head_dim);
  r.read("index_topk", &c.index_topk);
  r.read("num_nextn_predict_layers", &c.num_nextn_predict_layers);
  r.read("rms_norm_eps", &c.rms_norm_eps);
  r.read("bos_token_id", &c.bos_token_id);
  if (const json* eos = r.get("eos_token_id"); eos != nullptr && eos->is_array()) {
    if (eos->empty() || !(*eos)[0].is_number_integer()) {
      r.bad_type("eos_token_id", "an integer or a non-empty list of integers", *eos);
    } else {
      c.eos_token_id = (*eos)[0].get<int64_t>();
    }
  } else {
    r.read("eos_token_id", &c.eos_token_id);
  }
  r.read("tie_word_embeddings", &c.tie_word_embeddings);

  std::optional<double> partial_factor;
  bool yarn_original_given = false;
  read_rope(r, &c, &partial_factor, &yarn_original_given, &errors);
  if (c.compress_yarn && !yarn_original_given) {
    c.compress_yarn->original_max_position_embeddings = c.max_position_embeddings;
  } else if (c.compress_yarn && c.compress_yarn->original_max_position_embeddings > 0) {
    // transformers takes the YaRN factor as max_position_embeddings / original when the
    // original length is given; the official code takes `factor`. Released configs agree
    // (1048576 / 65536 = 16); a config where they differ is ambiguous and is refused.
    const double ratio = static_cast<double>(c.max_position_embeddings) /
                         static_cast<double>(c.compress_yarn->original_max_position_embeddings);
    if (std::fabs(ratio - c.compress_yarn->factor) > 1e-9 * c.compress_yarn->factor) {
      r.error(
          "max_position_embeddings",
          "max_position_embeddings / original_max_position_embeddings = " + std::to_string(ratio) +
              " but the YaRN factor is " + std::to_string(c.compress_yarn->factor) +
              "; expected them equal (transformers uses the ratio, the official code the "
              "factor)");
    }
  }
  double top_factor = 0.0;
  if (r.read("partial_rotary_factor", &top_factor)) partial_factor = top_factor;
  if (!r.read("qk_rope_head_dim", &c.rope_head_dim)) {
    const double f = partial_factor.value_or(64.0 / 512.0);
    const double dim = static_cast<double>(c.head_dim) * f;
    if (std::floor(dim) != dim) {
      r.error("partial_rotary_factor", "head_dim " + std::to_string(c.head_dim) + " * " +
                                           std::to_string(f) +
                                           " is not a whole number of channels");
    }
    c.rope_head_dim = static_cast<int64_t>(dim);
  }

  if (const json* rates = r.get("compress_rates"); rates != nullptr) {
    if (!rates->is_object()) {
      r.bad_type("compress_rates", "an object", *rates);
    } else {
      FieldReader rr(*rates, "compress_rates.", &errors);
      rr.read(kCsa, &c.csa_rate);
      rr.read(kHca, &c.hca_rate);
    }
  } else {
    r.read("compress_rate_csa", &c.csa_rate);
    r.read("compress_rate_hca", &c.hca_rate);
  }
  read_layer_types(r, &c);
  read_mlp_types(r, &c);

  if (errors.empty()) {
    DSERVE_RETURN_IF_ERROR(validate_model_config(c, source));
    return c;
  }
  std::string msg = src + ": invalid config:";
  for (const auto& e : errors)
    msg += "\n  " + e;
  return invalid_argument(msg);
}

Result<ModelConfig> load_model_config(const std::string& model_dir) {
  const auto path = (std::filesystem::path(model_dir) / "config.json").string();
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found(path + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_model_config(ss.str(), path);
}

Status set_kv_dtype(ModelConfig& config, kvstore::KvDtype dtype) {
  const auto entry = kvstore::RowFormat::entry(dtype, config.head_dim, config.rope_head_dim);
  const auto key = kvstore::RowFormat::index_key(dtype, config.index_head_dim);
  for (const auto* f : {&entry, &key}) {
    if (Status valid = f->check(); !valid.is_ok()) {
      return invalid_argument("kv_dtype " + std::string(kvstore::kv_dtype_name(dtype)) +
                              " does not fit this model: " + valid.message());
    }
  }
  config.kv_dtype = dtype;
  return Status::ok();
}

}  // namespace dserve::model

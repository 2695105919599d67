// write_random_checkpoint: presets, shard planning and the streaming, threaded writer.

#include "dserve/model/model_init.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <thread>

#include "generated_tensors.h"

namespace dserve::model {
namespace {

namespace fs = std::filesystem;
using Kind = AttentionKind;

constexpr int64_t kSegmentBytes = int64_t{64} << 20;  // written to disk per step
constexpr int64_t kTaskValues = int64_t{1} << 20;     // values generated per thread task

ModelConfig common_preset() {
  ModelConfig c;
  c.vocab_size = 129280;  // the DeepSeek tokenizer's
  c.rms_norm_eps = 1e-6;
  c.hc_mult = 4;
  c.hc_sinkhorn_iters = 20;
  c.hc_eps = 1e-6;
  c.swiglu_limit = 10.0;
  c.routed_scaling_factor = 1.5;
  c.scoring_func = ScoringFunc::kSqrtSoftplus;
  c.compress_yarn = YarnScaling{16.0, 65536, 32.0, 1.0};
  c.rope_theta = 1e4;
  c.compress_rope_theta = 160000.0;
  c.bos_token_id = 0;
  c.eos_token_id = 1;
  c.max_position_embeddings = 1048576;
  c.num_nextn_predict_layers = 1;
  c.n_shared_experts = 1;
  return c;
}

Status write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) return unavailable(path.string() + ": cannot write");
  return Status::ok();
}

// Writes one output tensor in segments; each segment's rows are filled by all threads.
Status write_tensor(const OutputTensor& t, uint64_t seed, int64_t n_experts,
                    SafetensorsWriter& writer) {
  const int64_t align = t.row_align;
  int64_t task_rows = std::max<int64_t>(1, kTaskValues / std::max<int64_t>(1, t.row_cost));
  task_rows = std::max(align, task_rows / align * align);
  const int64_t seg_rows = std::max(
      task_rows, kSegmentBytes / std::max<int64_t>(1, t.row_bytes) / task_rows * task_rows);
  std::vector<uint8_t> buf;
  for (int64_t s0 = 0; s0 < t.rows; s0 += seg_rows) {
    const int64_t s1 = std::min(t.rows, s0 + seg_rows);
    buf.resize(static_cast<size_t>((s1 - s0) * t.row_bytes));
    const int64_t n_tasks = (s1 - s0 + task_rows - 1) / task_rows;
    std::atomic<int64_t> next{0};
    const auto work = [&] {
      for (int64_t i = next++; i < n_tasks; i = next++) {
        const int64_t r0 = s0 + i * task_rows;
        const int64_t r1 = std::min(s1, r0 + task_rows);
        fill_output_rows(t, seed, n_experts, r0, r1, buf.data() + (r0 - s0) * t.row_bytes);
      }
    };
    const auto n_threads =
        std::min<int64_t>(n_tasks, std::max(1u, std::thread::hardware_concurrency()));
    std::vector<std::thread> threads;
    for (int64_t i = 1; i < n_threads; ++i)
      threads.emplace_back(work);
    work();
    for (auto& th : threads)
      th.join();
    DSERVE_RETURN_IF_ERROR(writer.append(buf));
  }
  return Status::ok();
}

// Removes safetensors files of an earlier checkpoint in `dir` (only names this writer uses).
void remove_previous_checkpoint(const fs::path& dir) {
  static const std::regex kOurs(R"(model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?)");
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (std::regex_match(entry.path().filename().string(), kOurs)) fs::remove(entry.path(), ec);
  }
}

std::string shard_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

}  // namespace

Result<ModelConfig> preset_config(std::string_view name) {
  ModelConfig c = common_preset();
  if (name == "tiny") {
    c.hidden_size = 64;
    c.num_layers = 4;
    c.layer_types = {Kind::kSliding, Kind::kCompressed, Kind::kHeavy, Kind::kCompressed};
    c.mlp_types = {RoutingKind::kHash, RoutingKind::kTopK, RoutingKind::kTopK, RoutingKind::kTopK};
    c.num_heads = 4;
    c.head_dim = 64;
    c.rope_head_dim = 16;
    c.q_lora_rank = 32;
    c.o_groups = 2;
    c.o_lora_rank = 32;
    c.sliding_window = 16;
    c.csa_rate = 4;
    c.hca_rate = 16;
    c.index_n_heads = 4;
    c.index_head_dim = 32;
    c.index_topk = 8;
    c.n_routed_experts = 8;
    c.experts_per_token = 2;
    c.moe_intermediate_size = 32;
  } else if (name == "small") {
    c.hidden_size = 256;
    c.num_layers = 6;
    c.layer_types = {Kind::kSliding,    Kind::kCompressed, Kind::kHeavy,
                     Kind::kCompressed, Kind::kHeavy,      Kind::kCompressed};
    c.mlp_types = {RoutingKind::kHash, RoutingKind::kHash, RoutingKind::kTopK,
                   RoutingKind::kTopK, RoutingKind::kTopK, RoutingKind::kTopK};
    c.num_heads = 8;
    c.head_dim = 128;
    c.rope_head_dim = 32;
    c.q_lora_rank = 128;
    c.o_groups = 4;
    c.o_lora_rank = 128;
    c.sliding_window = 128;
    c.csa_rate = 4;
    c.hca_rate = 128;
    c.index_n_heads = 8;
    c.index_head_dim = 64;
    c.index_topk = 64;
    c.n_routed_experts = 16;
    c.experts_per_token = 4;
    c.moe_intermediate_size = 128;
  } else if (name == "v4-width") {
    c.hidden_size = 4096;
    c.num_layers = 3;
    c.layer_types = {Kind::kSliding, Kind::kCompressed, Kind::kHeavy};
    c.mlp_types = {RoutingKind::kHash, RoutingKind::kTopK, RoutingKind::kTopK};
    c.num_heads = 64;
    c.head_dim = 512;
    c.rope_head_dim = 64;
    c.q_lora_rank = 1024;
    c.o_groups = 8;
    c.o_lora_rank = 1024;
    c.sliding_window = 128;
    c.csa_rate = 4;
    c.hca_rate = 128;
    c.index_n_heads = 64;
    c.index_head_dim = 128;
    c.index_topk = 512;
    c.n_routed_experts = 4;
    c.experts_per_token = 2;
    c.moe_intermediate_size = 2048;
  } else {
    return invalid_argument("unknown model preset \"" + std::string(name) +
                            "\" (known: tiny, small, v4-width)");
  }
  DSERVE_RETURN_IF_ERROR(validate_model_config(c, "preset " + std::string(name)));
  return c;
}

ModelConfig v4_flash_state_config() {
  ModelConfig c;  // the defaults are V4-Flash's (config.h); what the state depends on is set here
  c.num_layers = 43;
  c.layer_types.assign(2, AttentionKind::kSliding);
  for (int i = 0; i < 41; ++i)
    c.layer_types.push_back(i % 2 == 0 ? AttentionKind::kCompressed : AttentionKind::kHeavy);
  c.mlp_types.assign(43, RoutingKind::kTopK);
  c.head_dim = 512;
  c.rope_head_dim = 64;
  c.index_head_dim = 128;
  c.sliding_window = 128;
  c.csa_rate = 4;
  c.hca_rate = 128;
  return c;
}

Status write_random_checkpoint(const ModelInitOptions& opts) {
  DSERVE_ASSIGN_OR_RETURN(ModelConfig config, preset_config(opts.preset));
  if (opts.vocab_size != 0) {
    if (opts.vocab_size < 2 || opts.vocab_size > config.vocab_size) {
      return invalid_argument("vocab_size must be in 2.." + std::to_string(config.vocab_size) +
                              ", got " + std::to_string(opts.vocab_size));
    }
    config.vocab_size = opts.vocab_size;
    config.bos_token_id = std::min(config.bos_token_id, opts.vocab_size - 1);
    config.eos_token_id = std::min(config.eos_token_id, opts.vocab_size - 1);
  }
  if (opts.out_dir.empty()) return invalid_argument("no output directory given");
  if (opts.shard_bytes <= 0) return invalid_argument("shard_bytes must be positive");
  std::error_code ec;
  if (opts.tokenizer_json.empty() || !fs::is_regular_file(opts.tokenizer_json, ec)) {
    return not_found("tokenizer.json \"" + opts.tokenizer_json + "\" does not exist");
  }
  const bool hf = opts.layout == ModelInitOptions::Layout::kTransformers;
  ModelWeights shapes_only;  // binds the specs; no tensor is allocated
  const std::vector<ParamSpec> specs =
      model_param_specs(config, hf ? 0 : config.num_nextn_predict_layers, &shapes_only);
  DSERVE_ASSIGN_OR_RETURN(std::vector<OutputTensor> tensors,
                          plan_output_tensors(specs, opts.layout, opts.dtype));

  const fs::path dir(opts.out_dir);
  fs::create_directories(dir, ec);
  if (ec) return unavailable(opts.out_dir + ": cannot create: " + ec.message());
  remove_previous_checkpoint(dir);

  // Shards in name order, each at most shard_bytes unless one tensor alone is larger.
  std::vector<std::vector<const OutputTensor*>> shards(1);
  int64_t shard_size = 0;
  for (const OutputTensor& t : tensors) {
    const int64_t bytes = t.rows * t.row_bytes;
    if (!shards.back().empty() && shard_size + bytes > opts.shard_bytes) {
      shards.emplace_back();
      shard_size = 0;
    }
    shards.back().push_back(&t);
    shard_size += bytes;
  }
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  nlohmann::json weight_map = nlohmann::json::object();
  int64_t total_bytes = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string file =
        shards.size() == 1 ? "model.safetensors" : shard_name(i, shards.size());
    std::vector<TensorDecl> decls;
    for (const OutputTensor* t : shards[i]) {
      decls.push_back(t->decl);
      weight_map[t->decl.name] = file;
      total_bytes += t->rows * t->row_bytes;
    }
    DSERVE_ASSIGN_OR_RETURN(SafetensorsWriter writer,
                            SafetensorsWriter::create((dir / file).string(), decls, metadata));
    // The writer lays tensors out in name order, which is the order of shards[i].
    for (const OutputTensor* t : shards[i]) {
      DSERVE_RETURN_IF_ERROR(write_tensor(*t, opts.seed, config.n_routed_experts, writer));
    }
    DSERVE_RETURN_IF_ERROR(writer.finish());
  }
  if (shards.size() > 1) {
    const nlohmann::json index = {{"metadata", {{"total_size", total_bytes}}},
                                  {"weight_map", weight_map}};
    DSERVE_RETURN_IF_ERROR(write_text(dir / "model.safetensors.index.json", index.dump(2) + "\n"));
  }

  nlohmann::json cfg = nlohmann::json::parse(model_config_to_json(config));
  cfg["torch_dtype"] = opts.dtype == ModelInitOptions::DType::kF32 ? "float32" : "bfloat16";
  DSERVE_RETURN_IF_ERROR(write_text(dir / "config.json", cfg.dump(2) + "\n"));
  const nlohmann::json gen = {{"bos_token_id", config.bos_token_id},
                              {"eos_token_id", config.eos_token_id}};
  DSERVE_RETURN_IF_ERROR(write_text(dir / "generation_config.json", gen.dump(2) + "\n"));
  fs::copy_file(opts.tokenizer_json, dir / "tokenizer.json", fs::copy_options::overwrite_existing,
                ec);
  if (ec) {
    return unavailable(opts.tokenizer_json + ": cannot copy into " + opts.out_dir + ": " +
                       ec.message());
  }
  return Status::ok();
}

}  // namespace dserve::model

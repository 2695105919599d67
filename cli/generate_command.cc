// `dserve generate`: load a model, prefill a prompt in chunks, decode token by token and
// stream the text; end with a line of timings.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "dserve/model/checkpoint.h"
#include "dserve/model/config.h"
#include "dserve/model/engine.h"
#include "dserve/model/model.h"
#include "dserve/model/prefix_cache.h"
#include "dserve/model/sampler.h"
#include "dserve/tokenizer/tokenizer.h"

namespace dserve::cli {
namespace {

struct GenerateOptions {
  std::string model_dir;
  std::string prompt;
  bool chat = false;
  int64_t max_tokens = 64;
  int64_t prefill_chunk = 512;
  model::SamplingParams sampling;
  // Prefix store: reuse and keep the prompt's 128-token blocks (RocksDB at kv_store_dir).
  std::string kv_store_dir;
  uint64_t kv_store_mib = 4096;
  int64_t kv_snapshot_every = 4;
  std::string device = "cpu";
  std::string kv_dtype = "fp32";
};

// The model's config with the KV dtype `name` applied; errors name the flag.
Result<model::ModelConfig> config_with_kv_dtype(const std::string& dir, const std::string& name) {
  auto config = model::load_model_config(dir);
  if (!config.is_ok()) return config.status();
  auto dtype = kvstore::parse_kv_dtype(name);
  if (!dtype.is_ok()) return invalid_argument("--kv-dtype: " + dtype.status().message());
  if (Status s = model::set_kv_dtype(*config, *dtype); !s.is_ok()) {
    return invalid_argument("--kv-dtype: " + s.message());
  }
  return config;
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

int run_generate(const GenerateOptions& o) {
  if (Status s = model::validate_sampling_params(o.sampling); !s.is_ok()) {
    print_error(s.message());
    return 2;
  }
  if (o.max_tokens < 0 || o.prefill_chunk < 1) {
    print_error("--max-tokens must be >= 0 and --prefill-chunk >= 1");
    return 2;
  }
  auto device = model::parse_device(o.device);
  if (!device.is_ok()) {
    print_error("--device: " + device.status().message());
    return 2;
  }
  const auto load_start = Clock::now();
  auto config = config_with_kv_dtype(o.model_dir, o.kv_dtype);
  if (!config.is_ok()) {
    print_error(config.status().to_string());
    return 2;
  }
  auto tokenizer = tokenizer::Tokenizer::load(o.model_dir + "/tokenizer.json");
  if (!tokenizer.is_ok()) {
    print_error(tokenizer.status().to_string());
    return 2;
  }
  auto encoded = tokenizer::encode_prompt(*tokenizer, o.prompt, o.chat,
                                          static_cast<int32_t>(config->bos_token_id));
  if (!encoded.is_ok()) {
    print_error("the prompt cannot be tokenized: " + encoded.status().message());
    return 2;
  }
  const std::vector<int32_t> ids = std::move(encoded).value();

  auto weights = model::load_checkpoint(o.model_dir, *config);
  if (!weights.is_ok()) {
    print_error(weights.status().to_string());
    return 1;
  }
  model::EngineOptions engine_options;
  engine_options.device = *device;
  engine_options.max_requests = 1;
  engine_options.max_step_tokens = o.prefill_chunk;
  engine_options.max_positions =
      static_cast<int64_t>(ids.size()) + std::max<int64_t>(o.max_tokens, 1);
  auto made = model::make_engine(
      std::make_shared<const model::Model>(std::move(config).value(), std::move(weights).value()),
      engine_options);
  if (!made.is_ok()) {
    print_error("--device " + o.device + ": " + made.status().to_string());
    return 1;
  }
  model::Engine& engine = **made;
  std::fprintf(stderr, "dserve: loaded %s in %.2f s on %s; prompt: %zu tokens\n",
               o.model_dir.c_str(), seconds_since(load_start), engine.describe().c_str(),
               ids.size());

  std::unique_ptr<model::PrefixCache> cache;
  if (!o.kv_store_dir.empty()) {
    auto fingerprint = model::checkpoint_fingerprint(o.model_dir);
    if (!fingerprint.is_ok()) {
      print_error(fingerprint.status().to_string());
      return 1;
    }
    kvstore::PrefixStoreOptions options;
    options.disk_path = o.kv_store_dir;
    options.disk_capacity_bytes = o.kv_store_mib << 20;
    options.snapshot_every_blocks = o.kv_snapshot_every;
    auto opened = model::PrefixCache::open(engine, *fingerprint, options);
    if (!opened.is_ok()) {
      print_error("--kv-store " + o.kv_store_dir + ": " + opened.status().to_string());
      return 1;
    }
    cache = std::move(opened).value();
    if (const std::string note = cache->store().disk_quarantined(); !note.empty())
      std::fprintf(stderr, "dserve: warning: --kv-store: %s\n", note.c_str());
  }

  model::RequestHandle request;
  model::Sampler sampler(o.sampling);
  tokenizer::StreamDecoder stream(*tokenizer);

  const auto prefill_start = Clock::now();
  Tensor logits;
  int64_t reused = 0;
  if (cache) {
    auto r = cache->prefill(ids, o.prefill_chunk);
    if (!r.is_ok()) {
      print_error(r.status().to_string());
      return 2;
    }
    request = std::move(r->request);
    logits = std::move(r->last_logits);
    reused = r->reused_tokens;
  } else {
    auto fresh = engine.new_request();
    if (!fresh.is_ok()) {
      print_error(fresh.status().to_string());
      return 1;
    }
    request = std::move(fresh).value();
  }
  // One step of the engine: this request's rows, its last logits.
  auto step = [&](std::span<const int32_t> tokens) -> Status {
    const model::StepRows rows{request.get(), tokens, model::LogitsFor::kLastToken};
    auto r = engine.step(std::span(&rows, 1));
    if (!r.is_ok()) return r.status();
    logits = std::move(r->front());
    return Status::ok();
  };
  for (size_t begin = static_cast<size_t>(request->position()); begin < ids.size();
       begin += static_cast<size_t>(o.prefill_chunk)) {
    const size_t count = std::min(ids.size() - begin, static_cast<size_t>(o.prefill_chunk));
    if (Status s = step(std::span(ids).subspan(begin, count)); !s.is_ok()) {
      print_error(s.to_string());
      return 2;
    }
  }
  const double prefill_s = seconds_since(prefill_start);

  const auto decode_start = Clock::now();
  int64_t generated = 0;
  const auto eos = static_cast<int32_t>(engine.config().eos_token_id);
  while (generated < o.max_tokens) {
    // Only ids the tokenizer can turn into text: the embedding may have padding rows past them.
    const int32_t next =
        sampler.sample(model::sampleable_logits(logits.span(), tokenizer->vocab_size()));
    ++generated;
    if (next == eos) break;
    auto piece = stream.push(next);
    if (!piece.is_ok()) {
      print_error(piece.status().to_string());
      return 1;
    }
    std::fputs(piece->c_str(), stdout);
    std::fflush(stdout);
    if (generated == o.max_tokens) break;
    const int32_t token[1] = {next};
    if (Status s = step(token); !s.is_ok()) {
      print_error(s.to_string());
      return 1;
    }
  }
  std::fputs(stream.flush().c_str(), stdout);
  std::fputs("\n", stdout);
  std::fflush(stdout);
  const double decode_s = seconds_since(decode_start);
  if (cache) {
    cache->store().flush();
    std::fprintf(stderr, "dserve: prefix store %s: reused %lld of %zu prompt tokens\n",
                 o.kv_store_dir.c_str(), static_cast<long long>(reused), ids.size());
  }
  std::fprintf(stderr,
               "dserve: prefill %zu tokens in %.3f s (%.1f tok/s); decode %lld tokens in %.3f s "
               "(%.1f tok/s)\n",
               ids.size(), prefill_s, static_cast<double>(ids.size()) / prefill_s,
               static_cast<long long>(generated), decode_s,
               generated > 0 ? static_cast<double>(generated) / decode_s : 0.0);
  return 0;
}

}  // namespace

void print_error(const std::string& message) {
  std::fprintf(stderr, "dserve: error: %s\n", message.c_str());
}

void add_kv_dtype_option(CLI::App& cmd, std::string& kv_dtype) {
  cmd.add_option("--kv-dtype", kv_dtype,
                 "how KV pages hold compressed entries and indexer keys: fp32 (as computed) or "
                 "fp8 (V4's served format: 584-byte fp8 entries, fp4 indexer keys, at V4 "
                 "widths); every process of a cluster must use the same")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp32", "fp8"}));
}

std::shared_ptr<const model::Model> load_model_or_print(const std::string& dir,
                                                        const std::string& kv_dtype,
                                                        int& exit_code) {
  auto config = config_with_kv_dtype(dir, kv_dtype);
  if (!config.is_ok()) {
    print_error(config.status().to_string());
    exit_code = 2;
    return nullptr;
  }
  auto weights = model::load_checkpoint(dir, *config);
  if (!weights.is_ok()) {
    print_error(weights.status().to_string());
    exit_code = 1;
    return nullptr;
  }
  return std::make_shared<const model::Model>(std::move(config).value(),
                                              std::move(weights).value());
}

Command add_generate_command(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "generate a continuation of a prompt");
  cmd->add_option("--model", o->model_dir,
                  "model directory (config.json, safetensors, tokenizer.json)")
      ->required();
  cmd->add_option("--prompt", o->prompt, "prompt text (UTF-8)")->required();
  cmd->add_flag("--chat", o->chat, "wrap the prompt in DeepSeek's chat format as a user turn");
  cmd->add_option("--max-tokens", o->max_tokens, "tokens to generate at most")
      ->capture_default_str();
  cmd->add_option("--temperature", o->sampling.temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", o->sampling.top_k, "keep the k most likely tokens (0 = all)")
      ->capture_default_str();
  cmd->add_option("--top-p", o->sampling.top_p, "nucleus mass to keep (1 = all)")
      ->capture_default_str();
  cmd->add_option("--seed", o->sampling.seed, "sampling seed")->capture_default_str();
  cmd->add_option("--prefill-chunk", o->prefill_chunk, "prompt tokens per forward call")
      ->capture_default_str();
  add_kv_dtype_option(*cmd, o->kv_dtype);
  cmd->add_option("--device", o->device, "where the model computes: cpu, or cuda:N")
      ->capture_default_str();
  cmd->add_option("--kv-store", o->kv_store_dir,
                  "prefix store directory (RocksDB): reuse and keep the prompt's 128-token blocks "
                  "across runs");
  cmd->add_option("--kv-store-mib", o->kv_store_mib, "disk capacity of the prefix store")
      ->capture_default_str();
  cmd->add_option("--kv-snapshot-every", o->kv_snapshot_every,
                  "keep a state snapshot every N blocks (and at the prompt's last whole block)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  return [o] { return run_generate(*o); };
}

}  // namespace dserve::cli

// `dserve model init`: writes a deterministic random DeepSeek-V4 checkpoint.

#include <chrono>
#include <cstdio>
#include <memory>

#include "commands.h"
#include "dserve/model/model_init.h"
#include "dserve/tokenizer/tokenizer.h"
#include "model_digests.h"

namespace dserve::cli {

Command add_model_init_command(CLI::App& model_app) {
  auto opts = std::make_shared<model::ModelInitOptions>();
  auto layout = std::make_shared<std::string>("official");
  auto dtype = std::make_shared<std::string>("packed");
  CLI::App* cmd = model_app.add_subcommand(
      "init", "write a deterministic random V4 checkpoint (config, safetensors, tokenizer)");
  opts->preset = "tiny";
  cmd->add_option("--preset", opts->preset, "tiny | small | v4-width")->capture_default_str();
  cmd->add_option("--seed", opts->seed, "random seed; the same seed gives the same bytes")
      ->capture_default_str();
  cmd->add_option("--out", opts->out_dir, "output directory")->required();
  cmd->add_option("--layout", *layout,
                  "official (DeepSeek names) | transformers (DeepseekV4ForCausalLM names)")
      ->capture_default_str();
  cmd->add_option("--dtype", *dtype,
                  "packed (official FP8/FP4/BF16 mix) | bf16 | f32 (plain, for the oracle)")
      ->capture_default_str();
  cmd->add_option("--tokenizer", opts->tokenizer_json,
                  "tokenizer.json to ship with the model (default: the one scripts/install-deps.sh "
                  "fetched)");
  return [opts, layout, dtype] {
    if (*layout == "official") {
      opts->layout = model::ModelInitOptions::Layout::kOfficial;
    } else if (*layout == "transformers") {
      opts->layout = model::ModelInitOptions::Layout::kTransformers;
    } else {
      print_error("--layout must be 'official' or 'transformers', got '" + *layout + "'");
      return 2;
    }
    if (*dtype == "packed") {
      opts->dtype = model::ModelInitOptions::DType::kPacked;
    } else if (*dtype == "bf16") {
      opts->dtype = model::ModelInitOptions::DType::kBf16;
    } else if (*dtype == "f32") {
      opts->dtype = model::ModelInitOptions::DType::kF32;
    } else {
      print_error("--dtype must be 'packed', 'bf16' or 'f32', got '" + *dtype + "'");
      return 2;
    }
    if (opts->tokenizer_json.empty()) {
      opts->tokenizer_json = tokenizer::default_tokenizer_json_path(DSERVE_SOURCE_DIR);
    }
    const auto start = std::chrono::steady_clock::now();
    const Status s = model::write_random_checkpoint(*opts);
    if (!s.is_ok()) {
      print_error(s.to_string());
      return s.code() == StatusCode::kInvalidArgument ? 2 : 1;
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(stderr, "dserve: wrote the %s model (seed %llu) to %s in %.1f s\n",
                 opts->preset.c_str(), static_cast<unsigned long long>(opts->seed),
                 opts->out_dir.c_str(), secs);
    auto digest = write_model_digests(opts->out_dir);
    if (!digest.is_ok()) {
      print_error(digest.status().to_string());
      return 1;
    }
    std::fprintf(stderr, "dserve: %s/%s has SHA-256 %s (pin it as the manifest's model.sha256)\n",
                 opts->out_dir.c_str(), std::string(kModelDigestsFile).c_str(), digest->c_str());
    return 0;
  };
}

}  // namespace dserve::cli

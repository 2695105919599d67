// Speculative decoding on the decode batch (decode/speculation.h), the CPU engine on a generated
// preset: decode tokens per second and acceptance length at batch sizes and draft counts, with
// the MTP block drafting (random weights: a poor drafter) and with a drafter that knows the
// answer and is right with probability p (the ceiling the verify path allows), fixed k and
// adaptive. Every figure is from this one run, so ratios between them hold on a noisy machine.
//   speculation_bench [--preset small] [--batches 1,8,32] [--tokens 96] [--max-k 3] [--rounds 2]

#include <unistd.h>
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "dserve/core/random.h"
#include "dserve/decode/decode_batch.h"
#include "dserve/model/checkpoint.h"
#include "dserve/model/engine.h"
#include "dserve/model/model_init.h"
#include "dserve/tokenizer/tokenizer.h"

namespace {

using namespace dserve;
using Clock = std::chrono::steady_clock;

std::shared_ptr<const model::Model> generated(const std::string& preset) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("dserve-speculation-bench-" + preset + "-" + std::to_string(::getpid()));
  model::ModelInitOptions o;
  o.preset = preset;
  o.seed = 1;
  o.out_dir = dir.string();
  o.tokenizer_json = tokenizer::default_tokenizer_json_path(DSERVE_SOURCE_DIR);
  if (Status s = model::write_random_checkpoint(o); !s.is_ok()) {
    std::fprintf(stderr, "speculation_bench: %s\n", s.to_string().c_str());
    std::exit(1);
  }
  auto config = model::load_model_config(o.out_dir);
  auto weights = model::load_checkpoint(o.out_dir, *config);
  std::filesystem::remove_all(dir);
  if (!config.is_ok() || !weights.is_ok()) std::exit(1);
  return std::make_shared<const model::Model>(std::move(*config), std::move(*weights));
}

struct Figures {
  double tokens_per_second = 0.0;
  double acceptance_length = 0.0;  // tokens per request per verify step (0: none)
  int64_t tokens = 0;
  std::map<int64_t, int64_t> k_steps;  // adaptive: steps run with each k
};

// `batch` greedy requests (EOS banned, prompts of 64 tokens) decoded for `tokens` tokens each;
// the clock runs over the decode steps only. Their tokens go to `outputs` when given.
Figures run(model::Engine& engine, int64_t batch, int64_t tokens, decode::DecodeOptions options,
            std::map<uint64_t, std::vector<int32_t>>* outputs) {
  options.max_batch = batch;
  decode::DecodeBatch decoding(engine, options);
  SplitMix64 rng(7);
  for (int64_t i = 0; i < batch; ++i) {
    std::vector<int32_t> prompt(64);
    for (int32_t& t : prompt)
      t = static_cast<int32_t>(2 + rng.below(120000));
    decode::DecodeRequest r;
    r.id = static_cast<uint64_t>(i);
    r.request = std::move(engine.new_request()).value();
    const model::StepRows rows{r.request.get(), prompt, model::LogitsFor::kLastToken};
    r.prompt_logits = std::move((*engine.step(std::span(&rows, 1)))[0]);
    r.sampling.logit_bias.push_back({static_cast<int32_t>(engine.config().eos_token_id), -100.0f});
    r.max_tokens = tokens;
    if (!decoding.add(std::move(r)).is_ok()) std::exit(1);
  }
  Figures f;
  const auto start = Clock::now();
  while (!decoding.empty()) {
    for (const decode::TokenEvent& e : decoding.step()) {
      if (!e.token) continue;
      ++f.tokens;
      if (outputs) (*outputs)[e.request_id].push_back(*e.token);
    }
    if (options.speculative_tokens > 0) ++f.k_steps[decoding.last_draft_tokens()];
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  f.tokens_per_second = static_cast<double>(f.tokens) / seconds;
  f.acceptance_length = decoding.speculation().acceptance_length();
  return f;
}

std::string k_mix(const Figures& f) {
  std::string out;
  int64_t all = 0;
  for (const auto& [k, n] : f.k_steps)
    all += n;
  for (const auto& [k, n] : f.k_steps) {
    char buf[48];
    std::snprintf(buf, sizeof(buf), "%sk%lld %.0f%%", out.empty() ? "" : " ",
                  static_cast<long long>(k),
                  100.0 * static_cast<double>(n) / static_cast<double>(all));
    out += buf;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Speculative decoding on the decode batch: tokens/s by batch size and k"};
  std::string preset = "small";
  std::vector<int64_t> batches{1, 8, 32};
  int64_t tokens = 96;
  int64_t max_k = 3;
  int64_t rounds = 2;
  app.add_option("--preset", preset, "generated preset")->capture_default_str();
  app.add_option("--batches", batches, "batch sizes")->delimiter(',')->capture_default_str();
  app.add_option("--tokens", tokens, "tokens per request")->capture_default_str();
  app.add_option("--max-k", max_k, "largest draft count")
      ->check(CLI::Range(int64_t{1}, model::kMaxDraftTokens))
      ->capture_default_str();
  app.add_option("--rounds", rounds, "runs of each configuration (the best is shown)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  const auto m = generated(preset);
  model::EngineOptions eo;
  eo.draft = true;
  auto engine = model::make_engine(m, eo);
  if (!engine.is_ok()) {
    std::fprintf(stderr, "speculation_bench: %s\n", engine.status().to_string().c_str());
    return 1;
  }
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  std::printf("# speculation_bench: preset %s, %lld tokens per request, greedy, %s, %s\n",
              preset.c_str(), static_cast<long long>(tokens), (*engine)->describe().c_str(), host);
  std::printf("| batch | drafter | k | tok/s | x k=0 | acceptance length | k used |\n");
  std::printf("|---:|---|---|---:|---:|---:|---|\n");
  for (const int64_t batch : batches) {
    std::map<uint64_t, std::vector<int32_t>> truth;
    // Warm the caches and the allocator once; k = 0 gives the drafters' continuation.
    (void)run(**engine, batch, 4, {}, &truth);
    truth.clear();
    (void)run(**engine, batch, tokens, {}, &truth);
    struct Config {
      std::string drafter, k;
      decode::DecodeOptions options;
      Figures best;
    };
    std::vector<std::unique_ptr<decode::Drafter>> drafters;
    std::vector<Config> configs{{"-", "0", {}, {}}};
    const auto add = [&](const std::string& name, decode::Drafter* d) {
      for (int64_t k = 1; k <= max_k; ++k) {
        configs.push_back({name,
                           std::to_string(k),
                           {.speculative_tokens = k, .adaptive_speculation = false, .drafter = d},
                           {}});
      }
      configs.push_back({name,
                         "adaptive <= " + std::to_string(max_k),
                         {.speculative_tokens = max_k, .adaptive_speculation = true, .drafter = d},
                         {}});
    };
    add("MTP block", nullptr);
    for (const double p : {0.5, 0.8, 0.95}) {
      char name[32];
      std::snprintf(name, sizeof(name), "right %.0f%%", p * 100);
      drafters.push_back(std::make_unique<decode::ContinuationDrafter>(truth, p, 3));
      add(name, drafters.back().get());
    }
    // Every configuration `rounds` times, round-robin, its best kept: the machine's drift falls
    // on all of them alike.
    for (int64_t round = 0; round < rounds; ++round) {
      for (Config& c : configs) {
        const Figures f = run(**engine, batch, tokens, c.options, nullptr);
        if (f.tokens_per_second > c.best.tokens_per_second) c.best = f;
      }
    }
    const double plain = configs.front().best.tokens_per_second;
    for (const Config& c : configs) {
      std::printf("| %lld | %s | %s | %.1f | %.2f | %.2f | %s |\n", static_cast<long long>(batch),
                  c.drafter.c_str(), c.k.c_str(), c.best.tokens_per_second,
                  c.best.tokens_per_second / plain, c.best.acceptance_length,
                  k_mix(c.best).c_str());
    }
    std::fflush(stdout);
  }
  return 0;
}

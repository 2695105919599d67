// CPU reference forward: prefill and decode throughput of a generated preset.
//   forward_bench [--benchmark_filter=...]   (presets: tiny, small; generated into /tmp)
// Prefill: one request, prompts of 512 and 4096 tokens in one call. Decode: one token per
// call after a 1024-token prompt.

#include <benchmark/benchmark.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <memory>

#include "dserve/core/random.h"
#include "dserve/model/checkpoint.h"
#include "dserve/model/config.h"
#include "dserve/model/model.h"
#include "dserve/model/model_init.h"
#include "dserve/tokenizer/tokenizer.h"

namespace {

using namespace dserve;

const model::Model& preset_model(const std::string& preset) {
  static std::map<std::string, std::unique_ptr<model::Model>> models;
  auto& slot = models[preset];
  if (!slot) {
    const auto dir = std::filesystem::temp_directory_path() /
                     ("dserve-forward-bench-" + preset + "-" + std::to_string(::getpid()));
    model::ModelInitOptions o;
    o.preset = preset;
    o.seed = 1;
    o.out_dir = dir.string();
    o.tokenizer_json = tokenizer::default_tokenizer_json_path(DSERVE_SOURCE_DIR);
    if (!model::write_random_checkpoint(o).is_ok()) std::abort();
    auto config = model::load_model_config(o.out_dir);
    auto weights = model::load_checkpoint(o.out_dir, *config);
    if (!config.is_ok() || !weights.is_ok()) std::abort();
    slot = std::make_unique<model::Model>(std::move(*config), std::move(*weights));
    std::filesystem::remove_all(dir);
  }
  return *slot;
}

std::vector<int32_t> tokens(int64_t n) {
  SplitMix64 rng(1);
  std::vector<int32_t> ids;
  while (static_cast<int64_t>(ids.size()) < n)
    ids.push_back(static_cast<int32_t>(1 + rng.below(128000)));
  return ids;
}

void BM_Prefill(benchmark::State& state, const char* preset) {
  const model::Model& m = preset_model(preset);
  const auto ids = tokens(state.range(0));
  for (auto _ : state) {
    model::RequestState s = m.new_state();
    auto logits = m.forward(ids, s, model::LogitsFor::kLastToken);
    benchmark::DoNotOptimize(logits->data());
  }
  state.counters["tok/s"] = benchmark::Counter(static_cast<double>(ids.size()),
                                               benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Decode(benchmark::State& state, const char* preset) {
  const model::Model& m = preset_model(preset);
  model::RequestState s = m.new_state();
  (void)m.forward(tokens(1024), s, model::LogitsFor::kLastToken);
  const int32_t one[1] = {42};
  for (auto _ : state) {
    auto logits = m.forward(one, s, model::LogitsFor::kLastToken);
    benchmark::DoNotOptimize(logits->data());
  }
  state.counters["tok/s"] = benchmark::Counter(1.0, benchmark::Counter::kIsIterationInvariantRate);
}

// One decode step for B requests (each after a 256-token prompt): one batched forward over all
// of them (what DecodeBatch::step runs), or one forward per request (what it ran before).
// tok/s is the step's aggregate: B tokens per iteration.
void decode_step(benchmark::State& state, const char* preset, bool batched) {
  const model::Model& m = preset_model(preset);
  const auto b = static_cast<size_t>(state.range(0));
  std::vector<model::RequestState> states;
  const auto prompt = tokens(256);
  for (size_t i = 0; i < b; ++i) {
    states.push_back(m.new_state());
    (void)m.forward(prompt, states.back(), model::LogitsFor::kLastToken);
  }
  const int32_t one[1] = {42};
  std::vector<model::Model::StepRequest> step;
  for (auto& s : states)
    step.push_back({one, &s, model::LogitsFor::kLastToken});
  for (auto _ : state) {
    if (batched) {
      auto logits = m.forward_batch(step);
      benchmark::DoNotOptimize(logits->front().data());
    } else {
      for (auto& s : states) {
        auto logits = m.forward(one, s, model::LogitsFor::kLastToken);
        benchmark::DoNotOptimize(logits->data());
      }
    }
  }
  state.counters["tok/s"] =
      benchmark::Counter(static_cast<double>(b), benchmark::Counter::kIsIterationInvariantRate);
}
void BM_DecodeBatched(benchmark::State& state, const char* preset) {
  decode_step(state, preset, true);
}
void BM_DecodeOneByOne(benchmark::State& state, const char* preset) {
  decode_step(state, preset, false);
}
BENCHMARK_CAPTURE(BM_DecodeBatched, small, "small")
    ->Arg(1)
    ->Arg(4)
    ->Arg(16)
    ->Arg(64)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_DecodeOneByOne, small, "small")
    ->Arg(1)
    ->Arg(4)
    ->Arg(16)
    ->Arg(64)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK_CAPTURE(BM_Prefill, tiny, "tiny")
    ->Arg(512)
    ->Arg(4096)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_Prefill, small, "small")
    ->Arg(512)
    ->Arg(4096)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_CAPTURE(BM_Decode, tiny, "tiny")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Decode, small, "small")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();

// Encode throughput of the C++ tokenizer on the seeded tokenizer corpus
// (tests/tokenizer/tokenizer_corpus.h), the same strings tools/tokenizer-oracle/bench.mjs times
// for the JavaScript tokenizer. See bench/tokenizer_bench.sh.
//
//   tokenizer_bench [--write_corpus=<path.json>] [google benchmark flags]

#include <benchmark/benchmark.h>

#include <cstring>
#include <ctime>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "../tests/tokenizer/tokenizer_corpus.h"
#include "dserve/tokenizer/tokenizer.h"

namespace {

constexpr uint64_t kCorpusSeed = 20250601;  // as tests/tokenizer/tokenizer_oracle_test.cc
constexpr size_t kCorpusSize = 12000;

const std::vector<std::string>& corpus() {
  static const auto* const kCorpus = new std::vector<std::string>(
      dserve::tokenizer::testing::make_tokenizer_corpus(kCorpusSeed, kCorpusSize));
  return *kCorpus;
}

const dserve::tokenizer::Tokenizer& tokenizer() {
  static const auto* const kTokenizer = [] {
    const std::string path = dserve::tokenizer::default_tokenizer_json_path(DSERVE_SOURCE_DIR);
    auto loaded = dserve::tokenizer::Tokenizer::load(path);
    if (!loaded.is_ok()) {
      std::cerr << loaded.status().to_string() << " (run scripts/install-deps.sh)\n";
      std::exit(1);
    }
    return new dserve::tokenizer::Tokenizer(std::move(loaded).value());
  }();
  return *kTokenizer;
}

void BM_EncodeCorpus(benchmark::State& state) {
  const auto& texts = corpus();
  const auto& tok = tokenizer();
  int64_t bytes = 0;
  int64_t tokens = 0;
  for (const auto& t : texts)
    bytes += static_cast<int64_t>(t.size());
  for (auto _ : state) {
    for (const auto& t : texts) {
      auto ids = tok.encode(t);
      tokens += static_cast<int64_t>(ids->size());
      benchmark::DoNotOptimize(ids);
    }
  }
  state.SetBytesProcessed(bytes * state.iterations());
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsRate);
  state.counters["strings"] = static_cast<double>(texts.size());
}
BENCHMARK(BM_EncodeCorpus)->Unit(benchmark::kMillisecond)->MinTime(3.0);

// One word of state.range(0) random lowercase letters (the poison-pill prompt of the red-team
// report: no pre-tokenizer split, so BPE merges run over the whole word). Time per byte stays
// flat from 10 kB to 1 MB when encoding is linear (n log n with the merge heap).
void BM_EncodeOneLongWord(benchmark::State& state) {
  std::string word(static_cast<size_t>(state.range(0)), 'a');
  uint64_t x = 1;
  for (char& c : word) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    c = static_cast<char>('a' + (x >> 33) % 26);
  }
  const auto& tok = tokenizer();
  int64_t tokens = 0;
  for (auto _ : state) {
    auto ids = tok.encode(word);
    tokens = static_cast<int64_t>(ids->size());
    benchmark::DoNotOptimize(ids);
  }
  state.SetBytesProcessed(state.range(0) * state.iterations());
  state.counters["tokens"] = static_cast<double>(tokens);
}
BENCHMARK(BM_EncodeOneLongWord)
    ->Unit(benchmark::kMillisecond)
    ->Arg(10000)
    ->Arg(100000)
    ->Arg(1000000);

void BM_LoadTokenizerJson(benchmark::State& state) {
  const std::string path = dserve::tokenizer::default_tokenizer_json_path(DSERVE_SOURCE_DIR);
  for (auto _ : state) {
    auto loaded = dserve::tokenizer::Tokenizer::load(path);
    benchmark::DoNotOptimize(loaded);
  }
}
BENCHMARK(BM_LoadTokenizerJson)->Unit(benchmark::kMillisecond)->Iterations(3);

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    constexpr std::string_view kFlag = "--write_corpus=";
    if (std::strncmp(argv[i], kFlag.data(), kFlag.size()) == 0) {
      std::ofstream(argv[i] + kFlag.size(), std::ios::binary)
          << dserve::tokenizer::testing::corpus_to_json(corpus());
      return 0;
    }
  }
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%d", std::gmtime(&now));
  benchmark::AddCustomContext("date", date);
  benchmark::AddCustomContext(
      "configuration", "DeepSeek tokenizer.json, corpus seed " + std::to_string(kCorpusSeed) +
                           ", " + std::to_string(kCorpusSize) + " strings, one thread");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

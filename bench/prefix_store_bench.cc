// Shared-system-prompt workload through the prefix store (issue: tiered prefix KV store).
//
//   prefix_store_bench --model DIR [--requests 64 --system-tokens 4096 --tail-tokens 256]
//                      [--disk DIR] [--sweep-system-tokens 4000]
//
// Requests run one after another on one CPU stream; a request's time to first token (TTFT) is
// its prefill (restore + forward of the rest) plus picking the first token. "off" runs every
// prompt cold; "on" runs them through a PrefixCache (device, host and RocksDB tiers). The
// sweep runs the "on" case for several snapshot intervals and reports snapshot bytes against
// the tokens reused.

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <numeric>
#include <thread>

#include "dserve/core/random.h"
#include "dserve/model/checkpoint.h"
#include "dserve/model/config.h"
#include "dserve/model/engine.h"
#include "dserve/model/model.h"
#include "dserve/model/prefix_cache.h"
#include "dserve/model/sampler.h"

namespace {

using namespace dserve;
using Clock = std::chrono::steady_clock;
namespace kv = dserve::kvstore;

struct Workload {
  std::vector<std::vector<int32_t>> prompts;
};

Workload make_workload(int64_t requests, int64_t system_tokens, int64_t tail_tokens) {
  SplitMix64 rng(2026);
  std::vector<int32_t> system(static_cast<size_t>(system_tokens));
  for (auto& t : system)
    t = static_cast<int32_t>(1 + rng.below(128000));
  Workload w;
  for (int64_t r = 0; r < requests; ++r) {
    std::vector<int32_t> p = system;
    for (int64_t i = 0; i < tail_tokens; ++i)
      p.push_back(static_cast<int32_t>(1 + rng.below(128000)));
    w.prompts.push_back(std::move(p));
  }
  return w;
}

struct Figures {
  double mean_ttft_ms = 0, p50_ttft_ms = 0, max_ttft_ms = 0;
  int64_t computed = 0, reused = 0;
  std::array<int64_t, kv::kTierCount> blocks_from_tier{};
  std::vector<int32_t> first_tokens;
};

void summarise(std::vector<double> ttft, Figures& f) {
  f.mean_ttft_ms =
      std::accumulate(ttft.begin(), ttft.end(), 0.0) / static_cast<double>(ttft.size());
  std::sort(ttft.begin(), ttft.end());
  f.p50_ttft_ms = ttft[ttft.size() / 2];
  f.max_ttft_ms = ttft.back();
}

Figures run_off(const model::Model& m, const Workload& w) {
  Figures f;
  std::vector<double> ttft;
  for (const auto& p : w.prompts) {
    const auto t0 = Clock::now();
    model::RequestState state = m.new_state();
    auto logits = m.forward(p, state, model::LogitsFor::kLastToken);
    if (!logits.is_ok()) throw std::runtime_error(logits.status().to_string());
    f.first_tokens.push_back(model::argmax({logits->data(), static_cast<size_t>(logits->numel())}));
    ttft.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    f.computed += static_cast<int64_t>(p.size());
  }
  summarise(ttft, f);
  return f;
}

Figures run_on(model::PrefixCache& cache, const Workload& w) {
  Figures f;
  std::vector<double> ttft;
  for (const auto& p : w.prompts) {
    const auto t0 = Clock::now();
    auto r = cache.prefill(p);
    if (!r.is_ok()) throw std::runtime_error(r.status().to_string());
    f.first_tokens.push_back(
        model::argmax({r->last_logits.data(), static_cast<size_t>(r->last_logits.numel())}));
    ttft.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    f.computed += r->computed_tokens;
    f.reused += r->reused_tokens;
    for (int t = 0; t < kv::kTierCount; ++t)
      f.blocks_from_tier[static_cast<size_t>(t)] +=
          r->reused_blocks_from_tier[static_cast<size_t>(t)];
  }
  summarise(ttft, f);
  return f;
}

void print_store(const kv::PrefixStoreMetrics& m) {
  std::printf(
      "  store: lookups %llu, hits %llu, hit tokens %llu of %llu; snapshots %llu (%.1f MiB held)\n",
      static_cast<unsigned long long>(m.lookups), static_cast<unsigned long long>(m.hits),
      static_cast<unsigned long long>(m.hit_tokens),
      static_cast<unsigned long long>(m.lookup_tokens),
      static_cast<unsigned long long>(m.snapshots),
      static_cast<double>(m.snapshot_bytes) / (1 << 20));
  for (int t = 0; t < kv::kTierCount; ++t) {
    const auto& tm = m.tiers[static_cast<size_t>(t)];
    std::printf(
        "  tier %-6s: hit blocks %llu, blocks %llu, %.1f MiB, evictions %llu\n",
        std::string(kv::tier_name(static_cast<kv::Tier>(t))).c_str(),
        static_cast<unsigned long long>(tm.hit_blocks), static_cast<unsigned long long>(tm.blocks),
        static_cast<double>(tm.bytes) / (1 << 20), static_cast<unsigned long long>(tm.evictions));
  }
  if (m.disk) {
    std::printf("  disk write-back: written %llu, dropped (queue full) %llu, queued now %llu\n",
                static_cast<unsigned long long>(m.disk->written),
                static_cast<unsigned long long>(m.disk->dropped_queue_full),
                static_cast<unsigned long long>(m.disk->queued_puts));
  }
}

// The effect of the FP8 codec: a prompt whose first `blocks` blocks come back from the host
// tier through `codec`, against the same prompt computed cold. Logits of every tail position.
void fp8_effect(const model::Model& m, model::Engine& engine, const std::string& fingerprint,
                int64_t blocks) {
  SplitMix64 rng(77);
  std::vector<int32_t> prompt;
  const int64_t tail = 32;
  for (int64_t i = 0; i < blocks * kv::kBlockTokens + tail; ++i)
    prompt.push_back(static_cast<int32_t>(1 + rng.below(128000)));
  const auto head = std::span(prompt).first(static_cast<size_t>(blocks * kv::kBlockTokens));
  const auto rest = std::span(prompt).subspan(head.size());
  model::RequestState cold = m.new_state();
  (void)m.forward(head, cold, model::LogitsFor::kLastToken);
  const auto want = m.forward(rest, cold, model::LogitsFor::kAllTokens);
  for (kv::Codec codec : {kv::Codec::kLossless, kv::Codec::kFp8}) {
    kv::PrefixStoreOptions o;
    o.device_capacity_bytes = 0;  // every block comes back from the host tier, decoded
    o.host_codec = codec;
    o.snapshot_every_blocks = 1;
    auto cache = model::PrefixCache::open(engine, fingerprint, o);
    if (!cache.is_ok()) throw std::runtime_error(cache.status().to_string());
    (void)(*cache)->prefill(std::span(prompt).first(head.size() + 1));
    auto r = (*cache)->prefill(std::span(prompt).first(head.size() + 1));
    if (!r.is_ok() || r->reused_tokens != blocks * kv::kBlockTokens) {
      throw std::runtime_error("fp8 effect: the prefix was not reused");
    }
    // r->state stands after head + 1 token; continue with the rest of the tail.
    auto state = engine.release_state(std::move(r->request));
    if (!state.is_ok()) throw std::runtime_error(state.status().to_string());
    auto got_rest = m.forward(rest.subspan(1), *state, model::LogitsFor::kAllTokens);
    const int64_t vocab = m.config().vocab_size;
    double max_abs = 0, max_logit = 0;
    int64_t agree = 0;
    for (int64_t t = 0; t < tail; ++t) {
      const float* w = want->data() + t * vocab;
      const float* g = t == 0 ? r->last_logits.data() : got_rest->data() + (t - 1) * vocab;
      for (int64_t v = 0; v < vocab; ++v) {
        max_abs = std::max(max_abs, static_cast<double>(std::abs(w[v] - g[v])));
        max_logit = std::max(max_logit, static_cast<double>(std::abs(w[v])));
      }
      agree += model::argmax({w, static_cast<size_t>(vocab)}) ==
                       model::argmax({g, static_cast<size_t>(vocab)})
                   ? 1
                   : 0;
    }
    const auto bytes =
        kv::encoded_size(kv::Pool::kCompressed, codec, (*cache)->layout().compressed);
    std::printf(
        "  codec %-8s: compressed entries %zu bytes per block (%.1f B/token over %zu layers); "
        "%lld reused blocks, %lld tail positions: max |logit diff| %.3g (max |logit| %.3g), "
        "argmax agrees %lld/%lld\n",
        std::string(kv::codec_name(codec)).c_str(), bytes,
        static_cast<double>(bytes) / kv::kBlockTokens,
        (*cache)->layout().compressed.segments.size(), static_cast<long long>(blocks),
        static_cast<long long>(tail), max_abs, max_logit, static_cast<long long>(agree),
        static_cast<long long>(tail));
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"prefix store benchmark: shared system prompt, unique tails"};
  std::string model_dir,
      disk_dir = (std::filesystem::temp_directory_path() / "dserve-prefix-bench").string();
  int64_t requests = 64, system_tokens = 4096, tail_tokens = 256, sweep_system_tokens = 4000;
  uint64_t device_mib = 1024, host_mib = 4096;
  bool skip_off = false, sweep = true, only_fp8 = false;
  int64_t fp8_blocks = 4;
  app.add_option("--model", model_dir,
                 "checkpoint directory (e.g. dserve model init --preset small)")
      ->required();
  app.add_option("--requests", requests)->check(CLI::PositiveNumber);
  app.add_option("--system-tokens", system_tokens)->check(CLI::PositiveNumber);
  app.add_option("--tail-tokens", tail_tokens)->check(CLI::PositiveNumber);
  app.add_option("--disk", disk_dir, "RocksDB directory for the disk tier (emptied first)");
  app.add_option("--device-mib", device_mib);
  app.add_option("--host-mib", host_mib);
  app.add_option("--sweep-system-tokens", sweep_system_tokens,
                 "system prompt length of the snapshot sweep");
  app.add_flag("--skip-off", skip_off, "do not run the store-off baseline");
  app.add_flag("!--no-sweep", sweep, "skip the snapshot-interval sweep");
  app.add_flag("--fp8-effect-only", only_fp8, "only measure the FP8 codec's effect on logits");
  app.add_option("--fp8-blocks", fp8_blocks, "reused blocks in the FP8 measurement");
  CLI11_PARSE(app, argc, argv);

  auto config = model::load_model_config(model_dir);
  if (!config.is_ok()) {
    std::fprintf(stderr, "%s\n", config.status().to_string().c_str());
    return 1;
  }
  auto weights = model::load_checkpoint(model_dir, *config);
  auto fingerprint = model::checkpoint_fingerprint(model_dir);
  if (!weights.is_ok() || !fingerprint.is_ok()) {
    std::fprintf(stderr, "cannot load %s\n", model_dir.c_str());
    return 1;
  }
  const auto shared = std::make_shared<const model::Model>(*config, std::move(*weights));
  const model::Model& m = *shared;
  auto made = model::make_engine(shared, {});
  if (!made.is_ok()) throw std::runtime_error(made.status().to_string());
  model::Engine& engine = **made;
  const std::time_t now = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof(date), "%F", std::gmtime(&now));
  std::printf(
      "prefix store bench, %s: model %s (hidden %lld, %lld layers), %lld requests x (%lld shared + "
      "%lld unique) tokens, %u hardware threads\n",
      date, model_dir.c_str(), static_cast<long long>(config->hidden_size),
      static_cast<long long>(config->num_layers), static_cast<long long>(requests),
      static_cast<long long>(system_tokens), static_cast<long long>(tail_tokens),
      std::thread::hardware_concurrency());

  std::printf("FP8 codec against lossless, host tier:\n");
  fp8_effect(m, engine, *fingerprint, fp8_blocks);
  if (only_fp8) return 0;
  const Workload w = make_workload(requests, system_tokens, tail_tokens);
  auto make_cache = [&](int64_t every) {
    std::filesystem::remove_all(disk_dir);
    kv::PrefixStoreOptions o;
    o.device_capacity_bytes = device_mib << 20;
    o.host_capacity_bytes = host_mib << 20;
    o.disk_path = disk_dir;
    o.snapshot_every_blocks = every;
    auto cache = model::PrefixCache::open(engine, *fingerprint, o);
    if (!cache.is_ok()) throw std::runtime_error(cache.status().to_string());
    return std::move(*cache);
  };

  auto cache = make_cache(4);
  const Figures on = run_on(*cache, w);
  std::printf(
      "store on : prefill tokens computed %lld (reused %lld); TTFT mean %.1f ms, p50 %.1f ms, max "
      "%.1f ms; reused blocks by tier device %lld host %lld disk %lld\n",
      static_cast<long long>(on.computed), static_cast<long long>(on.reused), on.mean_ttft_ms,
      on.p50_ttft_ms, on.max_ttft_ms, static_cast<long long>(on.blocks_from_tier[0]),
      static_cast<long long>(on.blocks_from_tier[1]),
      static_cast<long long>(on.blocks_from_tier[2]));
  cache->store().flush();
  print_store(cache->store().metrics());
  cache.reset();
  if (!skip_off) {
    const Figures off = run_off(m, w);
    std::printf(
        "store off: prefill tokens computed %lld; TTFT mean %.1f ms, p50 %.1f ms, max %.1f ms\n",
        static_cast<long long>(off.computed), off.mean_ttft_ms, off.p50_ttft_ms, off.max_ttft_ms);
    std::printf("=> %.1fx fewer prefill tokens, %.1fx lower mean TTFT; first tokens %s\n",
                static_cast<double>(off.computed) / static_cast<double>(on.computed),
                off.mean_ttft_ms / on.mean_ttft_ms,
                off.first_tokens == on.first_tokens ? "identical" : "DIFFER");
  }
  if (sweep) {
    std::printf("snapshot interval sweep (%lld requests, %lld shared tokens):\n",
                static_cast<long long>(std::min<int64_t>(requests, 16)),
                static_cast<long long>(sweep_system_tokens));
    const Workload sw =
        make_workload(std::min<int64_t>(requests, 16), sweep_system_tokens, tail_tokens);
    for (int64_t every : {1, 2, 4, 8, 16}) {
      auto c = make_cache(every);
      const Figures f = run_on(*c, sw);
      const auto metrics = c->store().metrics();
      std::printf(
          "  every %2lld blocks: snapshots %3llu (%6.1f MiB), reused %6lld tokens, computed %6lld, "
          "mean TTFT %.1f ms\n",
          static_cast<long long>(every), static_cast<unsigned long long>(metrics.snapshots),
          static_cast<double>(metrics.snapshot_bytes) / (1 << 20), static_cast<long long>(f.reused),
          static_cast<long long>(f.computed), f.mean_ttft_ms);
    }
  }
  std::filesystem::remove_all(disk_dir);
  return 0;
}

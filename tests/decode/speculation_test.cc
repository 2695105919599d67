// Speculative decoding on the decode batch (speculation.h): the tokens with drafts are the tokens
// without them (greedy and sampled, per seed), the request state after every step equals the
// state of a run without speculation at the same position, byte for byte, and the control picks
// k from the acceptance and the step cost.

#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <string_view>

#include "dserve/decode/decode_batch.h"
#include "dserve/model/state_packing.h"
#include "test_model.h"

namespace dserve::decode {
namespace {

using model::testing_support::prompt_of;

std::shared_ptr<model::Engine> drafting_engine(const std::shared_ptr<const model::Model>& m) {
  model::EngineOptions options;
  options.draft = true;
  auto made = model::make_engine(m, options);
  EXPECT_TRUE(made.is_ok()) << made.status().to_string();
  return std::move(made).value();
}

struct Job {
  uint64_t id = 0;
  std::vector<int32_t> prompt;
  model::SamplingParams sampling;
  int64_t max_tokens = 0;
};

struct Outcome {
  std::map<uint64_t, std::vector<int32_t>> tokens;
  // Per request: the hash of its packed state at each position it was seen committed.
  std::map<uint64_t, std::map<int64_t, size_t>> states;
  SpeculationStats speculation;
};

// Every job prefilled on `engine` and decoded in one batch to the end; states hashed after every
// step when `hash_states`.
Outcome decode_all(model::Engine& engine, const std::vector<Job>& jobs, DecodeOptions options,
                   bool hash_states) {
  Outcome run;
  if (hash_states) {
    options.on_committed = [&](uint64_t id, const model::EngineRequest& request) {
      const std::vector<uint8_t> bytes =
          model::pack_state(engine.config(), *engine.host_state(request));
      run.states[id][request.position()] = std::hash<std::string_view>{}(
          std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
    };
  }
  DecodeBatch batch(engine, options);
  for (const Job& job : jobs) {
    DecodeRequest r;
    r.id = job.id;
    r.request = std::move(engine.new_request()).value();
    const model::StepRows rows{r.request.get(), job.prompt, model::LogitsFor::kLastToken};
    auto logits = engine.step(std::span(&rows, 1));
    EXPECT_TRUE(logits.is_ok());
    r.prompt_logits = std::move((*logits)[0]);
    r.sampling = job.sampling;
    r.max_tokens = job.max_tokens;
    EXPECT_TRUE(batch.add(std::move(r)).is_ok());
  }
  while (!batch.empty()) {
    for (const TokenEvent& e : batch.step()) {
      EXPECT_NE(e.finished, FinishReason::kError) << e.error.to_string();
      if (e.token) {
        std::vector<int32_t>& out = run.tokens[e.request_id];
        EXPECT_EQ(e.index, static_cast<int64_t>(out.size())) << "tokens out of order";
        out.push_back(*e.token);
      }
    }
  }
  run.speculation = batch.speculation();
  EXPECT_EQ(engine.page_pools().bytes_in_use(), 0u) << "pages still held after every request";
  return run;
}

void expect_same_states(const Outcome& reference, const Outcome& run, const std::string& what) {
  int64_t compared = 0;
  for (const auto& [id, states] : run.states) {
    const auto& want = reference.states.at(id);
    for (const auto& [position, hash] : states) {
      auto it = want.find(position);
      ASSERT_NE(it, want.end()) << what << ": request " << id << " position " << position;
      ASSERT_EQ(hash, it->second) << what << ": request " << id << " differs at " << position;
      ++compared;
    }
  }
  EXPECT_GT(compared, 0);
  std::cout << "[ figures  ] " << what << ": " << compared << " states equal to the plain run's; "
            << run.speculation.drafted << " drafts, " << run.speculation.accepted
            << " accepted, acceptance length " << run.speculation.acceptance_length() << "\n";
}

// Greedy, one long request on the tiny preset: past 1,000 CSA windows (4 tokens), 250 HCA
// windows (16) and around the 16-token sliding window 250 times; EOS is banned so that the run
// is long. k = 1, 2, 3 with the MTP block (random weights: most drafts rejected, the rewinds
// exercised) and k = 3 with a drafter right 80% of the time (long accepted runs).
TEST(Speculation, GreedyTokensAndEveryStateEqualThoseWithoutDrafts) {
  auto engine = drafting_engine(model::testing_support::tiny_model_shared());
  Job job{1, prompt_of(21, 4), {}, 4000};
  job.sampling.logit_bias.push_back({static_cast<int32_t>(engine->config().eos_token_id), -100.0f});
  const std::vector<Job> jobs{job};
  const Outcome plain = decode_all(*engine, jobs, {}, true);
  ASSERT_EQ(plain.tokens.at(1).size(), 4000u);
  for (int64_t k = 1; k <= 3; ++k) {
    const Outcome run =
        decode_all(*engine, jobs, {.speculative_tokens = k, .adaptive_speculation = false}, true);
    EXPECT_EQ(run.tokens, plain.tokens) << "k = " << k;
    expect_same_states(plain, run, "MTP drafts, k = " + std::to_string(k));
  }
  ContinuationDrafter drafter(plain.tokens, 0.8, 7);
  const Outcome run = decode_all(
      *engine, jobs, {.speculative_tokens = 3, .adaptive_speculation = false, .drafter = &drafter},
      true);
  EXPECT_EQ(run.tokens, plain.tokens);
  expect_same_states(plain, run, "drafts right 80%, k = 3");
  EXPECT_GT(run.speculation.acceptance_length(), 2.0);
}

// The small preset's real window sizes: HCA 128, a 128-token sliding window.
TEST(Speculation, GreedyOnTheSmallPresetCrossesHcaWindowsExactly) {
  auto model = model::testing_support::generated_model("small", 0);
  ASSERT_NE(model, nullptr);
  auto engine = drafting_engine(model);
  Job job{1, prompt_of(100, 6), {}, 600};
  job.sampling.logit_bias.push_back({static_cast<int32_t>(engine->config().eos_token_id), -100.0f});
  const Outcome plain = decode_all(*engine, {job}, {}, true);
  ContinuationDrafter drafter(plain.tokens, 0.7, 3);
  for (Drafter* d : {static_cast<Drafter*>(nullptr), static_cast<Drafter*>(&drafter)}) {
    const Outcome run =
        decode_all(*engine, {job},
                   {.speculative_tokens = 3, .adaptive_speculation = false, .drafter = d}, true);
    EXPECT_EQ(run.tokens, plain.tokens);
    expect_same_states(plain, run, d ? "small, drafts right 70%" : "small, MTP drafts");
  }
}

// Sampled decoding on a 64-token vocabulary at temperature 0.7, 400 seeds: with k = 3 every
// seed gives the tokens it gives without drafts (so the per-position distributions match: their
// total variation is printed and must be < 0.01), and runs again give the same tokens. Several
// requests per batch joined together, some with penalties.
TEST(Speculation, SampledTokensAreTheSameDistributionAndTheSameTokensPerSeed) {
  auto model = model::testing_support::generated_model("tiny", 64, kvstore::KvDtype::kFp32, 1);
  ASSERT_NE(model, nullptr);
  auto engine = drafting_engine(model);
  constexpr int kSeeds = 400;
  constexpr int64_t kTokens = 10;
  std::vector<Job> jobs;
  for (uint64_t i = 0; i < kSeeds; ++i) {
    Job j{i, prompt_of(5 + static_cast<int64_t>(i % 7), 100 + i % 3), {}, kTokens};
    for (int32_t& t : j.prompt)
      t %= 64;
    j.sampling.temperature = 0.7f;
    j.sampling.seed = 1000 + i;
    if (i % 5 == 0) j.sampling.presence_penalty = 0.5f;
    jobs.push_back(std::move(j));
  }
  const auto in_batches = [&](const DecodeOptions& options) {
    Outcome all;
    for (size_t b = 0; b < jobs.size(); b += 16) {
      const std::vector<Job> some(jobs.begin() + static_cast<std::ptrdiff_t>(b),
                                  jobs.begin() + static_cast<std::ptrdiff_t>(b + 16));
      Outcome r = decode_all(*engine, some, options, false);
      all.tokens.merge(r.tokens);
      all.speculation.drafted += r.speculation.drafted;
      all.speculation.accepted += r.speculation.accepted;
    }
    return all;
  };
  const Outcome plain = in_batches({});
  const Outcome mtp = in_batches({.speculative_tokens = 3, .adaptive_speculation = false});
  ContinuationDrafter drafter(plain.tokens, 0.8, 11);
  const Outcome right =
      in_batches({.speculative_tokens = 3, .adaptive_speculation = false, .drafter = &drafter});
  const Outcome again = in_batches({.speculative_tokens = 3, .adaptive_speculation = false});
  EXPECT_EQ(mtp.tokens, plain.tokens);
  EXPECT_EQ(right.tokens, plain.tokens);
  EXPECT_EQ(again.tokens, mtp.tokens);
  // Per position: the empirical distribution over the seeds, with and without drafts.
  double worst = 0.0;
  for (int64_t p = 0; p < kTokens; ++p) {
    std::map<int32_t, double> diff;
    for (const auto* run : {&plain, &mtp}) {
      const double sign = run == &plain ? 1.0 : -1.0;
      for (const auto& [id, tokens] : run->tokens) {
        if (static_cast<int64_t>(tokens.size()) > p)
          diff[tokens[static_cast<size_t>(p)]] += sign / kSeeds;
      }
    }
    double tv = 0.0;
    for (const auto& [token, d] : diff)
      tv += std::abs(d) / 2;
    worst = std::max(worst, tv);
  }
  EXPECT_LT(worst, 0.01);
  std::cout << "[ figures  ] " << kSeeds << " seeds x " << kTokens
            << " tokens: worst per-position total variation " << worst << "; MTP accepted "
            << mtp.speculation.accepted << " of " << mtp.speculation.drafted << ", the 80% drafter "
            << right.speculation.accepted << " of " << right.speculation.drafted << "\n";
}

// The token limit can fall inside a run of accepted drafts, and EOS too: the request ends there
// with exactly the tokens it would have had.
TEST(Speculation, LimitsInsideAcceptedDraftsEndTheRequestThere) {
  auto engine = drafting_engine(model::testing_support::tiny_model_shared());
  std::vector<Job> jobs;
  for (uint64_t i = 0; i < 6; ++i)
    jobs.push_back(
        {i, prompt_of(10 + static_cast<int64_t>(i), 30 + i), {}, 5 + static_cast<int64_t>(i)});
  const Outcome plain = decode_all(*engine, jobs, {}, false);
  ContinuationDrafter drafter(plain.tokens, 1.0, 1);
  const Outcome run = decode_all(
      *engine, jobs, {.speculative_tokens = 4, .adaptive_speculation = false, .drafter = &drafter},
      false);
  EXPECT_EQ(run.tokens, plain.tokens);
}

// The control, on synthetic figures: nothing accepted and verify rows that cost -> k = 0 all but
// a handful of probes (each useless probe waits twice as long for the next); most accepted and
// cheap rows -> the most drafts; fixed k when not adaptive.
TEST(SpeculationControl, PicksTheDraftCountWithTheMostTokensPerSecond) {
  const auto share_of = [](double acceptance, double row_cost, int64_t batch, int64_t want) {
    SpeculationControl control(3, true);
    int64_t hits = 0;
    constexpr int kSteps = 640;
    for (int s = 0; s < kSteps; ++s) {
      const int64_t k = control.choose(batch);
      // Per request, per step: the drafts accepted in a row at this acceptance, exactly in
      // expectation (every request of the step at once).
      int64_t accepted = 0;
      double p = 1.0;
      for (int64_t i = 0; i < k; ++i) {
        p *= acceptance;
        if (p >= 0.5) ++accepted;
      }
      for (int64_t r = 0; r < batch; ++r)
        control.record_verify(k, accepted);
      control.record_step(batch, k, static_cast<double>(batch) * (1.0 + row_cost * k),
                          batch * (accepted + 1));
      hits += k == want;
    }
    return static_cast<double>(hits) / kSteps;
  };
  EXPECT_GT(share_of(0.0, 0.5, 32, 0), 0.98);
  EXPECT_GT(share_of(0.95, 0.05, 1, 3), 0.9);
  SpeculationControl fixed(2, false);
  EXPECT_EQ(fixed.choose(8), 2);
  SpeculationControl off(0, true);
  EXPECT_EQ(off.choose(8), 0);
}

}  // namespace
}  // namespace dserve::decode

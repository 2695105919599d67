// MixedStepEngine: a decode session's and a prefill session's steps posted together run as one
// step of the engine, decode rows whole and prefill rows up to the step budget (split where
// they do not fit), and every logit is bit for bit what each request gives run alone; a row
// one poster got wrong fails that poster only; sessions see only their own requests, and a
// hand-off between them continues bit for bit.

#include "dserve/model/mixed_step_engine.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <random>
#include <thread>

#include "test_model.h"

namespace dserve::model {
namespace {

using testing_support::tiny_model_shared;

std::unique_ptr<Engine> cpu_engine() {
  auto made = make_engine(tiny_model_shared(), EngineOptions{});
  EXPECT_TRUE(made.is_ok()) << made.status().to_string();
  return std::move(made).value();
}

std::vector<int32_t> random_tokens(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  const auto vocab = static_cast<int32_t>(tiny_model_shared()->config().vocab_size);
  std::uniform_int_distribution<int32_t> dist(0, vocab - 1);
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (int32_t& t : out)
    t = dist(rng);
  return out;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() &&
         std::memcmp(a.data(), b.data(), static_cast<size_t>(a.numel()) * sizeof(float)) == 0;
}

// Each step's logits of one request run alone: the steps' token spans in order.
std::vector<Tensor> alone(Engine& engine, const std::vector<std::vector<int32_t>>& steps,
                          LogitsFor which) {
  auto request = engine.new_request();
  EXPECT_TRUE(request.is_ok());
  std::vector<Tensor> out;
  for (const auto& tokens : steps) {
    const StepRows rows{request->get(), tokens, which};
    auto logits = engine.step({&rows, 1});
    EXPECT_TRUE(logits.is_ok()) << logits.status().to_string();
    out.push_back(std::move((*logits)[0]));
  }
  return out;
}

// Waits until the mixer holds `posts` posts not yet run (the prefill poster leading a step and
// waiting for the decode session, which took part in the step before).
void wait_for_posts(const MixedStepEngine& mixer, int64_t posts) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (mixer.stats().waiting_posts < posts && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_GE(mixer.stats().waiting_posts, posts);
}

TEST(MixedStepEngine, DecodeAndPrefillRunAsOneStepWithTheLogitsOfEachAlone) {
  auto reference = cpu_engine();
  const auto decode_prompt = random_tokens(5, 1);
  const auto decode_tokens = random_tokens(8, 2);
  const auto long_prompt = random_tokens(40, 3);
  const auto short_prompt = random_tokens(12, 4);
  std::vector<std::vector<int32_t>> decode_steps = {decode_prompt};
  for (int32_t t : decode_tokens)
    decode_steps.push_back({t});
  const auto want_decode = alone(*reference, decode_steps, LogitsFor::kLastToken);
  const auto want_long = alone(*reference, {long_prompt}, LogitsFor::kLastToken);
  const auto want_short = alone(*reference, {short_prompt}, LogitsFor::kAllTokens);

  MixedStepOptions options;
  options.max_step_tokens = 16;
  options.mix_wait = std::chrono::seconds(2);  // ample: the test makes the other post at once
  MixedStepEngine mixer(cpu_engine(), options);
  auto decode = mixer.session(StepPriority::kDecode);
  auto prefill = mixer.session(StepPriority::kPrefill);
  auto d = decode->new_request();
  auto p1 = prefill->new_request();
  auto p2 = prefill->new_request();
  ASSERT_TRUE(d.is_ok() && p1.is_ok() && p2.is_ok());

  // The decode session's prompt runs alone: it took part in the last step.
  std::vector<Tensor> got_decode;
  const StepRows first{d->get(), decode_prompt, LogitsFor::kLastToken};
  auto logits = decode->step({&first, 1});
  ASSERT_TRUE(logits.is_ok()) << logits.status().to_string();
  got_decode.push_back(std::move((*logits)[0]));

  // The prefill post (52 rows) waits for the decode session's next step, then fills each step
  // to 16 rows next to the decode row; the decode session keeps stepping as a worker does.
  Result<std::vector<Tensor>> got_prefill = std::vector<Tensor>{};
  std::thread prefill_thread([&] {
    const StepRows rows[] = {{p1->get(), long_prompt, LogitsFor::kLastToken},
                             {p2->get(), short_prompt, LogitsFor::kAllTokens}};
    got_prefill = prefill->step(rows);
  });
  wait_for_posts(mixer, 1);
  for (int32_t t : decode_tokens) {
    const std::vector<int32_t> token = {t};
    const StepRows row{d->get(), token, LogitsFor::kLastToken};
    auto next = decode->step({&row, 1});
    ASSERT_TRUE(next.is_ok()) << next.status().to_string();
    got_decode.push_back(std::move((*next)[0]));
  }
  prefill_thread.join();

  ASSERT_TRUE(got_prefill.is_ok()) << got_prefill.status().to_string();
  ASSERT_EQ(got_decode.size(), want_decode.size());
  for (size_t i = 0; i < want_decode.size(); ++i)
    EXPECT_TRUE(same_bits(got_decode[i], want_decode[i])) << "decode step " << i;
  ASSERT_EQ(got_prefill->size(), 2u);
  EXPECT_TRUE(same_bits((*got_prefill)[0], want_long[0]));
  EXPECT_TRUE(same_bits((*got_prefill)[1], want_short[0]));  // all 12 rows, in order
  const MixedStepStats stats = mixer.stats();
  EXPECT_GE(stats.mixed_steps, 1);
  EXPECT_GE(stats.split_chunks, 1);
  EXPECT_EQ(stats.largest_step, options.max_step_tokens);  // 1 decode row + 15 prefill rows
  EXPECT_EQ(stats.waiting_posts, 0);
  std::printf("steps %lld, mixed %lld, chunks split %lld\n", static_cast<long long>(stats.steps),
              static_cast<long long>(stats.mixed_steps),
              static_cast<long long>(stats.split_chunks));
}

TEST(MixedStepEngine, ABadRowFailsOnlyThePosterThatSentIt) {
  auto reference = cpu_engine();
  const auto prompt = random_tokens(6, 5);
  const auto tokens = random_tokens(2, 6);
  const auto want = alone(*reference, {prompt, {tokens[0]}, {tokens[1]}}, LogitsFor::kLastToken);

  MixedStepOptions options;
  options.mix_wait = std::chrono::seconds(2);  // ample: the test makes the other post at once
  MixedStepEngine mixer(cpu_engine(), options);
  auto decode = mixer.session(StepPriority::kDecode);
  auto prefill = mixer.session(StepPriority::kPrefill);
  auto d = decode->new_request();
  auto p = prefill->new_request();
  ASSERT_TRUE(d.is_ok() && p.is_ok());
  const StepRows first{d->get(), prompt, LogitsFor::kLastToken};
  auto got0 = decode->step({&first, 1});
  ASSERT_TRUE(got0.is_ok());

  const auto vocab = static_cast<int32_t>(tiny_model_shared()->config().vocab_size);
  const std::vector<int32_t> bad = {1, 2, vocab};  // past the vocabulary
  Result<std::vector<Tensor>> got_bad = std::vector<Tensor>{};
  std::thread prefill_thread([&] {
    const StepRows row{p->get(), bad, LogitsFor::kLastToken};
    got_bad = prefill->step({&row, 1});
  });
  wait_for_posts(mixer, 1);
  const std::vector<int32_t> t1 = {tokens[0]};
  const StepRows second{d->get(), t1, LogitsFor::kLastToken};
  auto got1 = decode->step({&second, 1});
  prefill_thread.join();

  EXPECT_EQ(got_bad.status().code(), StatusCode::kOutOfRange) << got_bad.status().to_string();
  EXPECT_EQ(p->get()->position(), 0);  // nothing of the bad post ran
  ASSERT_TRUE(got1.is_ok()) << got1.status().to_string();
  EXPECT_TRUE(same_bits((*got0)[0], want[0]));
  EXPECT_TRUE(same_bits((*got1)[0], want[1]));
  EXPECT_EQ(mixer.stats().rerun_steps, 1);
  // the decode request goes on as if nothing happened
  const std::vector<int32_t> t2 = {tokens[1]};
  const StepRows third{d->get(), t2, LogitsFor::kLastToken};
  auto got2 = decode->step({&third, 1});
  ASSERT_TRUE(got2.is_ok());
  EXPECT_TRUE(same_bits((*got2)[0], want[2]));
}

TEST(MixedStepEngine, SessionsTouchOnlyTheirOwnRequestsAndHandOffBitForBit) {
  auto reference = cpu_engine();
  const auto prompt = random_tokens(30, 7);
  const auto tokens = random_tokens(3, 8);
  const auto want =
      alone(*reference, {prompt, {tokens[0]}, {tokens[1]}, {tokens[2]}}, LogitsFor::kLastToken);

  MixedStepEngine mixer(cpu_engine(), MixedStepOptions{});
  auto decode = mixer.session(StepPriority::kDecode);
  auto prefill = mixer.session(StepPriority::kPrefill);
  auto p = prefill->new_request();
  ASSERT_TRUE(p.is_ok());
  const StepRows rows{p->get(), prompt, LogitsFor::kLastToken};
  auto got = prefill->step({&rows, 1});
  ASSERT_TRUE(got.is_ok());
  EXPECT_TRUE(same_bits((*got)[0], want[0]));

  // the decode session may not step, export or release the prefill session's request
  const std::vector<int32_t> t0 = {tokens[0]};
  const StepRows foreign{p->get(), t0, LogitsFor::kLastToken};
  EXPECT_EQ(decode->step({&foreign, 1}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(decode->export_state(**p).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(p->get()->position(), 30);

  // the hand-off: packed by the prefill session, unpacked by the decode session
  auto bytes = pack_request(*prefill, **p);
  ASSERT_TRUE(bytes.is_ok()) << bytes.status().to_string();
  p->reset();
  auto d = unpack_request(*decode, *bytes);
  ASSERT_TRUE(d.is_ok()) << d.status().to_string();
  EXPECT_EQ(d->get()->position(), 30);
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::vector<int32_t> t = {tokens[i]};
    const StepRows row{d->get(), t, LogitsFor::kLastToken};
    auto next = decode->step({&row, 1});
    ASSERT_TRUE(next.is_ok());
    EXPECT_TRUE(same_bits((*next)[0], want[i + 1])) << "token " << i;
  }
}

// Two threads as the two workers of a co-located process: the decode session steps its
// requests token by token while the prefill session runs prompts in chunks; every logit is the
// request's alone, whatever the steps mixed.
TEST(MixedStepEngine, WorkersOnTwoThreadsGetTheLogitsOfEachRequestAlone) {
  auto reference = cpu_engine();
  constexpr int kDecodeRequests = 4, kDecodeSteps = 24, kPrefillRequests = 6;
  std::vector<std::vector<std::vector<int32_t>>> decode_steps(kDecodeRequests);
  std::vector<std::vector<Tensor>> decode_want(kDecodeRequests);
  for (int r = 0; r < kDecodeRequests; ++r) {
    decode_steps[r].push_back(random_tokens(3 + r, 100 + static_cast<uint32_t>(r)));
    for (int32_t t : random_tokens(kDecodeSteps, 200 + static_cast<uint32_t>(r)))
      decode_steps[r].push_back({t});
    decode_want[r] = alone(*reference, decode_steps[r], LogitsFor::kLastToken);
  }
  std::vector<std::vector<int32_t>> prompts(kPrefillRequests);
  std::vector<Tensor> prefill_want(kPrefillRequests);
  for (int r = 0; r < kPrefillRequests; ++r) {
    prompts[r] = random_tokens(20 + 17 * r, 300 + static_cast<uint32_t>(r));
    prefill_want[r] = alone(*reference, {prompts[r]}, LogitsFor::kLastToken)[0];
  }

  MixedStepOptions options;
  options.max_step_tokens = 24;
  MixedStepEngine mixer(cpu_engine(), options);
  auto decode = mixer.session(StepPriority::kDecode);
  auto prefill = mixer.session(StepPriority::kPrefill);

  std::vector<std::vector<Tensor>> decode_got(kDecodeRequests);
  std::thread decode_thread([&] {
    std::vector<RequestHandle> requests;
    for (int r = 0; r < kDecodeRequests; ++r)
      requests.push_back(std::move(decode->new_request()).value());
    for (int s = 0; s <= kDecodeSteps; ++s) {
      std::vector<StepRows> rows;
      for (int r = 0; r < kDecodeRequests; ++r)
        rows.push_back({requests[r].get(), decode_steps[r][s], LogitsFor::kLastToken});
      auto logits = decode->step(rows);
      ASSERT_TRUE(logits.is_ok()) << logits.status().to_string();
      for (int r = 0; r < kDecodeRequests; ++r)
        decode_got[r].push_back(std::move((*logits)[r]));
    }
  });
  std::vector<Tensor> prefill_got(kPrefillRequests);
  std::thread prefill_thread([&] {
    // two prompts per post, in chunks of at most 32 rows
    for (int r = 0; r < kPrefillRequests; r += 2) {
      RequestHandle a = std::move(prefill->new_request()).value();
      RequestHandle b = std::move(prefill->new_request()).value();
      for (size_t at = 0; at < prompts[r + 1].size(); at += 32) {
        std::vector<StepRows> rows;
        std::vector<int64_t> which;
        for (int k = 0; k < 2; ++k) {
          const auto& prompt = prompts[r + k];
          if (at >= prompt.size()) continue;
          const size_t n = std::min<size_t>(32, prompt.size() - at);
          rows.push_back({(k == 0 ? a : b).get(), std::span<const int32_t>(prompt).subspan(at, n),
                          LogitsFor::kLastToken});
          which.push_back(r + k);
        }
        auto logits = prefill->step(rows);
        ASSERT_TRUE(logits.is_ok()) << logits.status().to_string();
        for (size_t i = 0; i < which.size(); ++i)
          prefill_got[which[i]] = std::move((*logits)[i]);
      }
    }
  });
  decode_thread.join();
  prefill_thread.join();

  for (int r = 0; r < kDecodeRequests; ++r) {
    ASSERT_EQ(decode_got[r].size(), decode_want[r].size());
    for (size_t s = 0; s < decode_want[r].size(); ++s)
      EXPECT_TRUE(same_bits(decode_got[r][s], decode_want[r][s])) << r << " step " << s;
  }
  for (int r = 0; r < kPrefillRequests; ++r)
    EXPECT_TRUE(same_bits(prefill_got[r], prefill_want[r])) << "prompt " << r;
  const MixedStepStats stats = mixer.stats();
  std::printf("steps %lld, mixed %lld, chunks split %lld, largest %lld rows\n",
              static_cast<long long>(stats.steps), static_cast<long long>(stats.mixed_steps),
              static_cast<long long>(stats.split_chunks),
              static_cast<long long>(stats.largest_step));
}

}  // namespace
}  // namespace dserve::model

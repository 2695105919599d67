// The engine's batch invariance on the CPU: every row of random mixed steps (1 to 64 requests,
// prefill chunks of 1 to 512 tokens next to decode rows and multi-row verify chunks, the rows
// shuffled, requests joining and leaving between steps) has the logits, bit for bit, of the
// same request run alone the way `dserve generate` runs it (prompt in chunks of 512, then one
// token per step). Three model widths: the tiny and small presets, and the v4-width preset's
// widths (hidden 4096, 64 heads of 512, index top-k 512) with a 4,096-row vocabulary so that
// CI can hold it. Also: a hand-off through pack_request/unpack_request continues bit for bit,
// and the CUDA device is refused with the probe's reason where there is none.

#include "dserve/model/engine.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>

#include "dserve/core/random.h"
#include "dserve/kernels/device.h"
#include "dserve/model/checkpoint.h"
#include "dserve/model/model_init.h"
#include "dserve/model/sampler.h"
#include "test_model.h"

namespace dserve::model {
namespace {

// A row's logits, reduced to 64 bits for bit-exact comparison without keeping every row.
uint64_t row_digest(const float* row, int64_t n) {
  uint64_t h = 0x9e3779b97f4a7c15ull;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits = 0;
    std::memcpy(&bits, row + i, sizeof(bits));
    h = (h ^ bits) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  return h;
}

std::shared_ptr<const Model> load(const std::string& preset, int64_t vocab_size,
                                  kvstore::KvDtype kv_dtype = kvstore::KvDtype::kFp32) {
  if (preset == "tiny") return testing_support::tiny_model_shared(kv_dtype);
  return testing_support::generated_model(preset, vocab_size, kv_dtype);
}

struct Plan {
  int64_t requests = 0;    // in the whole run
  int64_t max_prompt = 0;  // tokens
  int64_t max_output = 0;  // decode rows after the prompt
  int64_t max_chunk = 0;   // prefill rows of one request in one step
  int64_t max_step_rows = 0;
};

struct Request {
  std::vector<int32_t> tokens;  // prompt, then the tokens fed back one per decode step
  int64_t prompt = 0;
  int64_t start_step = 0;
  std::vector<uint64_t> want;  // digest of each position's logits, run alone
  RequestHandle handle;
  bool done = false;
};

// What `dserve generate` computes for one request: its prompt in chunks of 512, then one
// token per step; every position's logits (all rows are asked for: a row's logits do not
// depend on which others are returned).
std::vector<uint64_t> alone(Engine& engine, const Request& r) {
  auto handle = engine.new_request();
  EXPECT_TRUE(handle.is_ok());
  const int64_t vocab = engine.config().vocab_size;
  std::vector<uint64_t> digests;
  const auto n = static_cast<int64_t>(r.tokens.size());
  for (int64_t begin = 0; begin < n;) {
    const int64_t len = begin < r.prompt ? std::min<int64_t>(512, r.prompt - begin) : 1;
    const StepRows rows{
        handle->get(),
        std::span(r.tokens).subspan(static_cast<size_t>(begin), static_cast<size_t>(len)),
        LogitsFor::kAllTokens};
    auto logits = engine.step(std::span(&rows, 1));
    EXPECT_TRUE(logits.is_ok()) << logits.status().to_string();
    if (!logits.is_ok()) return digests;
    for (int64_t i = 0; i < len; ++i)
      digests.push_back(row_digest(logits->front().row(i), vocab));
    begin += len;
  }
  return digests;
}

// Runs `plan` as random mixed steps and checks every row returned against the request alone.
void check_mixed_steps(Engine& engine, const Plan& plan, uint64_t seed) {
  SplitMix64 rng(seed);
  const int64_t vocab = engine.config().vocab_size;
  std::vector<Request> requests(static_cast<size_t>(plan.requests));
  for (Request& r : requests) {
    r.prompt = 1 + static_cast<int64_t>(rng.below(static_cast<uint64_t>(plan.max_prompt)));
    const int64_t output = static_cast<int64_t>(rng.below(static_cast<uint64_t>(plan.max_output)));
    for (int64_t i = 0; i < r.prompt + output; ++i)
      r.tokens.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
    r.start_step = static_cast<int64_t>(rng.below(6));
    r.want = alone(engine, r);
    ASSERT_EQ(static_cast<int64_t>(r.want.size()), r.prompt + output);
  }
  int64_t rows_checked = 0, steps = 0, largest_step = 0, most_requests = 0;
  for (int64_t step = 0;; ++step) {
    // The requests in this step: a random share of those started and not done, shuffled.
    std::vector<size_t> live;
    bool pending = false;
    for (size_t i = 0; i < requests.size(); ++i) {
      Request& r = requests[i];
      if (r.done) continue;
      pending = true;
      if (step < r.start_step) continue;
      if (r.handle == nullptr) {
        auto made = engine.new_request();
        ASSERT_TRUE(made.is_ok());
        r.handle = std::move(made).value();
      }
      if (rng.below(4) != 0) live.push_back(i);
    }
    if (!pending) break;
    for (size_t k = live.size(); k > 1; --k)
      std::swap(live[k - 1], live[rng.below(k)]);
    if (live.size() > 64) live.resize(64);
    std::vector<StepRows> rows;
    std::vector<size_t> owner;
    int64_t step_rows = 0;
    // Every third step keeps prefill chunks short, so that many requests fit in one.
    const int64_t chunk_cap = rng.below(3) == 0 ? 4 : plan.max_chunk;
    for (const size_t i : live) {
      Request& r = requests[i];
      const int64_t pos = r.handle->position();
      const int64_t left = static_cast<int64_t>(r.tokens.size()) - pos;
      int64_t len = 1;
      if (pos < r.prompt) {
        len = 1 + static_cast<int64_t>(
                      rng.below(static_cast<uint64_t>(std::min(chunk_cap, r.prompt - pos))));
      } else if (rng.below(5) == 0) {
        len = std::min<int64_t>(left, 1 + static_cast<int64_t>(rng.below(3)));  // verify rows
      }
      if (step_rows + len > plan.max_step_rows) continue;
      step_rows += len;
      // Every row's logits for short chunks, the last one's otherwise (memory stays bounded).
      const LogitsFor which =
          len <= 4 && rng.below(2) == 0 ? LogitsFor::kAllTokens : LogitsFor::kLastToken;
      rows.push_back(
          {r.handle.get(),
           std::span(r.tokens).subspan(static_cast<size_t>(pos), static_cast<size_t>(len)), which});
      owner.push_back(i);
    }
    if (rows.empty()) continue;
    std::vector<int64_t> first(rows.size());
    for (size_t j = 0; j < rows.size(); ++j)
      first[j] = rows[j].request->position();
    auto logits = engine.step(rows);
    ASSERT_TRUE(logits.is_ok()) << logits.status().to_string();
    ++steps;
    largest_step = std::max(largest_step, step_rows);
    most_requests = std::max(most_requests, static_cast<int64_t>(rows.size()));
    for (size_t j = 0; j < rows.size(); ++j) {
      const Request& r = requests[owner[j]];
      const auto len = static_cast<int64_t>(rows[j].tokens.size());
      const Tensor& got = (*logits)[j];
      const int64_t from = rows[j].which == LogitsFor::kAllTokens ? first[j] : first[j] + len - 1;
      ASSERT_EQ(got.rows(), first[j] + len - from);
      for (int64_t p = from; p < first[j] + len; ++p) {
        ASSERT_EQ(row_digest(got.row(p - from), vocab), r.want[static_cast<size_t>(p)])
            << "request " << owner[j] << " position " << p << " (rows " << first[j] << ".."
            << first[j] + len - 1 << ", " << rows.size() << " requests in the step)";
        ++rows_checked;
      }
    }
    for (const size_t i : owner) {
      Request& r = requests[i];
      if (r.handle->position() == static_cast<int64_t>(r.tokens.size())) {
        r.handle.reset();  // leaves: its pages go back before the next step
        r.done = true;
      }
    }
  }
  std::cout << "[ figures  ] " << steps << " mixed steps, up to " << most_requests
            << " requests and " << largest_step << " rows per step; " << rows_checked
            << " rows bit-identical to their request alone\n";
}

TEST(Engine, MixedStepsOnTheTinyPresetAreBitIdenticalToEachRequestAlone) {
  auto engine = make_engine(testing_support::tiny_model_shared(), {});
  ASSERT_TRUE(engine.is_ok());
  check_mixed_steps(**engine,
                    {.requests = 72,
                     .max_prompt = 700,
                     .max_output = 24,
                     .max_chunk = 512,
                     .max_step_rows = 1536},
                    1);
}

TEST(Engine, MixedStepsOnTheSmallPresetAreBitIdenticalToEachRequestAlone) {
  auto model = load("small", 0);
  ASSERT_NE(model, nullptr);
  auto engine = make_engine(model, {});
  ASSERT_TRUE(engine.is_ok());
  check_mixed_steps(
      **engine,
      {.requests = 66, .max_prompt = 600, .max_output = 6, .max_chunk = 512, .max_step_rows = 1024},
      2);
}

TEST(Engine, MixedStepsAtV4WidthsAreBitIdenticalToEachRequestAlone) {
  auto model = load("v4-width", 4096);
  ASSERT_NE(model, nullptr);
  auto engine = make_engine(model, {});
  ASSERT_TRUE(engine.is_ok());
  check_mixed_steps(
      **engine,
      {.requests = 5, .max_prompt = 40, .max_output = 4, .max_chunk = 40, .max_step_rows = 96}, 3);
}

// With fp8 KV (V4's served entries and fp4 indexer keys on the pages, the window rounded to
// the entry's values) the forward is as batch-invariant as in fp32: the same mixed steps.
TEST(Engine, MixedStepsWithFp8KvOnTheTinyPresetAreBitIdenticalToEachRequestAlone) {
  auto engine = make_engine(testing_support::tiny_model_shared(kvstore::KvDtype::kFp8), {});
  ASSERT_TRUE(engine.is_ok());
  check_mixed_steps(**engine,
                    {.requests = 40,
                     .max_prompt = 700,
                     .max_output = 16,
                     .max_chunk = 512,
                     .max_step_rows = 1536},
                    4);
}

TEST(Engine, MixedStepsWithFp8KvAtV4WidthsAreBitIdenticalToEachRequestAlone) {
  auto model = load("v4-width", 4096, kvstore::KvDtype::kFp8);
  ASSERT_NE(model, nullptr);
  EXPECT_EQ(model->page_pools().compressed[2]->row_bytes(), 584);  // V4's served fp8 entry
  auto engine = make_engine(model, {});
  ASSERT_TRUE(engine.is_ok());
  check_mixed_steps(
      **engine,
      {.requests = 5, .max_prompt = 40, .max_output = 4, .max_chunk = 40, .max_step_rows = 96}, 5);
}

// A request handed to another engine (the prefill worker's pack, the decode worker's unpack)
// goes on with the logits it would have had, in either KV dtype.
class EngineHandOff : public ::testing::TestWithParam<kvstore::KvDtype> {};
INSTANTIATE_TEST_SUITE_P(KvDtypes, EngineHandOff, ::testing::ValuesIn(testing_support::kKvDtypes),
                         testing_support::kv_dtype_param_name);

TEST_P(EngineHandOff, AHandOffContinuesBitForBit) {
  Engine& engine = testing_support::tiny_engine(GetParam());
  auto other = make_engine(testing_support::tiny_model_shared(GetParam()), {});
  ASSERT_TRUE(other.is_ok());
  SplitMix64 rng(9);
  std::vector<int32_t> tokens;
  for (int i = 0; i < 300; ++i)
    tokens.push_back(static_cast<int32_t>(rng.below(1000)));
  auto stay = engine.new_request();
  auto moved = engine.new_request();
  ASSERT_TRUE(stay.is_ok() && moved.is_ok());
  const auto prompt = std::span(tokens).first(290);
  for (RequestHandle* h : {&*stay, &*moved}) {
    const StepRows rows{h->get(), prompt, LogitsFor::kLastToken};
    ASSERT_TRUE(engine.step(std::span(&rows, 1)).is_ok());
  }
  auto packed = pack_request(engine, **moved);
  ASSERT_TRUE(packed.is_ok());
  auto arrived = unpack_request(**other, *packed);
  ASSERT_TRUE(arrived.is_ok()) << arrived.status().to_string();
  EXPECT_EQ((*arrived)->position(), 290);
  const StepRows a{stay->get(), std::span(tokens).subspan(290), LogitsFor::kAllTokens};
  const StepRows b{arrived->get(), std::span(tokens).subspan(290), LogitsFor::kAllTokens};
  auto want = engine.step(std::span(&a, 1));
  auto got = (*other)->step(std::span(&b, 1));
  ASSERT_TRUE(want.is_ok() && got.is_ok());
  EXPECT_EQ(std::memcmp(want->front().data(), got->front().data(),
                        static_cast<size_t>(want->front().numel()) * sizeof(float)),
            0);
  // Garbage is refused, naming what did not match.
  (*packed)[40] ^= 0x5a;
  EXPECT_EQ(unpack_request(**other, *packed).status().code(), StatusCode::kDataLoss);
}

TEST(Engine, RefusesBadStepsWithoutMovingAnyRequest) {
  Engine& engine = testing_support::tiny_engine();
  auto a = engine.new_request();
  auto b = engine.new_request();
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  const int32_t good[2] = {5, 6};
  const int32_t bad[1] = {static_cast<int32_t>(engine.config().vocab_size)};
  const StepRows rows[2] = {{a->get(), good, LogitsFor::kLastToken},
                            {b->get(), bad, LogitsFor::kLastToken}};
  const auto r = engine.step(rows);
  EXPECT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("request 1"), std::string::npos) << r.status().to_string();
  EXPECT_EQ((*a)->position(), 0);
  EXPECT_EQ((*b)->position(), 0);
}

TEST(Engine, DeviceNames) {
  EXPECT_EQ(parse_device("cpu")->name(), "cpu");
  EXPECT_EQ(parse_device("cuda")->name(), "cuda:0");
  EXPECT_EQ(parse_device("cuda:3")->index, 3);
  for (const char* bad : {"gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:256", "CPU", "cuda:1 "}) {
    const auto d = parse_device(bad);
    EXPECT_EQ(d.status().code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(d.status().message().find("expected cpu, cuda or cuda:N"), std::string::npos);
  }
}

// Where this build or machine has no usable GPU, asking for one fails with the probe's reason;
// with one (the device check), the CUDA engine's mixed steps match the CPU's greedy choices.
TEST(Engine, CudaEngineIsRefusedWithTheReasonOrMatchesTheCpu) {
  EngineOptions options;
  options.device = {Device::Kind::kCuda, 0};
  options.max_positions = 1024;
  options.max_requests = 8;
  options.max_step_tokens = 512;
  auto engine = make_engine(testing_support::tiny_model_shared(), options);
  const kernels::DeviceInfo probe = kernels::probe_cuda_device(0);
  if (!probe.available) {
    ASSERT_FALSE(engine.is_ok());
    EXPECT_EQ(engine.status().code(), StatusCode::kUnavailable);
    EXPECT_NE(engine.status().message().find(probe.why_unavailable), std::string::npos)
        << engine.status().to_string();
    GTEST_SKIP() << "no GPU: " << probe.why_unavailable;
  }
  ASSERT_TRUE(engine.is_ok()) << engine.status().to_string();
  Engine& gpu = **engine;
  Engine& cpu = testing_support::tiny_engine();
  SplitMix64 rng(21);
  // Four requests: two prefill chunks and two decode rows in each mixed step.
  std::vector<std::vector<int32_t>> tokens(4);
  for (auto& t : tokens) {
    for (int i = 0; i < 200; ++i)
      t.push_back(static_cast<int32_t>(rng.below(1000)));
  }
  std::vector<RequestHandle> on_gpu, on_cpu;
  for (size_t i = 0; i < tokens.size(); ++i) {
    on_gpu.push_back(std::move(gpu.new_request()).value());
    on_cpu.push_back(std::move(cpu.new_request()).value());
  }
  int agree = 0, total = 0;
  for (int64_t pos = 0; pos < 200;) {
    const int64_t len = pos == 0 ? 150 : 1;
    std::vector<StepRows> g, c;
    for (size_t i = 0; i < tokens.size(); ++i) {
      const auto chunk =
          std::span(tokens[i]).subspan(static_cast<size_t>(pos), static_cast<size_t>(len));
      g.push_back({on_gpu[i].get(), chunk, LogitsFor::kLastToken});
      c.push_back({on_cpu[i].get(), chunk, LogitsFor::kLastToken});
    }
    auto gl = gpu.step(g);
    auto cl = cpu.step(c);
    ASSERT_TRUE(gl.is_ok()) << gl.status().to_string();
    ASSERT_TRUE(cl.is_ok());
    for (size_t i = 0; i < tokens.size(); ++i) {
      agree += argmax((*gl)[i].span()) == argmax((*cl)[i].span());
      ++total;
    }
    pos += len;
  }
  EXPECT_GE(agree * 10, total * 9) << agree << " of " << total << " greedy choices agree";
  // A GPU request's state exported to the host continues on the CPU engine.
  auto state = gpu.export_state(*on_gpu[0]);
  ASSERT_TRUE(state.is_ok()) << state.status().to_string();
  EXPECT_EQ(state->position(), 200);
  auto back = gpu.import_state(std::move(state).value());
  ASSERT_TRUE(back.is_ok()) << back.status().to_string();
  EXPECT_EQ((*back)->position(), 200);
  std::cout << "[ figures  ] cuda engine: " << agree << " of " << total
            << " greedy choices equal the CPU's\n";
}

}  // namespace
}  // namespace dserve::model

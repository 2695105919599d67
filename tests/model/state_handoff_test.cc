// The hand-off as pages (state_handoff.h): a request's small part and pages, put where
// handoff_spans says (here a memcpy per op, as InProcessTransport does) and received with one
// digest per span, continues bit for bit in either KV dtype at any position; a page that does
// not match its digest is refused by name before anything reads it.

#include "dserve/model/state_handoff.h"

#include <gtest/gtest.h>

#include <cstring>

#include "dserve/kvstore/transfer.h"
#include "dserve/model/model_init.h"
#include "test_model.h"

namespace dserve::model {
namespace {

using testing_support::prompt_of;
using testing_support::tiny_engine;

struct Landed {
  std::vector<std::byte> region;
  std::vector<kvstore::SpanDigest> digests;
};

// What a put of `source` leaves in a region of its size, and the run digests the sender sends.
Landed put(const ModelConfig& config, int64_t position, const HandoffSource& source) {
  Landed l;
  l.region.resize(source.bytes);
  for (const kvstore::PutOp& op : source.ops)
    std::memcpy(l.region.data() + op.remote_offset, op.local, op.bytes);
  auto runs = handoff_run_digests(config, position, kvstore::span_digests(source.ops));
  EXPECT_TRUE(runs.is_ok()) << runs.status().to_string();
  if (runs.is_ok()) l.digests = std::move(runs).value();
  return l;
}

std::vector<float> step(Engine& engine, EngineRequest& request, std::span<const int32_t> tokens) {
  const StepRows rows{&request, tokens, LogitsFor::kAllTokens};
  auto logits = engine.step(std::span(&rows, 1));
  EXPECT_TRUE(logits.is_ok()) << logits.status().to_string();
  if (!logits.is_ok()) return {};
  return {logits->front().data(), logits->front().data() + logits->front().numel()};
}

class StateHandoff : public ::testing::TestWithParam<kvstore::KvDtype> {};
INSTANTIATE_TEST_SUITE_P(KvDtypes, StateHandoff, ::testing::ValuesIn(testing_support::kKvDtypes),
                         testing_support::kv_dtype_param_name);

TEST_P(StateHandoff, ReceivedStateContinuesBitForBitAtAnyPosition) {
  Engine& engine = tiny_engine(GetParam());
  const auto ids = prompt_of(460, 7);
  // Inside and at the ends of windows and blocks, before any window closed, several blocks in.
  for (int64_t at : {1, 3, 4, 17, 128, 131, 256, 333, 420}) {
    auto sender = engine.new_request();
    ASSERT_TRUE(sender.is_ok());
    step(engine, **sender, std::span(ids).first(static_cast<size_t>(at)));
    auto source = handoff_source(engine, **sender);
    ASSERT_TRUE(source.is_ok()) << source.status().to_string();
    EXPECT_EQ(source->bytes, handoff_bytes(engine.config(), at));
    EXPECT_EQ(source->ops.size(), handoff_spans(engine.config(), at).size());
    const Landed landed = put(engine.config(), at, *source);
    auto receiver = receive_handoff(engine, landed.region, at, landed.digests);
    ASSERT_TRUE(receiver.is_ok()) << "at " << at << ": " << receiver.status().to_string();
    EXPECT_EQ((*receiver)->position(), at);
    const auto rest = std::span(ids).subspan(static_cast<size_t>(at), 40);
    const auto want = step(engine, **sender, rest);
    const auto got = step(engine, **receiver, rest);
    ASSERT_EQ(want.size(), got.size());
    EXPECT_EQ(std::memcmp(want.data(), got.data(), want.size() * sizeof(float)), 0) << "at " << at;
  }
}

TEST_P(StateHandoff, EveryCorruptSpanIsRefusedByName) {
  Engine& engine = tiny_engine(GetParam());
  const auto ids = prompt_of(300, 8);
  auto sender = engine.new_request();
  ASSERT_TRUE(sender.is_ok());
  step(engine, **sender, ids);
  auto source = handoff_source(engine, **sender);
  ASSERT_TRUE(source.is_ok());
  const Landed good = put(engine.config(), 300, *source);
  const auto spans = handoff_spans(engine.config(), 300);
  ASSERT_GT(spans.size(), 10u);
  for (size_t i = 0; i < spans.size(); i += 7) {
    Landed bad = good;
    bad.region[spans[i].offset + spans[i].bytes / 2] ^= std::byte{0x10};
    const auto r = receive_handoff(engine, bad.region, 300, bad.digests);
    ASSERT_EQ(r.status().code(), StatusCode::kDataLoss) << "span " << i;
    EXPECT_NE(r.status().message().find(i == 0 ? "small part" : "page"), std::string::npos)
        << r.status().message();
  }
  // A digest of the wrong run is refused too.
  Landed swapped = good;
  std::swap(swapped.digests.front().xxh3, swapped.digests.back().xxh3);
  EXPECT_EQ(receive_handoff(engine, swapped.region, 300, swapped.digests).status().code(),
            StatusCode::kDataLoss);
  // Digests that do not cover the spans, or a state of another position, are refused too.
  Landed short_list = good;
  short_list.digests.pop_back();
  EXPECT_EQ(receive_handoff(engine, short_list.region, 300, short_list.digests).status().code(),
            StatusCode::kDataLoss);
  EXPECT_EQ(receive_handoff(engine, good.region, 299, good.digests).status().code(),
            StatusCode::kDataLoss);
  // Nothing was appended anywhere: the pools hold only the sender's pages.
  EXPECT_TRUE(receive_handoff(engine, good.region, 300, good.digests).is_ok());
}

// The control message stays small at any context: one digest per run of pages, about 1,000 at
// most. V4-Flash's shapes (43 layers, 512-channel entries) in fp32, 32k and a million tokens.
TEST(StateHandoff, RunDigestsStaySmallAtAnyContext) {
  const ModelConfig c = v4_flash_state_config();
  for (const int64_t tokens : {int64_t{32768}, int64_t{1} << 20}) {
    const auto spans = handoff_spans(c, tokens);
    std::vector<kvstore::SpanDigest> per_span;
    for (const HandoffSpan& s : spans)
      per_span.push_back({s.offset, s.bytes, s.offset * 31});
    auto runs = handoff_run_digests(c, tokens, per_span);
    ASSERT_TRUE(runs.is_ok()) << runs.status().to_string();
    const uint64_t bytes = spans.back().offset + spans.back().bytes;
    std::fprintf(stderr,
                 "[ info ] V4-Flash widths, fp32, %lld tokens: %llu bytes, %zu spans, "
                 "%zu run digests (%zu bytes of digests)\n",
                 static_cast<long long>(tokens), static_cast<unsigned long long>(bytes),
                 spans.size(), runs->size(), runs->size() * sizeof(kvstore::SpanDigest));
    // actors::kMaxTransferKeysBytes (64 KiB) bounds the encoded digests of a HandoffDone.
    EXPECT_LT(runs->size() * 24 + 64, size_t{64} * 1024);
    EXPECT_LE(runs->size(), kHandoffMaxRuns + 2);
    EXPECT_LE(runs->size(), bytes / kHandoffRunBytes + 2);
  }
}

TEST(StateHandoff, Fp8MovesAThirdOfTheBytes) {
  const ModelConfig& fp32 = tiny_engine(kvstore::KvDtype::kFp32).config();
  const ModelConfig& fp8 = tiny_engine(kvstore::KvDtype::kFp8).config();
  for (int64_t at : {128, 1024, 4096}) {
    const uint64_t a = handoff_bytes(fp32, at), b = handoff_bytes(fp8, at);
    std::fprintf(stderr,
                 "[ info ] tiny preset, hand-off at %lld tokens: fp32 %llu bytes, fp8 %llu\n",
                 static_cast<long long>(at), static_cast<unsigned long long>(a),
                 static_cast<unsigned long long>(b));
    EXPECT_LT(b, a);
  }
  EXPECT_LT(2 * handoff_bytes(fp8, 4096), handoff_bytes(fp32, 4096));
}

}  // namespace
}  // namespace dserve::model

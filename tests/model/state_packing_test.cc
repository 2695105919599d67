// Packing a request's whole state for the prefill -> decode hand-off: at any position the
// unpacked state continues bit for bit; anything that is not a state of this model is refused.

#include "dserve/model/state_packing.h"

#include <gtest/gtest.h>

#include <cstring>

#include "dserve/core/random.h"
#include "test_model.h"

namespace dserve::model {
namespace {

std::vector<int32_t> tokens(int64_t n, uint64_t seed) {
  SplitMix64 rng(seed);
  std::vector<int32_t> ids;
  while (static_cast<int64_t>(ids.size()) < n)
    ids.push_back(static_cast<int32_t>(1 + rng.below(128000)));
  return ids;
}

class StatePackingDtype : public ::testing::TestWithParam<kvstore::KvDtype> {};
INSTANTIATE_TEST_SUITE_P(KvDtypes, StatePackingDtype,
                         ::testing::ValuesIn(testing_support::kKvDtypes),
                         testing_support::kv_dtype_param_name);

TEST_P(StatePackingDtype, UnpackedStateContinuesBitForBitAtAnyPosition) {
  const Model& m = testing_support::tiny_model(GetParam());
  const auto ids = tokens(420, 1);
  // Positions inside and at the ends of windows and blocks, and before any window closed.
  for (int64_t at : {1, 3, 4, 17, 128, 131, 256, 333}) {
    RequestState a = m.new_state();
    ASSERT_TRUE(m.forward(std::span(ids).first(static_cast<size_t>(at)), a).is_ok());
    const auto packed = pack_state(m.config(), a);
    auto b = unpack_state(m.config(), m.page_pools(), packed);
    ASSERT_TRUE(b.is_ok()) << "at " << at << ": " << b.status().to_string();
    EXPECT_EQ(b->position(), at);
    EXPECT_EQ(pack_state(m.config(), *b), packed) << "at " << at;
    const auto rest = std::span(ids).subspan(static_cast<size_t>(at), 40);
    const auto la = m.forward(rest, a);
    const auto lb = m.forward(rest, *b);
    ASSERT_TRUE(la.is_ok() && lb.is_ok());
    EXPECT_EQ(std::memcmp(la->data(), lb->data(), static_cast<size_t>(la->numel()) * sizeof(float)),
              0)
        << "at " << at;
  }
}

TEST_P(StatePackingDtype, PackedStateBytesIsTheExactSizeOfPackState) {
  const Model& m = testing_support::tiny_model(GetParam());
  const auto ids = tokens(300, 4);
  RequestState s = m.new_state();
  EXPECT_EQ(packed_state_bytes(m.config(), 0), pack_state(m.config(), s).size());
  // Grow one state through window and block ends, checking the size at every stop.
  int64_t at = 0;
  for (int64_t next : {1, 2, 3, 4, 5, 8, 17, 64, 127, 128, 129, 131, 200, 256, 257, 300}) {
    ASSERT_TRUE(
        m.forward(std::span(ids).subspan(static_cast<size_t>(at), static_cast<size_t>(next - at)),
                  s)
            .is_ok());
    at = next;
    EXPECT_EQ(packed_state_bytes(m.config(), at), pack_state(m.config(), s).size()) << "at " << at;
  }
}

TEST(StatePacking, RefusesCorruptTruncatedAndForeignStates) {
  const Model& m = testing_support::tiny_model();
  RequestState a = m.new_state();
  ASSERT_TRUE(m.forward(tokens(150, 2), a).is_ok());
  const auto packed = pack_state(m.config(), a);
  SplitMix64 rng(3);
  for (int i = 0; i < 200; ++i) {
    auto bad = packed;
    bad[rng.below(bad.size())] ^= static_cast<uint8_t>(1u << rng.below(8));
    EXPECT_EQ(unpack_state(m.config(), m.page_pools(), bad).status().code(), StatusCode::kDataLoss);
  }
  for (size_t cut : {size_t{0}, size_t{10}, packed.size() / 2, packed.size() - 1}) {
    EXPECT_EQ(
        unpack_state(m.config(), m.page_pools(), std::span(packed).first(cut)).status().code(),
        StatusCode::kDataLoss)
        << "cut at " << cut;
  }
  ModelConfig other = m.config();
  other.sliding_window = 32;
  const auto foreign = unpack_state(other, KvPagePools::create(other), packed);
  ASSERT_EQ(foreign.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(foreign.status().message().find("other shapes"), std::string::npos);
  // A state of the other KV dtype is another model's.
  const Model& fp8 = testing_support::tiny_model(kvstore::KvDtype::kFp8);
  const auto mixed = unpack_state(fp8.config(), fp8.page_pools(), packed);
  ASSERT_EQ(mixed.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(mixed.status().message().find("other shapes"), std::string::npos);
}

}  // namespace
}  // namespace dserve::model

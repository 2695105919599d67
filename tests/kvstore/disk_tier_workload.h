#pragma once
// The deterministic workload of disk_tier_writer, shared with the test that checks what
// survives killing it: block `index` of run `run` is the index-th block of one long prompt
// (its key chained from a per-run root), and its compressed-pool value is a function of
// (run, index) alone, so that any surviving value can be checked byte for byte.

#include <cstdint>
#include <string>
#include <vector>

#include "dserve/core/random.h"
#include "dserve/kvstore/block.h"
#include "dserve/kvstore/codec.h"

namespace dserve::kvstore::testing_support {

// Two layers' worth of compressed entries: 2 x 8 rows, so a value is about 2-4 KiB.
inline const PayloadLayout& writer_layout() {
  static const PayloadLayout layout{{{8, 64, 16}, {8, 32, 8}}};
  return layout;
}

inline BlockKey writer_root(int run) {
  return root_key("disk_tier_writer run " + std::to_string(run));
}

inline std::vector<int32_t> writer_tokens(int run, uint64_t index) {
  std::vector<int32_t> tokens(static_cast<size_t>(kBlockTokens));
  for (size_t t = 0; t < tokens.size(); ++t)
    tokens[t] = static_cast<int32_t>((static_cast<uint64_t>(run) * 7919 + index * 131 + t) % 50000);
  return tokens;
}

// Even blocks lossless, odd blocks fp8: both kinds of value go through the crash.
inline std::vector<uint8_t> writer_value(int run, uint64_t index, const BlockKey& key) {
  SplitMix64 rng(stream_seed(index, "disk_tier_writer run " + std::to_string(run)));
  std::vector<float> data(static_cast<size_t>(writer_layout().floats()));
  for (float& x : data)
    x = static_cast<float>(rng.normal());
  const Codec codec = index % 2 == 0 ? Codec::kLossless : Codec::kFp8;
  return encode_payload(key, Pool::kCompressed, codec, writer_layout(), data);
}

}  // namespace dserve::kvstore::testing_support

#include "dserve/kvstore/block.h"

#include <xxhash.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "dserve/core/check.h"

namespace dserve::kvstore {

std::string BlockKey::to_hex() const {
  char buf[33];
  std::snprintf(buf, sizeof(buf), "%016llx%016llx", static_cast<unsigned long long>(hi),
                static_cast<unsigned long long>(lo));
  return buf;
}

BlockKey root_key(std::string_view model_fingerprint) {
  const XXH128_hash_t h = XXH3_128bits(model_fingerprint.data(), model_fingerprint.size());
  return {h.high64, h.low64};
}

BlockKey chain_key(const BlockKey& parent, std::span<const int32_t> tokens) {
  DSERVE_CHECK_MSG(static_cast<int64_t>(tokens.size()) == kBlockTokens,
                   "a block holds exactly kBlockTokens tokens");
  // One contiguous buffer (parent key, then the tokens) hashed in one call: no hash state.
  uint8_t buf[2 * sizeof(uint64_t) + kBlockTokens * sizeof(int32_t)];
  std::memcpy(buf, &parent.hi, sizeof(uint64_t));
  std::memcpy(buf + sizeof(uint64_t), &parent.lo, sizeof(uint64_t));
  std::memcpy(buf + 2 * sizeof(uint64_t), tokens.data(), tokens.size_bytes());
  const XXH128_hash_t h = XXH3_128bits(buf, sizeof(buf));
  return {h.high64, h.low64};
}

std::vector<BlockKey> block_keys(const BlockKey& root, std::span<const int32_t> tokens) {
  std::vector<BlockKey> keys;
  BlockKey parent = root;
  for (size_t begin = 0; begin + kBlockTokens <= tokens.size(); begin += kBlockTokens) {
    parent = chain_key(parent, tokens.subspan(begin, kBlockTokens));
    keys.push_back(parent);
  }
  return keys;
}

std::string_view pool_name(Pool pool) {
  switch (pool) {
    case Pool::kCompressed:
      return "compressed";
    case Pool::kIndexKeys:
      return "index_keys";
    case Pool::kSnapshot:
      return "snapshot";
  }
  DSERVE_CHECK_MSG(false, "unknown pool");
  return "";
}

int64_t PayloadLayout::floats() const {
  int64_t n = 0;
  for (const Segment& s : segments)
    n += s.rows * s.width;
  return n;
}

int64_t PayloadLayout::bytes() const {
  int64_t n = 0;
  for (const Segment& s : segments)
    n += s.bytes();
  return n;
}

bool PayloadLayout::all_fp32() const {
  return std::all_of(segments.begin(), segments.end(),
                     [](const Segment& s) { return s.encoding == RowEncoding::kFp32; });
}

uint64_t PayloadLayout::digest() const {
  std::vector<int64_t> words;
  words.reserve(segments.size() * 4);
  for (const Segment& s : segments) {
    words.push_back(s.rows);
    words.push_back(s.width);
    words.push_back(s.rope_channels);
    // fp32 segments hash as they did before encodings existed: stored values stay readable.
    if (s.encoding != RowEncoding::kFp32) words.push_back(256 + static_cast<int64_t>(s.encoding));
  }
  return XXH3_64bits(words.data(), words.size() * sizeof(int64_t));
}

}  // namespace dserve::kvstore

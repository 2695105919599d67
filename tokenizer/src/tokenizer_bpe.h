#pragma once
// Byte-level BPE: a pre-token word (raw bytes) starts as one symbol per byte and the pair with
// the lowest merge rank is merged, leftmost first among equal ranks, until no listed merge
// applies (HF tokenizers' BPE and the JS oracle's priority-queue BPE both do exactly this).

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace dserve::tokenizer::detail {

// Hash and equality that let string-keyed maps be searched with a string_view.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StringIdMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// One merge rule: the pair it joins has this rank (its line in `merges`) and becomes `id`.
struct BpeMerge {
  int32_t rank = 0;
  int32_t id = 0;
};

inline uint64_t merge_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// Remembers the ids of recently seen words. Thread-safe (sharded mutexes); bounded in size.
class WordCache {
 public:
  // Appends the cached ids of `word` to `ids`; false when not cached.
  bool find(std::string_view word, std::vector<int32_t>& ids) const;
  void insert(std::string_view word, std::span<const int32_t> ids);

 private:
  static constexpr size_t kShards = 16;
  static constexpr size_t kEntriesPerShard = 8192;
  struct Shard {
    mutable std::mutex mutex;
    std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> words;
  };
  std::array<Shard, kShards> shards_;
};

class BpeModel {
 public:
  // `byte_ids[b]`: id of the one-byte token for byte b. `merges`: keyed by merge_key(left,
  // right). `whole_words`: raw bytes -> id of every vocabulary token, consulted first when
  // `ignore_merges` is set (HF's BPE option of that name).
  BpeModel(std::array<int32_t, 256> byte_ids, std::unordered_map<uint64_t, BpeMerge> merges,
           StringIdMap whole_words, bool ignore_merges);

  // Appends the ids of one non-empty word (raw bytes). Thread-safe.
  void encode_word(std::string_view word, std::vector<int32_t>& ids) const;

 private:
  void merge_word(std::string_view word, std::vector<int32_t>& ids) const;

  // Words longer than this are not cached (they rarely repeat).
  static constexpr size_t kMaxCachedWordBytes = 256;

  std::array<int32_t, 256> byte_ids_;
  std::unordered_map<uint64_t, BpeMerge> merges_;
  StringIdMap whole_words_;
  bool ignore_merges_;
  std::unique_ptr<WordCache> cache_;
};

}  // namespace dserve::tokenizer::detail

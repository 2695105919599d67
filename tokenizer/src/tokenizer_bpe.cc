#include "tokenizer_bpe.h"

#include <algorithm>

namespace dserve::tokenizer::detail {
namespace {

struct Symbol {
  int32_t id;
  int32_t prev;  // index of the symbol to the left, -1 at the start
  int32_t next;  // index of the symbol to the right, -1 at the end
  bool alive;
};

// A pair that may be merged; stale once either side has changed (checked when popped).
struct Candidate {
  int32_t rank;
  int32_t pos;  // index of the left symbol = byte offset where it starts in the word
  int32_t left;
  int32_t right;
  int32_t merged;
};

// Min-heap order: lowest rank first, then leftmost.
bool later(const Candidate& a, const Candidate& b) {
  return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
}

}  // namespace

bool WordCache::find(std::string_view word, std::vector<int32_t>& ids) const {
  const Shard& shard = shards_[StringHash{}(word) % kShards];
  std::lock_guard lock(shard.mutex);
  const auto it = shard.words.find(word);
  if (it == shard.words.end()) return false;
  ids.insert(ids.end(), it->second.begin(), it->second.end());
  return true;
}

void WordCache::insert(std::string_view word, std::span<const int32_t> ids) {
  Shard& shard = shards_[StringHash{}(word) % kShards];
  std::lock_guard lock(shard.mutex);
  // A full shard starts over: cheaper than LRU bookkeeping, and hot words return at once.
  if (shard.words.size() >= kEntriesPerShard) shard.words.clear();
  shard.words.emplace(std::string(word), std::vector<int32_t>(ids.begin(), ids.end()));
}

BpeModel::BpeModel(std::array<int32_t, 256> byte_ids, std::unordered_map<uint64_t, BpeMerge> merges,
                   StringIdMap whole_words, bool ignore_merges)
    : byte_ids_(byte_ids),
      merges_(std::move(merges)),
      whole_words_(std::move(whole_words)),
      ignore_merges_(ignore_merges),
      cache_(std::make_unique<WordCache>()) {}

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>& ids) const {
  if (word.size() == 1) {
    ids.push_back(byte_ids_[static_cast<uint8_t>(word[0])]);
    return;
  }
  if (ignore_merges_) {
    const auto it = whole_words_.find(word);
    if (it != whole_words_.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  if (cacheable && cache_->find(word, ids)) return;
  const size_t first = ids.size();
  merge_word(word, ids);
  if (cacheable) cache_->insert(word, std::span<const int32_t>(ids).subspan(first));
}

void BpeModel::merge_word(std::string_view word, std::vector<int32_t>& ids) const {
  const auto n = static_cast<int32_t>(word.size());
  std::vector<Symbol> symbols(word.size());
  for (int32_t i = 0; i < n; ++i) {
    symbols[static_cast<size_t>(i)] = {
        byte_ids_[static_cast<uint8_t>(word[static_cast<size_t>(i)])], i - 1,
        i + 1 < n ? i + 1 : -1, true};
  }
  std::vector<Candidate> heap;
  heap.reserve(word.size());
  auto offer = [&](int32_t pos) {
    const Symbol& left = symbols[static_cast<size_t>(pos)];
    const int32_t right_id = symbols[static_cast<size_t>(left.next)].id;
    const auto it = merges_.find(merge_key(left.id, right_id));
    if (it == merges_.end()) return;
    heap.push_back({it->second.rank, pos, left.id, right_id, it->second.id});
    std::push_heap(heap.begin(), heap.end(), later);
  };
  for (int32_t i = 0; i + 1 < n; ++i)
    offer(i);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const Candidate top = heap.back();
    heap.pop_back();
    Symbol& left = symbols[static_cast<size_t>(top.pos)];
    if (!left.alive || left.id != top.left || left.next < 0) continue;
    Symbol& right = symbols[static_cast<size_t>(left.next)];
    if (right.id != top.right) continue;
    left.id = top.merged;
    right.alive = false;
    left.next = right.next;
    if (left.next >= 0) symbols[static_cast<size_t>(left.next)].prev = top.pos;
    if (left.prev >= 0) offer(left.prev);
    if (left.next >= 0) offer(top.pos);
  }
  for (int32_t i = 0; i >= 0; i = symbols[static_cast<size_t>(i)].next) {
    ids.push_back(symbols[static_cast<size_t>(i)].id);
  }
}

}  // namespace dserve::tokenizer::detail

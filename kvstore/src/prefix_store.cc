#include "dserve/kvstore/prefix_store.h"

#include <algorithm>
#include <cstring>
#include <list>
#include <mutex>
#include <unordered_map>

#include "dserve/core/check.h"

namespace dserve::kvstore {

std::string_view tier_name(Tier tier) {
  switch (tier) {
    case Tier::kDevice:
      return "device";
    case Tier::kHost:
      return "host";
    case Tier::kDisk:
      return "disk";
  }
  DSERVE_CHECK_MSG(false, "unknown tier");
  return "";
}

struct PrefixStore::Node {
  BlockKey key;
  Node* parent = nullptr;
  std::unordered_map<BlockKey, std::unique_ptr<Node>, BlockKeyHash> children;
  std::array<std::vector<PageRef>, kPoolCount> device;  // empty: not in the device tier
  std::array<std::vector<uint8_t>, kPoolCount> host;    // empty: not in the host tier
  std::list<Node*>::iterator lru;
  bool in_lru = false;

  bool has_device() const {
    return std::any_of(device.begin(), device.end(), [](const auto& v) { return !v.empty(); });
  }
  bool has_host() const {
    return std::any_of(host.begin(), host.end(), [](const auto& v) { return !v.empty(); });
  }
  // No request holds any of its device pages (the index's reference is the only one).
  bool unpinned() const {
    for (const auto& pages : device) {
      for (const PageRef& p : pages) {
        if (p.use_count() > 1) return false;
      }
    }
    return true;
  }
};

struct PrefixStore::Impl {
  mutable std::mutex mu;
  Node root;
  std::unordered_map<BlockKey, Node*, BlockKeyHash> nodes;  // every node but the root
  std::list<Node*> lru;  // front: least recently used; ancestors are touched after descendants
  std::unique_ptr<DiskTier> disk;
  uint64_t device_bytes = 0;
  uint64_t host_bytes = 0;
  PrefixStoreMetrics m;
};

namespace {

uint64_t pages_bytes(const std::vector<PageRef>& pages) {
  uint64_t b = 0;
  for (const PageRef& p : pages)
    b += static_cast<uint64_t>(p->size_bytes());
  return b;
}

std::vector<std::byte> concat(const std::vector<PageRef>& pages) {
  std::vector<std::byte> out;
  for (const PageRef& p : pages)
    out.insert(out.end(), p->data(), p->data() + p->size_bytes());
  return out;
}

}  // namespace

PrefixStore::PrefixStore(PrefixStoreOptions options, BlockKey root, BlockLayout layout)
    : options_(std::move(options)),
      root_(root),
      layout_(std::move(layout)),
      impl_(std::make_unique<Impl>()) {
  impl_->root.key = root_;
}

PrefixStore::~PrefixStore() = default;

Result<std::unique_ptr<PrefixStore>> PrefixStore::open(PrefixStoreOptions options,
                                                       std::string_view model_fingerprint,
                                                       BlockLayout layout) {
  if (options.snapshot_every_blocks < 1) {
    return invalid_argument("snapshot_every_blocks: found " +
                            std::to_string(options.snapshot_every_blocks) + ", expected >= 1");
  }
  if (layout.payload[static_cast<size_t>(Pool::kSnapshot)].segments.empty() ||
      layout.page_pools[static_cast<size_t>(Pool::kSnapshot)].size() != 1) {
    return invalid_argument("block layout: the snapshot pool needs segments and one page");
  }
  for (Pool pool : kAllPools) {
    const auto p = static_cast<size_t>(pool);
    int64_t page_bytes = 0;
    for (const auto& page_pool : layout.page_pools[p]) {
      if (page_pool == nullptr) return invalid_argument("block layout: a null page pool");
      page_bytes += static_cast<int64_t>(page_pool->page_bytes());
    }
    if (page_bytes != layout.payload[p].bytes()) {
      return invalid_argument("block layout of pool " + std::string(pool_name(pool)) +
                              ": pages hold " + std::to_string(page_bytes) +
                              " bytes, the payload " + std::to_string(layout.payload[p].bytes()));
    }
  }
  // Blocks stored through a lossy codec differ from computed ones: the codecs are part of
  // what a block's content depends on.
  const std::string fingerprint = std::string(model_fingerprint) +
                                  "|host_codec=" + std::string(codec_name(options.host_codec)) +
                                  "|disk_codec=" + std::string(codec_name(options.disk_codec));
  std::unique_ptr<PrefixStore> store(
      new PrefixStore(std::move(options), root_key(fingerprint), std::move(layout)));
  if (!store->options_.disk_path.empty()) {
    DiskTierOptions disk;
    disk.path = store->options_.disk_path;
    disk.capacity_bytes = store->options_.disk_capacity_bytes;
    disk.write_queue_bytes = store->options_.write_queue_bytes;
    DSERVE_ASSIGN_OR_RETURN(store->impl_->disk, DiskTier::open(disk));
  }
  return store;
}

bool PrefixStore::wants_snapshot(int64_t block, int64_t whole_blocks) const {
  return (block + 1) % options_.snapshot_every_blocks == 0 || block == whole_blocks - 1;
}

// --- the operations below run with impl_->mu held -----------------------------------------

struct PrefixStore::Ops {
  const BlockLayout& layout;
  const PrefixStoreOptions& options;
  PrefixStore::Impl& s;

  bool trivial(Pool p) const { return layout.payload[static_cast<size_t>(p)].segments.empty(); }

  bool present(const PrefixStore::Node& n, Pool p) const {
    const auto i = static_cast<size_t>(p);
    return trivial(p) || !n.device[i].empty() || !n.host[i].empty() ||
           (s.disk && s.disk->contains(n.key, p));
  }
  bool shareable_present(const PrefixStore::Node& n) const {
    return present(n, Pool::kCompressed) && present(n, Pool::kIndexKeys);
  }

  void touch(PrefixStore::Node* n) {
    if (n->in_lru) s.lru.erase(n->lru);
    n->lru = s.lru.insert(s.lru.end(), n);
    n->in_lru = true;
  }

  PrefixStore::Node* find(const BlockKey& key) {
    const auto it = s.nodes.find(key);
    return it == s.nodes.end() ? nullptr : it->second;
  }

  PrefixStore::Node* create(PrefixStore::Node* parent, const BlockKey& key) {
    auto node = std::make_unique<PrefixStore::Node>();
    node->key = key;
    node->parent = parent;
    PrefixStore::Node* raw = node.get();
    parent->children.emplace(key, std::move(node));
    s.nodes.emplace(key, raw);
    touch(raw);
    return raw;
  }

  void set_device(PrefixStore::Node& n, Pool p, std::vector<PageRef> pages) {
    auto& slot = n.device[static_cast<size_t>(p)];
    s.device_bytes -= pages_bytes(slot);
    s.device_bytes += pages_bytes(pages);
    slot = std::move(pages);
  }
  void set_host(PrefixStore::Node& n, Pool p, std::vector<uint8_t> value) {
    auto& slot = n.host[static_cast<size_t>(p)];
    s.host_bytes -= slot.size();
    s.host_bytes += value.size();
    slot = std::move(value);
    slot.shrink_to_fit();
  }

  std::vector<uint8_t> encode(const PrefixStore::Node& n, Pool p, Codec codec) const {
    const auto i = static_cast<size_t>(p);
    return encode_payload(n.key, p, codec, layout.payload[i],
                          std::span<const std::byte>(concat(n.device[i])));
  }

  // Queues the pool's payload for the disk tier unless it is there already.
  void write_back(const PrefixStore::Node& n, Pool p) {
    const auto i = static_cast<size_t>(p);
    if (!s.disk || trivial(p) || s.disk->contains(n.key, p)) return;
    if (!n.device[i].empty()) {
      s.disk->put_async(n.key, p, encode(n, p, options.disk_codec));
    } else if (!n.host[i].empty() && options.host_codec == options.disk_codec) {
      s.disk->put_async(n.key, p, n.host[i]);
    } else if (!n.host[i].empty()) {
      auto bytes = decode_payload_bytes(n.key, p, layout.payload[i], n.host[i]);
      if (bytes.is_ok()) {
        s.disk->put_async(n.key, p,
                          encode_payload(n.key, p, options.disk_codec, layout.payload[i],
                                         std::span<const std::byte>(*bytes)));
      }
    }
  }

  // Brings one pool of a node into the device tier. `from` gets the tier it came from.
  Result<std::vector<PageRef>> fetch(PrefixStore::Node& n, Pool p, Tier* from) {
    const auto i = static_cast<size_t>(p);
    *from = Tier::kDevice;
    if (trivial(p) || !n.device[i].empty()) return n.device[i];
    std::vector<uint8_t> value;
    if (!n.host[i].empty()) {
      *from = Tier::kHost;
      value = n.host[i];
    } else if (s.disk) {
      *from = Tier::kDisk;
      auto stored = s.disk->get(n.key, p);
      if (!stored) return not_found("block " + n.key.to_hex() + " left the disk tier");
      value = std::move(*stored);
    } else {
      return not_found("block " + n.key.to_hex() + " has no " + std::string(pool_name(p)));
    }
    auto bytes = decode_payload_bytes(n.key, p, layout.payload[i], value);
    if (!bytes.is_ok()) {
      // Never served: drop the bad copy wherever it was.
      ++s.m.corrupt;
      if (*from == Tier::kHost) set_host(n, p, {});
      if (*from == Tier::kDisk) s.disk->report_corrupt(n.key, p);
      return bytes.status();
    }
    std::vector<PageRef> pages;
    const std::byte* src = bytes->data();
    for (const auto& pool : layout.page_pools[i]) {
      PageRef page = pool->allocate_for_overwrite();
      std::memcpy(page->data(), src, pool->page_bytes());
      src += pool->page_bytes();
      pages.push_back(std::move(page));
    }
    set_device(n, p, pages);
    return pages;
  }

  void demote_from_device(PrefixStore::Node& n) {
    for (Pool p : kAllPools) {
      const auto i = static_cast<size_t>(p);
      if (n.device[i].empty()) continue;
      if (options.host_capacity_bytes > 0 && n.host[i].empty()) {
        set_host(n, p, encode(n, p, options.host_codec));
      } else {
        write_back(n, p);
      }
      set_device(n, p, {});
    }
    ++s.m.tiers[static_cast<size_t>(Tier::kDevice)].evictions;
  }

  void demote_from_host(PrefixStore::Node& n) {
    for (Pool p : kAllPools) {
      const auto i = static_cast<size_t>(p);
      if (n.host[i].empty()) continue;
      write_back(n, p);
      set_host(n, p, {});
    }
    ++s.m.tiers[static_cast<size_t>(Tier::kHost)].evictions;
  }

  void remove(PrefixStore::Node* n) {
    s.lru.erase(n->lru);
    s.nodes.erase(n->key);
    n->parent->children.erase(n->key);  // destroys n
  }

  void enforce_capacity() {
    for (auto it = s.lru.begin();
         s.device_bytes > options.device_capacity_bytes && it != s.lru.end(); ++it) {
      if ((*it)->has_device() && (*it)->unpinned()) demote_from_device(**it);
    }
    if (s.device_bytes > options.device_capacity_bytes) ++s.m.pinned_over_capacity;
    for (auto it = s.lru.begin(); s.host_bytes > options.host_capacity_bytes && it != s.lru.end();
         ++it) {
      if ((*it)->has_host()) demote_from_host(**it);
    }
    // Nodes that hold nothing in memory are forgotten (leaves first); a later match finds
    // their blocks in the disk tier again by key.
    for (auto it = s.lru.begin(); it != s.lru.end();) {
      PrefixStore::Node* n = *it++;
      if (!n->has_device() && !n->has_host() && n->children.empty()) remove(n);
    }
  }
};

PrefixStore::Match PrefixStore::match(std::span<const int32_t> tokens) {
  std::lock_guard lock(impl_->mu);
  Ops ops{layout_, options_, *impl_};
  Impl& s = *impl_;
  ops.enforce_capacity();  // pages requests released since the last call may move down now
  ++s.m.lookups;
  const int64_t max_blocks =
      tokens.empty() ? 0 : (static_cast<int64_t>(tokens.size()) - 1) / kBlockTokens;
  s.m.lookup_tokens += static_cast<uint64_t>(max_blocks * kBlockTokens);
  const auto keys = block_keys(root_, tokens.first(static_cast<size_t>(max_blocks * kBlockTokens)));

  // The run of blocks whose shareable payloads are stored somewhere.
  std::vector<Node*> path;
  Node* parent = &s.root;
  for (const BlockKey& key : keys) {
    Node* n = ops.find(key);
    if (n == nullptr && s.disk && s.disk->contains(key, Pool::kCompressed)) {
      n = ops.create(parent, key);  // known to the disk tier only (e.g. after a restart)
    }
    if (n == nullptr || !ops.shareable_present(*n)) break;
    path.push_back(n);
    parent = n;
  }

  Match match;
  while (!path.empty()) {
    // The longest prefix of the run that ends at a stored snapshot.
    auto best = static_cast<int64_t>(path.size()) - 1;
    while (best >= 0 && !ops.present(*path[static_cast<size_t>(best)], Pool::kSnapshot))
      --best;
    if (best < 0) break;
    match = Match{};
    bool ok = true;
    for (int64_t b = 0; b <= best && ok; ++b) {
      Node& n = *path[static_cast<size_t>(b)];
      BlockContent content;
      Tier slowest = Tier::kDevice;
      for (Pool p : {Pool::kCompressed, Pool::kIndexKeys}) {
        Tier from;
        auto pages = ops.fetch(n, p, &from);
        if (!pages.is_ok()) {
          // This block is gone, and with it every match past it: the caller recomputes them
          // all and inserts them again. Their disk copies are dropped so that the fresh ones
          // are written (the disk tier keeps the first value of a key), which also replaces
          // any other bad value among them before a later request trips over it.
          for (size_t later = static_cast<size_t>(b); later < path.size(); ++later) {
            for (Pool q : kAllPools) {
              if (s.disk && s.disk->contains(path[later]->key, q))
                s.disk->erase(path[later]->key, q);
            }
          }
          path.resize(static_cast<size_t>(b));
          ok = false;
          break;
        }
        content.pages[static_cast<size_t>(p)] = std::move(*pages);
        slowest = std::max(slowest, from);
      }
      if (!ok) break;
      match.keys.push_back(n.key);
      match.blocks.push_back(std::move(content));
      ++match.blocks_from_tier[static_cast<size_t>(slowest)];
    }
    if (!ok) continue;
    Tier from;
    auto snapshot = ops.fetch(*path[static_cast<size_t>(best)], Pool::kSnapshot, &from);
    if (!snapshot.is_ok()) {
      path.resize(static_cast<size_t>(best));  // dropped as corrupt: look for an earlier one
      continue;
    }
    match.snapshot = (*snapshot)[0];
    break;
  }
  if (match.snapshot == nullptr) match = Match{};

  // Deepest first, so that ancestors are the more recent (leaves leave first).
  for (auto it = match.keys.rbegin(); it != match.keys.rend(); ++it) {
    Node* n = ops.find(*it);
    DSERVE_CHECK_MSG(n != nullptr, "a matched block is in the index");
    ops.touch(n);
  }
  if (!match.keys.empty()) {
    ++s.m.hits;
    s.m.hit_tokens += static_cast<uint64_t>(match.tokens());
    for (int t = 0; t < kTierCount; ++t) {
      s.m.tiers[static_cast<size_t>(t)].hit_blocks +=
          static_cast<uint64_t>(match.blocks_from_tier[static_cast<size_t>(t)]);
      s.m.tiers[static_cast<size_t>(t)].hit_tokens +=
          static_cast<uint64_t>(match.blocks_from_tier[static_cast<size_t>(t)] * kBlockTokens);
    }
  }
  ops.enforce_capacity();
  return match;
}

void PrefixStore::insert(const BlockKey& parent, const BlockKey& key, BlockContent content) {
  std::lock_guard lock(impl_->mu);
  Ops ops{layout_, options_, *impl_};
  Impl& s = *impl_;
  Node* parent_node = parent == root_ ? &s.root : ops.find(parent);
  if (parent_node == nullptr) parent_node = &s.root;  // its parent was forgotten; still findable
  Node* n = ops.find(key);
  if (n == nullptr) {
    n = ops.create(parent_node, key);
    ++s.m.inserted_blocks;
  }
  for (Pool p : kAllPools) {
    const auto i = static_cast<size_t>(p);
    auto& pages = content.pages[i];
    if (pages.empty() || ops.trivial(p)) continue;
    DSERVE_CHECK_MSG(pages.size() == layout_.page_pools[i].size(),
                     "block content has the wrong page count");
    for (size_t j = 0; j < pages.size(); ++j) {
      DSERVE_CHECK_MSG(
          pages[j] != nullptr && pages[j]->size_bytes() ==
                                     static_cast<int64_t>(layout_.page_pools[i][j]->page_bytes()),
          "block content page of the wrong size");
    }
    if (p == Pool::kSnapshot && n->device[i].empty() && n->host[i].empty()) ++s.m.snapshots;
    if (n->device[i].empty()) ops.set_device(*n, p, std::move(pages));
    ops.write_back(*n, p);
  }
  // A new block is the most recent; its ancestors are touched after it (leaves leave first).
  for (Node* a = n; a != nullptr && a != &s.root; a = a->parent)
    ops.touch(a);
  ops.enforce_capacity();
}

std::string PrefixStore::disk_quarantined() const {
  std::lock_guard lock(impl_->mu);
  return impl_->disk ? impl_->disk->quarantined() : std::string();
}

PrefixStoreMetrics PrefixStore::metrics() const {
  std::lock_guard lock(impl_->mu);
  const Impl& s = *impl_;
  PrefixStoreMetrics m = s.m;
  auto& device = m.tiers[static_cast<size_t>(Tier::kDevice)];
  auto& host = m.tiers[static_cast<size_t>(Tier::kHost)];
  device.bytes = s.device_bytes;
  host.bytes = s.host_bytes;
  const auto snap = static_cast<size_t>(Pool::kSnapshot);
  for (const auto& [key, n] : s.nodes) {
    device.blocks += n->has_device() ? 1 : 0;
    host.blocks += n->has_host() ? 1 : 0;
    m.snapshot_bytes += pages_bytes(n->device[snap]) + n->host[snap].size();
  }
  if (s.disk) {
    m.disk = s.disk->stats();
    auto& disk = m.tiers[static_cast<size_t>(Tier::kDisk)];
    disk.blocks = m.disk->blocks;
    disk.bytes = m.disk->bytes;
    disk.evictions = m.disk->evicted;
  }
  return m;
}

void PrefixStore::flush() {
  if (impl_->disk) impl_->disk->flush();
}

}  // namespace dserve::kvstore

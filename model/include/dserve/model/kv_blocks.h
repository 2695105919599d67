#pragma once
// How a request's state maps onto kvstore blocks (kvstore/block.h): which pages make up a
// block in each pool, what a block-end snapshot holds, and how to rebuild a RequestState from
// the blocks of a prefix and the snapshot at its end.
//
// At a block end (position a multiple of 128) every compressor window is closed (the rates
// divide 128), so the whole state is: the compressed entries and indexer keys of the blocks
// (shared pages) plus the snapshot: each layer's sliding window (the last sliding_window - 1
// tokens' kv) and each CSA compressor's overlap (the last window's Ca and its gate).

#include <cstdint>
#include <span>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/kvstore/block.h"
#include "dserve/kvstore/page_pool.h"
#include "dserve/model/config.h"
#include "dserve/model/request_state.h"

namespace dserve::model {

struct KvBlockLayout {
  // One segment per layer that has the pool, in layer order; their pools in the same order.
  kvstore::PayloadLayout compressed;
  kvstore::PayloadLayout index_keys;
  std::vector<std::shared_ptr<kvstore::PagePool>> compressed_pools;
  std::vector<std::shared_ptr<kvstore::PagePool>> index_pools;
  // The snapshot is one page: per layer its window, then for CSA layers the kv compressor's
  // overlap (kv, gate) and the indexer compressor's (kv, gate).
  kvstore::PayloadLayout snapshot;
  std::shared_ptr<kvstore::PagePool> snapshot_pool;
};

// InvalidArgument when the model cannot be cut into 128-token blocks: a compress rate that
// does not divide 128, or a sliding window longer than a block plus one.
Result<KvBlockLayout> kv_block_layout(const ModelConfig& config, const KvPagePools& pools);

// One block of a request, as pages: per pool, one page per segment of that pool's layout
// (the snapshot pool: one page, or none when the block has no snapshot).
struct BlockPages {
  std::vector<kvstore::PageRef> compressed;
  std::vector<kvstore::PageRef> index_keys;
  kvstore::PageRef snapshot;
};

// The pages of block `block` of `state`, shared; the block must be complete
// ((block + 1) * 128 <= state.position()).
BlockPages block_pages(const KvBlockLayout& layout, const RequestState& state, int64_t block);

// A snapshot page of `state`, which must stand at a block end.
kvstore::PageRef take_snapshot(const KvBlockLayout& layout, const RequestState& state);

// The state after the first blocks.size() blocks, from their pages and the snapshot at the
// last one's end. InvalidArgument when a block lacks a page or a page has the wrong size.
Result<RequestState> restore_state(const ModelConfig& config, const KvPagePools& pools,
                                   const KvBlockLayout& layout, std::span<const BlockPages> blocks,
                                   const kvstore::PageRef& snapshot);

}  // namespace dserve::model

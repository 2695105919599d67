#pragma once
// A request's whole decode-time state as one self-checking byte string: what a prefill worker
// hands a decode worker (over the transport), at any position, not only at block ends.
// It holds every pool of MODEL-V4.md: per layer the sliding window, the compressed entries,
// the indexer keys and both compressors' pending tokens and overlap.
//
// Format (version 2, little-endian): magic "DSRS", u32 version, u64 position, u64 layer count,
// u64 digest of the model's state shapes (layer kinds, widths, rates, window, KV dtype); then
// per layer, in a fixed order: the window (u64 float count, floats; with fp8 KV u64 byte count,
// its rows as fp8 entries, which hold exactly its values), the compressed entries and
// the indexer keys (u64 byte count, the rows as their pages hold them: fp32, or V4's fp8 entries
// and fp4 keys), both compressors (u64 closed windows, then (u64 count, floats) arrays); then
// u64 XXH3-64 of everything before. Unpacking gives a state that continues bit for bit.

#include <cstdint>
#include <span>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/model/config.h"
#include "dserve/model/request_state.h"

namespace dserve::model {

std::vector<uint8_t> pack_state(const ModelConfig& config, const RequestState& state);

// The exact size of pack_state's output for a state of this model at `position` (>= 0): what a
// decode worker allocates for the hand-off before the state exists. Pure arithmetic.
size_t packed_state_bytes(const ModelConfig& config, int64_t position);

// DataLoss naming what did not match (checksum, size, the model's shapes, a pool's length)
// when `bytes` is not a state of this model; the pages come from `pools`.
Result<RequestState> unpack_state(const ModelConfig& config, const KvPagePools& pools,
                                  std::span<const uint8_t> bytes);

// The hand-off's small part (state_handoff.h): the state without its compressed entries and
// indexer keys, which travel as pages. The same format with every row array empty and the magic
// "DSRW"; unpacking gives a state whose paged rows are empty, for the pages to be appended.
std::vector<uint8_t> pack_state_without_rows(const ModelConfig& config, const RequestState& state);
size_t packed_state_without_rows_bytes(const ModelConfig& config, int64_t position);
Result<RequestState> unpack_state_without_rows(const ModelConfig& config, const KvPagePools& pools,
                                               std::span<const uint8_t> bytes);

}  // namespace dserve::model

#pragma once
// The prefill-to-decode hand-off of a request's state as pages.
//
// The receiver's region holds, at offset 0, the state's small part (windows and compressor
// state: pack_state_without_rows, padded to 64 bytes), then every page of the state's compressed
// entries and indexer keys, layer by layer (a layer's compressed pages, then its indexer-key
// pages), each page whole, in its pool's row format (fp32, or fp8 entries and fp4 keys). The
// layout is a function of the model and the position alone (handoff_spans), so both sides know
// it without telling each other.
//
// The sender puts each page from where it lies (handoff_source: one op per page, no packing);
// the transport returns one XXH3 digest per op. Those are folded into one digest per run of
// consecutive spans (kHandoffRunBytes; handoff_run_digests: XXH3 of the run's span digests), so
// that the control message stays small at any context (a 32k-token V4-Flash state in fp32 has
// 15,873 pages and 55 runs; at a million tokens about 1,000 runs). The receiver
// (receive_handoff) copies each span out of its region into a fresh page of its pools, hashes
// the copy, folds its run the same way and checks it before anything reads the pages: a run
// that does not match is refused, naming its pages, and the request is replayed; bytes a late
// put writes into the region afterwards cannot reach the request.
//
// Copies per hand-off: the transport's (one, on the wire) and the receiver's out of the region
// (kvstore/README.md "Hand-off": why that one stays on transports that cannot revoke a key).
// The whole-state format (state_packing.h) packed and unpacked on top of those: two more.

#include <cstdint>
#include <span>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/kvstore/transfer.h"
#include "dserve/model/config.h"
#include "dserve/model/engine.h"
#include "dserve/model/request_state.h"

namespace dserve::model {

// One span of the hand-off region: the small part (first) or one page.
struct HandoffSpan {
  uint64_t offset = 0;
  uint64_t bytes = 0;
};

// The bytes one run digest covers: at most kHandoffRunBytes, or for a state larger than
// kHandoffRunBytes x kHandoffMaxRuns its size / kHandoffMaxRuns (a span larger than that is a
// run of its own). So a HandoffDone carries at most about 1,025 digests (24 KiB).
inline constexpr uint64_t kHandoffRunBytes = uint64_t{8} << 20;
inline constexpr uint64_t kHandoffMaxRuns = 1024;

// Every span of the hand-off of a state at `position`, in order: the small part, then the pages.
std::vector<HandoffSpan> handoff_spans(const ModelConfig& config, int64_t position);
// Where the last span ends: the bytes a receiver's region needs for the state.
uint64_t handoff_bytes(const ModelConfig& config, int64_t position);

// What a sender puts: ops[i] writes spans[i]. Holds the small part's bytes (and, for an engine
// whose state is not in host memory, the exported copy the pages are read from); the request
// must not run until the put has returned.
struct HandoffSource {
  std::vector<uint8_t> small_part;
  RequestState exported;
  std::vector<kvstore::PutOp> ops;
  uint64_t bytes = 0;  // handoff_bytes at the request's position
};
Result<HandoffSource> handoff_source(const Engine& engine, const EngineRequest& request);

// The run digests of a state at `position` from the digests of its spans, one per span in order
// (what the transport's put returned for HandoffSource::ops). Each run: remote_offset and bytes
// of the spans it covers, xxh3 = XXH3-64 of their digests (little-endian u64s). DataLoss when
// `span_digests` are not the spans' (count, offsets, sizes).
Result<std::vector<kvstore::SpanDigest>> handoff_run_digests(
    const ModelConfig& config, int64_t position, std::span<const kvstore::SpanDigest> span_digests);

// The request `engine` continues from what landed in `region` for a state at `position`, given
// the sender's run digests (handoff_run_digests). DataLoss naming the run's spans when a digest
// is missing, does not cover its run, or does not match the copies; nothing copied out of the
// region is read before its run matched.
Result<RequestHandle> receive_handoff(Engine& engine, std::span<const std::byte> region,
                                      int64_t position,
                                      std::span<const kvstore::SpanDigest> digests);

}  // namespace dserve::model

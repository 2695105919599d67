#pragma once
// The transfer keys of one hand-off: everything a prefill worker needs to write a request's
// state into the region a decode worker reserved for it (the decode engine's address and the
// region), as one opaque blob for the control plane (ReserveReply::transfer_keys).
//
// Format: u32 length of the encoded PeerAddress, that encoding, then the encoded RemoteRegion
// (both with transfer.h's versioned encoders); little-endian.

#include <cstdint>
#include <span>
#include <vector>

#include "dserve/core/status.h"
#include "dserve/kvstore/transfer.h"

namespace dserve::kvstore {

struct HandoffKeys {
  PeerAddress peer;
  RemoteRegion region;
};

std::vector<uint8_t> encode_handoff_keys(const HandoffKeys& keys);
// kDataLoss for malformed or truncated bytes, or a region whose epoch is not the peer's.
Result<HandoffKeys> decode_handoff_keys(std::span<const uint8_t> bytes);

}  // namespace dserve::kvstore

#include "dserve/kvstore/handoff_keys.h"

#include <cstring>
#include <string>

namespace dserve::kvstore {

std::vector<uint8_t> encode_handoff_keys(const HandoffKeys& keys) {
  const std::vector<uint8_t> peer = encode_peer_address(keys.peer);
  const std::vector<uint8_t> region = encode_remote_region(keys.region);
  std::vector<uint8_t> out(sizeof(uint32_t));
  const auto length = static_cast<uint32_t>(peer.size());
  std::memcpy(out.data(), &length, sizeof(length));
  out.insert(out.end(), peer.begin(), peer.end());
  out.insert(out.end(), region.begin(), region.end());
  return out;
}

Result<HandoffKeys> decode_handoff_keys(std::span<const uint8_t> bytes) {
  uint32_t length = 0;
  if (bytes.size() < sizeof(length)) return data_loss("hand-off keys: truncated");
  std::memcpy(&length, bytes.data(), sizeof(length));
  if (bytes.size() - sizeof(length) < length) return data_loss("hand-off keys: truncated address");
  auto peer = decode_peer_address(bytes.subspan(sizeof(length), length));
  if (!peer.is_ok()) return peer.status();
  auto region = decode_remote_region(bytes.subspan(sizeof(length) + length));
  if (!region.is_ok()) return region.status();
  if (region->owner_epoch != peer->epoch) {
    return data_loss("hand-off keys: region of epoch " + std::to_string(region->owner_epoch) +
                     " does not belong to peer epoch " + std::to_string(peer->epoch));
  }
  return HandoffKeys{std::move(peer).value(), std::move(region).value()};
}

}  // namespace dserve::kvstore

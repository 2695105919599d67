#pragma once
// Small stand-ins for the dserve roles, speaking the real interfaces with trivial logic, for
// protocol tests over real CAF connections (in one process and across processes).

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include <caf/actor_system.hpp>

#include "dserve/actors/decode_interface.h"
#include "dserve/actors/gateway_interface.h"
#include "dserve/actors/prefill_interface.h"

namespace dserve::actors::testing {

// Decode stand-in: grants reservations while the prompt fits `capacity_tokens`, hands out
// 16-byte transfer keys derived from the reservation, accepts a hand-off for a live
// reservation of its own epoch and then streams first_token, first_token+1, first_token+2 to
// the reservation's sink in two chunks. A ReserveRequest with max_new_tokens == kHoldForever
// is never answered (to test requests in flight when a peer dies).
inline constexpr uint32_t kHoldForever = 0xffffffffu;
DecodeActor spawn_fake_decode(caf::actor_system& sys, Epoch epoch, uint32_t capacity_tokens);

// Prefill stand-in: fails an empty prompt, otherwise reports every prompt token as computed.
PrefillActor spawn_fake_prefill(caf::actor_system& sys, Epoch epoch);

// Collects the token chunks a gateway receives; thread-safe.
class TokenCollector {
 public:
  void add(TokenChunk chunk);
  // Blocks until a finished chunk of `request_id` arrived or `timeout_ms` passed; returns the
  // chunks of that request in arrival order.
  std::vector<TokenChunk> wait_finished(RequestId request_id, int timeout_ms);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<TokenChunk> chunks_;
};

GatewayActor spawn_fake_gateway(caf::actor_system& sys, Epoch epoch,
                                std::shared_ptr<TokenCollector> collector);

}  // namespace dserve::actors::testing

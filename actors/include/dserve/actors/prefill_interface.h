#pragma once
// The prefill worker's control interface, shared by its implementation and the gateway. See
// messages.h for what each message means.

#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "dserve/actors/messages.h"

namespace dserve::actors {

// Published by every prefill process at its configured control address.
//   gateway -> PrefillRequest -> PrefillReply  (compute the prompt, hand the state to decode)
//   gateway -> CancelRequest  -> CancelReply   (stop computing, release what it holds)
//   any     -> HealthProbe    -> HealthReport  (liveness + epoch)
using PrefillActor = caf::typed_actor<caf::replies_to<PrefillRequest>::with<PrefillReply>,
                                      caf::replies_to<CancelRequest>::with<CancelReply>,
                                      caf::replies_to<HealthProbe>::with<HealthReport>>;

}  // namespace dserve::actors

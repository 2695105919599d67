#pragma once
// The gateway's control interface, shared by its implementation and the workers that talk back
// to it. See messages.h for what each message means.

#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "dserve/actors/messages.h"

namespace dserve::actors {

// Published by the gateway process at its configured control address.
//   decode -> TokenChunk (one-way)             (tokens of a request, in order)
//   any    -> HealthProbe -> HealthReport      (liveness + epoch)
// A GatewayActor converts to the TokenSinkActor that ReserveRequest::stream_to expects.
using GatewayActor =
    caf::typed_actor<caf::reacts_to<TokenChunk>, caf::replies_to<HealthProbe>::with<HealthReport>>;

}  // namespace dserve::actors

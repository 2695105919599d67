#pragma once
// The decode worker's control interface, shared by its implementation and its callers (the
// gateway, prefill workers). See messages.h for what each message means.

#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "dserve/actors/messages.h"

namespace dserve::actors {

// Published by every decode process at its configured control address.
//   gateway -> ReserveRequest -> ReserveReply   (reserve pages before prefill starts)
//   prefill -> HandoffDone    -> HandoffAck     (the KV state is in the reserved pages)
//   gateway -> RenewReservation -> RenewReply   (the prefill still runs: keep the reservation)
//   gateway -> CancelRequest  -> CancelReply    (drop the request, release its pages)
//   any     -> HealthProbe    -> HealthReport   (liveness + epoch)
// Token streams go out one-way to ReserveRequest::stream_to as TokenChunk messages.
using DecodeActor = caf::typed_actor<caf::replies_to<ReserveRequest>::with<ReserveReply>,
                                     caf::replies_to<HandoffDone>::with<HandoffAck>,
                                     caf::replies_to<RenewReservation>::with<RenewReply>,
                                     caf::replies_to<CancelRequest>::with<CancelReply>,
                                     caf::replies_to<HealthProbe>::with<HealthReport>>;

}  // namespace dserve::actors

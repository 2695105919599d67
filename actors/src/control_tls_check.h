#pragma once
// Checks the control plane's TLS files before CAF sees them (CAF's OpenSSL module reads them
// only when the first peer connects, and a bad file then aborts the process on the
// multiplexer thread; a wrong CA shows up only as "disconnect during handshake").

#include "dserve/actors/actor_runtime.h"
#include "dserve/core/status.h"

namespace dserve::actors {

// kInvalidArgument naming the file and what is wrong: a file missing or unreadable, not PEM,
// a key that is not the certificate's, a certificate the CA did not sign; or not all
// three given.
Status check_control_tls(const ControlTls& tls);

}  // namespace dserve::actors

#pragma once
// The `dserve serve` command line of each process a manifest names, so that a launcher
// (`dserve up`) starts exactly what the manifest says.

#include <string>
#include <utility>
#include <vector>

#include "dserve/cluster/manifest.h"
#include "dserve/core/status.h"

namespace dserve::cluster {

// The arguments after the program name, starting with "serve": role, model, addresses, UCX
// settings and every limit and timeout that applies to the process's role, each given
// explicitly so the process never falls back to a default the manifest did not state.
// A gateway gets --prefill and --decode with the control addresses of every prefill and decode
// (or co-located) replica, in replica order.
//
// Every process gets --process-name with its manifest name (the `process` of its log lines);
// prefill and co-located processes get the kv_store section as the --kv-* flags, the gateway
// the security section. Every manifest field has a flag today; the Result stays so that a
// field `dserve serve` cannot apply is refused (kUnimplemented, naming it) rather than dropped.
// Precondition: `process` is one of `manifest.processes`.
Result<std::vector<std::string>> to_serve_args(const Manifest& manifest, const Process& process);

// The workers a process puts in the gateway's pools, as (role, HOST:PORT): one for a prefill or
// decode process, both halves ("prefill" at its port, "decode" at its second port) for a
// co-located one, none for the gateway.
std::vector<std::pair<std::string, std::string>> worker_addresses(const Process& process);

}  // namespace dserve::cluster

#pragma once
// A manifest Process as JSON, for the files the launcher and the node agents share
// (state.json, plan.json). Reading throws nlohmann::json exceptions (and std::runtime_error
// for an unknown role); callers turn them into kDataLoss.

#include <nlohmann/json.hpp>

#include "dserve/cluster/manifest.h"

namespace dserve::cluster::internal {

nlohmann::json process_to_json(const Process& p);
Process process_from_json(const nlohmann::json& j);

}  // namespace dserve::cluster::internal

#pragma once
// A loopback actor runtime for the actors tests: one scheduler thread, 2 s bounds.

#include <gtest/gtest.h>

#include <chrono>
#include <memory>

#include "dserve/actors/actor_runtime.h"

namespace dserve::actors::testing {

inline std::unique_ptr<ActorRuntime> start_runtime(Role role) {
  RuntimeConfig cfg;
  cfg.role = role;
  cfg.scheduler_threads = 1;
  cfg.connect_timeout = std::chrono::milliseconds(2000);
  cfg.request_timeout = std::chrono::milliseconds(2000);
  auto rt = ActorRuntime::start(cfg);
  EXPECT_TRUE(rt.is_ok()) << rt.status().to_string();
  return std::move(rt).value();
}

}  // namespace dserve::actors::testing

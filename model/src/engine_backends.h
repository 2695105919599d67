#pragma once
// The engines behind make_engine (engine.h), one source each. Internal to the model module.

#include <memory>

#include "dserve/model/engine.h"

namespace dserve::model {

// GpuModel behind the Engine interface (cuda_engine.cc); the device is usable (probed).
Result<std::unique_ptr<Engine>> make_cuda_engine(const Model& model, const EngineOptions& options);

}  // namespace dserve::model

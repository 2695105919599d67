// The CUDA engine: GpuModel (gpu_model.h) behind the Engine interface. Request states live on
// the device; export_state and import_state copy them to and from the host's format, so the
// hand-off and the prefix store work as on the CPU engine.

#include <string>
#include <utility>

#include "dserve/kernels/device.h"
#include "dserve/model/gpu_model.h"
#include "engine_backends.h"

namespace dserve::model {

namespace {

constexpr const char* kNoSpeculation =
    "speculative decoding (rewindable steps, MTP drafts) runs on the cpu engine; the cuda engine "
    "does not have it yet";

class CudaRequest final : public EngineRequest {
 public:
  CudaRequest(const void* owner, GpuRequestState state) : owner_(owner), state_(std::move(state)) {}
  int64_t position() const override { return state_.position(); }
  const void* owner() const { return owner_; }
  GpuRequestState& state() { return state_; }
  const GpuRequestState& state() const { return state_; }

 private:
  const void* owner_;
  GpuRequestState state_;
};

class CudaEngine final : public Engine {
 public:
  CudaEngine(std::unique_ptr<GpuModel> gpu, Device device)
      : gpu_(std::move(gpu)), device_(device), pools_(KvPagePools::create(gpu_->config())) {}

  const ModelConfig& config() const override { return gpu_->config(); }
  const Device& device() const override { return device_; }
  std::string describe() const override {
    const kernels::DeviceInfo info = kernels::probe_cuda_device(device_.index);
    return device_.name() + " (" + (info.available ? info.name : info.why_unavailable) +
           ", bf16 weights)";
  }

  Result<RequestHandle> new_request() override {
    DSERVE_RETURN_IF_ERROR(current());
    DSERVE_ASSIGN_OR_RETURN(GpuRequestState state, gpu_->new_state());
    return RequestHandle(std::make_unique<CudaRequest>(this, std::move(state)));
  }

  Result<std::vector<Tensor>> step(std::span<const StepRows> rows) override {
    DSERVE_RETURN_IF_ERROR(current());
    std::vector<GpuModel::StepRequest> requests;
    requests.reserve(rows.size());
    for (const StepRows& r : rows) {
      if (r.rewindable) return unimplemented(kNoSpeculation);
      requests.push_back({r.tokens, &mine(r.request).state(), r.which});
    }
    return gpu_->step(requests);
  }

  Status rewind(EngineRequest&, int64_t) override { return unimplemented(kNoSpeculation); }
  bool can_draft() const override { return false; }
  Result<std::vector<std::vector<int32_t>>> draft(std::span<const DraftRows>, int64_t) override {
    return unimplemented(kNoSpeculation);
  }

  Result<RequestState> export_state(const EngineRequest& request) const override {
    DSERVE_RETURN_IF_ERROR(current());
    return gpu_->export_state(mine(request).state(), pools_);
  }
  Result<RequestState> release_state(RequestHandle request) override {
    return export_state(*request);  // the device state goes with the handle
  }
  Result<RequestHandle> import_state(RequestState state) override {
    DSERVE_RETURN_IF_ERROR(current());
    DSERVE_ASSIGN_OR_RETURN(GpuRequestState on_device, gpu_->import_state(state));
    return RequestHandle(std::make_unique<CudaRequest>(this, std::move(on_device)));
  }

  const KvPagePools& page_pools() const override { return pools_; }
  const RequestState* host_state(const EngineRequest&) const override { return nullptr; }

 private:
  // The runtime's current device is per thread, and a worker's actor moves between threads.
  Status current() const {
    if (kernels::make_cuda_device_current(device_.index)) return Status::ok();
    return internal_error(device_.name() + " could not be made the current device");
  }
  CudaRequest& mine(EngineRequest* request) const {
    DSERVE_CHECK_MSG(request != nullptr, "a step row without a request");
    return const_cast<CudaRequest&>(mine(*request));
  }
  const CudaRequest& mine(const EngineRequest& request) const {
    const auto* r = dynamic_cast<const CudaRequest*>(&request);
    DSERVE_CHECK_MSG(r != nullptr && r->owner() == this, "a request made by another engine");
    return *r;
  }

  std::unique_ptr<GpuModel> gpu_;
  Device device_;
  KvPagePools pools_;
};

}  // namespace

Result<std::unique_ptr<Engine>> make_cuda_engine(const Model& model, const EngineOptions& options) {
  if (options.draft) return unimplemented(kNoSpeculation);
  GpuModelOptions gpu;
  gpu.device = options.device.index;
  gpu.max_positions = options.max_positions;
  gpu.max_requests = options.max_requests;
  gpu.max_chunk_tokens = options.max_step_tokens;
  DSERVE_ASSIGN_OR_RETURN(auto gpu_model, GpuModel::create(model.config(), model.weights(), gpu));
  return std::unique_ptr<Engine>(
      std::make_unique<CudaEngine>(std::move(gpu_model), options.device));
}

}  // namespace dserve::model

// Device names, make_engine, and the CPU engine: Model (model.h) behind the Engine interface.

#include "dserve/model/engine.h"

#include <charconv>
#include <string>
#include <utility>

#include "dserve/kernels/device.h"
#include "dserve/kernels/invariant_gemm.h"
#include "dserve/model/state_packing.h"
#include "engine_backends.h"

namespace dserve::model {

std::string Device::name() const {
  return kind == Kind::kCpu ? "cpu" : "cuda:" + std::to_string(index);
}

Result<Device> parse_device(std::string_view text) {
  constexpr int kMaxIndex = 255;
  const auto bad = [&] {
    return invalid_argument("device '" + std::string(text) +
                            "': expected cpu, cuda or cuda:N (N from 0 to " +
                            std::to_string(kMaxIndex) + ")");
  };
  if (text == "cpu") return Device{};
  if (text == "cuda") return Device{Device::Kind::kCuda, 0};
  if (!text.starts_with("cuda:")) return bad();
  const std::string_view digits = text.substr(5);
  int index = -1;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), index);
  if (digits.empty() || ec != std::errc{} || end != digits.data() + digits.size() || index < 0 ||
      index > kMaxIndex) {
    return bad();
  }
  return Device{Device::Kind::kCuda, index};
}

namespace {

class CpuRequest final : public EngineRequest {
 public:
  CpuRequest(const void* owner, RequestState state) : owner_(owner), state_(std::move(state)) {}
  int64_t position() const override { return state_.position(); }
  const void* owner() const { return owner_; }
  RequestState& state() { return state_; }
  const RequestState& state() const { return state_; }

 private:
  const void* owner_;
  RequestState state_;
};

class CpuEngine final : public Engine {
 public:
  explicit CpuEngine(std::shared_ptr<const Model> model) : model_(std::move(model)) {}

  const ModelConfig& config() const override { return model_->config(); }
  const Device& device() const override { return device_; }
  std::string describe() const override {
    return "cpu (" + std::string(kernels::cpu::cpu_isa_name(kernels::cpu::cpu_isa())) + " kernels)";
  }

  Result<RequestHandle> new_request() override {
    return RequestHandle(std::make_unique<CpuRequest>(this, model_->new_state()));
  }

  Result<std::vector<Tensor>> step(std::span<const StepRows> rows) override {
    std::vector<Model::StepRequest> requests;
    requests.reserve(rows.size());
    for (const StepRows& r : rows)
      requests.push_back({r.tokens, &mine(r.request).state(), r.which});
    return model_->forward_batch(requests);
  }

  Result<RequestState> export_state(const EngineRequest& request) const override {
    return RequestState(mine(request).state());
  }
  Result<RequestState> release_state(RequestHandle request) override {
    return std::move(mine(request.get()).state());
  }
  Result<RequestHandle> import_state(RequestState state) override {
    if (static_cast<int64_t>(state.layers().size()) != config().num_layers) {
      return invalid_argument("import_state: a state of " + std::to_string(state.layers().size()) +
                              " layers, this model has " + std::to_string(config().num_layers));
    }
    return RequestHandle(std::make_unique<CpuRequest>(this, std::move(state)));
  }

  const KvPagePools& page_pools() const override { return model_->page_pools(); }
  const RequestState* host_state(const EngineRequest& request) const override {
    return &mine(request).state();
  }

 private:
  CpuRequest& mine(EngineRequest* request) const {
    DSERVE_CHECK_MSG(request != nullptr, "a step row without a request");
    return const_cast<CpuRequest&>(mine(*request));
  }
  const CpuRequest& mine(const EngineRequest& request) const {
    const auto* r = dynamic_cast<const CpuRequest*>(&request);
    DSERVE_CHECK_MSG(r != nullptr && r->owner() == this, "a request made by another engine");
    return *r;
  }

  std::shared_ptr<const Model> model_;
  Device device_;
};

}  // namespace

Result<std::vector<uint8_t>> pack_request(const Engine& engine, const EngineRequest& request) {
  if (const RequestState* state = engine.host_state(request))
    return pack_state(engine.config(), *state);
  DSERVE_ASSIGN_OR_RETURN(const RequestState copy, engine.export_state(request));
  return pack_state(engine.config(), copy);
}

Result<RequestHandle> unpack_request(Engine& engine, std::span<const uint8_t> bytes) {
  DSERVE_ASSIGN_OR_RETURN(RequestState state,
                          unpack_state(engine.config(), engine.page_pools(), bytes));
  return engine.import_state(std::move(state));
}

Result<std::unique_ptr<Engine>> make_engine(std::shared_ptr<const Model> model,
                                            const EngineOptions& options) {
  DSERVE_CHECK(model != nullptr);
  if (options.device.kind == Device::Kind::kCpu) {
    return std::unique_ptr<Engine>(std::make_unique<CpuEngine>(std::move(model)));
  }
  if (const std::string why = kernels::select_cuda_device(options.device.index); !why.empty())
    return unavailable(options.device.name() + " cannot be used: " + why);
  return make_cuda_engine(*model, options);
}

}  // namespace dserve::model

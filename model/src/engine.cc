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
  // What the last step changed, when it ran rewindable.
  StepUndo& undo() { return undo_; }

 private:
  const void* owner_;
  RequestState state_;
  StepUndo undo_;
};

class CpuEngine final : public Engine {
 public:
  CpuEngine(std::shared_ptr<const Model> model, bool draft)
      : model_(std::move(model)), draft_(draft && model_->has_mtp()) {}

  const ModelConfig& config() const override { return model_->config(); }
  const Device& device() const override { return device_; }
  std::string describe() const override {
    return "cpu (" + std::string(kernels::cpu::cpu_isa_name(kernels::cpu::cpu_isa())) + " kernels)";
  }

  Result<RequestHandle> new_request() override { return adopt(model_->new_state()); }

  Result<std::vector<Tensor>> step(std::span<const StepRows> rows) override {
    std::vector<Model::StepRequest> requests;
    requests.reserve(rows.size());
    for (const StepRows& r : rows) {
      CpuRequest& request = mine(r.request);
      requests.push_back(
          {r.tokens, &request.state(), r.which, r.rewindable ? &request.undo() : nullptr});
    }
    auto logits = model_->forward_batch(requests);
    // Only the last step can be taken back: an older undo no longer matches the state.
    if (logits.is_ok()) {
      for (const StepRows& r : rows) {
        if (!r.rewindable) mine(r.request).undo() = StepUndo{};
      }
    }
    return logits;
  }

  Status rewind(EngineRequest& request, int64_t position) override {
    CpuRequest& r = mine(&request);
    const StepUndo& undo = r.undo();
    if (!undo.recorded() || undo.first_position + undo.rows != r.state().position()) {
      return invalid_argument("rewind: the request's last step was not run rewindable");
    }
    if (position < undo.first_position || position > r.state().position()) {
      return invalid_argument(
          "rewind to position " + std::to_string(position) + ": the last step ran positions " +
          std::to_string(undo.first_position) + " to " + std::to_string(r.state().position() - 1));
    }
    model_->rewind(r.state(), r.undo(), position);
    return Status::ok();
  }

  bool can_draft() const override { return draft_; }

  Result<std::vector<std::vector<int32_t>>> draft(std::span<const DraftRows> rows,
                                                  int64_t sampleable_ids) override {
    if (!draft_) {
      return model_->has_mtp() ? invalid_argument("draft: the engine was made without drafting")
                               : unimplemented("draft: the checkpoint has no MTP block");
    }
    std::vector<Model::DraftRequest> requests;
    requests.reserve(rows.size());
    for (const DraftRows& r : rows) {
      if (r.count < 0 || r.count > kMaxDraftTokens) {
        return invalid_argument("draft: " + std::to_string(r.count) + " tokens asked, at most " +
                                std::to_string(kMaxDraftTokens));
      }
      requests.push_back({&mine(r.request).state(), r.next_token, r.count});
    }
    return model_->draft(requests, sampleable_ids);
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
    return adopt(std::move(state));
  }

  const KvPagePools& page_pools() const override { return model_->page_pools(); }
  const RequestState* host_state(const EngineRequest& request) const override {
    return &mine(request).state();
  }

 private:
  RequestHandle adopt(RequestState state) const {
    if (draft_ && !state.has_mtp()) state.enable_mtp(config());
    return RequestHandle(std::make_unique<CpuRequest>(this, std::move(state)));
  }
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
  bool draft_;
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
    if (options.draft && !model->has_mtp()) {
      return unimplemented(
          "drafting (speculative decoding) needs the checkpoint's MTP "
          "block; this checkpoint has none");
    }
    return std::unique_ptr<Engine>(std::make_unique<CpuEngine>(std::move(model), options.draft));
  }
  if (const std::string why = kernels::select_cuda_device(options.device.index); !why.empty())
    return unavailable(options.device.name() + " cannot be used: " + why);
  return make_cuda_engine(*model, options);
}

}  // namespace dserve::model

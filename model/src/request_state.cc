#include "dserve/model/request_state.h"

namespace dserve::model {
namespace {
void init_compressor(CompressorState& c, int64_t width, int64_t series, int64_t rate) {
  c.width = width;
  c.series = series;
  c.rate = rate;
}
}  // namespace

RequestState::RequestState(const ModelConfig& config) {
  layers_.resize(static_cast<size_t>(config.num_layers));
  for (int64_t l = 0; l < config.num_layers; ++l) {
    LayerState& s = layers_[static_cast<size_t>(l)];
    s.kind = config.layer_types[static_cast<size_t>(l)];
    s.head_dim = config.head_dim;
    const int64_t rate = config.compress_rate(s.kind);
    if (s.kind == AttentionKind::kCompressed) {
      s.index_head_dim = config.index_head_dim;
      init_compressor(s.kv_compressor, config.head_dim, 2, rate);
      init_compressor(s.index_compressor, config.index_head_dim, 2, rate);
    } else if (s.kind == AttentionKind::kHeavy) {
      init_compressor(s.kv_compressor, config.head_dim, 1, rate);
    }
  }
}

RequestState::PoolBytes RequestState::pool_bytes() const {
  PoolBytes b;
  auto bytes = [](const std::vector<float>& v) { return v.size() * sizeof(float); };
  for (const LayerState& s : layers_) {
    b.window += bytes(s.window);
    b.compressed += bytes(s.compressed);
    b.index_keys += bytes(s.index_keys);
    for (const CompressorState* c : {&s.kv_compressor, &s.index_compressor}) {
      b.compressor += bytes(c->pending_kv) + bytes(c->pending_gate) + bytes(c->overlap_kv) +
                      bytes(c->overlap_gate);
    }
  }
  return b;
}

}  // namespace dserve::model

#include "dserve/model/request_state.h"

#include <algorithm>
#include <string>

#include "dserve/core/check.h"
#include "dserve/kvstore/block.h"

namespace dserve::model {
namespace {
void init_compressor(CompressorState& c, int64_t width, int64_t series, int64_t rate) {
  c.width = width;
  c.series = series;
  c.rate = rate;
}
}  // namespace

KvPagePools KvPagePools::create(const ModelConfig& config) {
  KvPagePools pools;
  pools.compressed.resize(static_cast<size_t>(config.num_layers));
  pools.index_keys.resize(static_cast<size_t>(config.num_layers));
  for (int64_t l = 0; l < config.num_layers; ++l) {
    const AttentionKind kind = config.layer_types[static_cast<size_t>(l)];
    if (kind == AttentionKind::kSliding) continue;
    // A rate that does not divide the block makes pages that do not match blocks; the forward
    // still works, and the prefix store refuses such a model (kvstore_layout).
    const int64_t rate = config.compress_rate(kind);
    DSERVE_CHECK(rate > 0);  // validate_model_config keeps both compress rates positive
    const int64_t per_page = std::max<int64_t>(1, kvstore::kBlockTokens / rate);
    const std::string layer = "layer" + std::to_string(l);
    pools.compressed[static_cast<size_t>(l)] = kvstore::PagePool::create(
        layer + ".compressed", per_page,
        kvstore::RowFormat::entry(config.kv_dtype, config.head_dim, config.rope_head_dim));
    if (kind == AttentionKind::kCompressed) {
      pools.index_keys[static_cast<size_t>(l)] = kvstore::PagePool::create(
          layer + ".index_keys", per_page,
          kvstore::RowFormat::index_key(config.kv_dtype, config.index_head_dim));
    }
  }
  return pools;
}

uint64_t KvPagePools::bytes_in_use() const {
  uint64_t bytes = 0;
  for (const auto* list : {&compressed, &index_keys}) {
    for (const auto& pool : *list)
      bytes += pool ? pool->bytes_in_use() : 0;
  }
  return bytes;
}

RequestState::RequestState(const ModelConfig& config)
    : RequestState(config, KvPagePools::create(config)) {}

RequestState::RequestState(const ModelConfig& config, const KvPagePools& pools) {
  layers_.resize(static_cast<size_t>(config.num_layers));
  for (int64_t l = 0; l < config.num_layers; ++l) {
    LayerState& s = layers_[static_cast<size_t>(l)];
    s.kind = config.layer_types[static_cast<size_t>(l)];
    s.head_dim = config.head_dim;
    const int64_t rate = config.compress_rate(s.kind);
    if (const auto& pool = pools.compressed[static_cast<size_t>(l)]) {
      s.compressed = kvstore::PagedRows(pool);
    }
    if (const auto& pool = pools.index_keys[static_cast<size_t>(l)]) {
      s.index_keys = kvstore::PagedRows(pool);
    }
    if (s.kind == AttentionKind::kCompressed) {
      s.index_head_dim = config.index_head_dim;
      init_compressor(s.kv_compressor, config.head_dim, 2, rate);
      init_compressor(s.index_compressor, config.index_head_dim, 2, rate);
    } else if (s.kind == AttentionKind::kHeavy) {
      init_compressor(s.kv_compressor, config.head_dim, 1, rate);
    }
  }
}

void RequestState::rewind_position(int64_t position) {
  DSERVE_CHECK_MSG(position >= 0 && position <= position_, "a rewind forward");
  position_ = position;
}

MtpState& RequestState::mtp() {
  DSERVE_CHECK_MSG(mtp_.has_value(), "the MTP block's state of a request without one");
  return *mtp_;
}

const MtpState& RequestState::mtp() const {
  DSERVE_CHECK_MSG(mtp_.has_value(), "the MTP block's state of a request without one");
  return *mtp_;
}

void RequestState::enable_mtp(const ModelConfig& config) {
  MtpState m;
  m.layer.kind = AttentionKind::kSliding;
  m.layer.head_dim = config.head_dim;
  m.next_position = position_ + 1;
  mtp_ = std::move(m);
}

RequestState::PoolBytes RequestState::pool_bytes() const {
  PoolBytes b;
  auto bytes = [](const std::vector<float>& v) { return v.size() * sizeof(float); };
  for (const LayerState& s : layers_) {
    b.window += bytes(s.window);
    b.compressed += s.compressed.bytes();
    b.index_keys += s.index_keys.bytes();
    for (const CompressorState* c : {&s.kv_compressor, &s.index_compressor}) {
      b.compressor += bytes(c->pending_kv) + bytes(c->pending_gate) + bytes(c->overlap_kv) +
                      bytes(c->overlap_gate);
    }
  }
  return b;
}

}  // namespace dserve::model

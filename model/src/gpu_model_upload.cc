// GpuModel::create: the weights (converted, or generated for benchmarks), the page pools, the
// request slabs and the activation scratch, put on the device.

#include "gpu_model_impl.h"

namespace dserve::model {

namespace {

// Where create() takes parameter values from: a loaded ModelWeights (converted and copied), or,
// for benchmarks, a seeded generator writing straight into device memory. Shapes always come
// from the config; host tensors must match them.
class Uploader {
 public:
  Uploader(WeightType type, std::optional<uint64_t> random_seed)
      : type_(type), random_seed_(random_seed) {}

  bool random() const { return random_seed_.has_value(); }

  // One Linear weight [rows, cols]: `t`, with `stack` (same cols) appended below it when given.
  // Generated values are uniform with scale 1 / sqrt(cols).
  Result<Weight> matrix(const Tensor* t, const Tensor* stack, int64_t rows, int64_t cols,
                        bool force_fp32 = false) {
    const WeightType type = force_fp32 ? WeightType::kFp32 : type_;
    Weight w;
    if (random()) {
      DSERVE_ASSIGN_OR_RETURN(w.buffer,
                              DeviceBuffer::allocate(static_cast<size_t>(rows * cols) *
                                                     (type == WeightType::kBf16 ? 2 : 4)));
      DSERVE_RETURN_IF_ERROR(cuda::fill_random(w.buffer.data(), type, rows * cols, next_seed(),
                                               1.0f / std::sqrt(static_cast<float>(cols)), 0.0f,
                                               kDefaultStream));
    } else {
      DSERVE_CHECK(t != nullptr);
      DSERVE_CHECK_MSG(t->cols() == cols && (stack == nullptr || stack->cols() == cols) &&
                           t->rows() + (stack != nullptr ? stack->rows() : 0) == rows,
                       "a weight's shape " + t->shape_string() + " disagrees with the config");
      if (type == WeightType::kFp32) {
        std::vector<float> host(t->span().begin(), t->span().end());
        if (stack != nullptr) host.insert(host.end(), stack->span().begin(), stack->span().end());
        DSERVE_ASSIGN_OR_RETURN(w.buffer, DeviceBuffer::from_host<float>(host));
      } else {
        std::vector<uint16_t> host;
        host.reserve(static_cast<size_t>(rows * cols));
        for (float v : t->span())
          host.push_back(f32_to_bf16(v));
        if (stack != nullptr) {
          for (float v : stack->span())
            host.push_back(f32_to_bf16(v));
        }
        DSERVE_ASSIGN_OR_RETURN(w.buffer, DeviceBuffer::from_host<uint16_t>(host));
      }
    }
    w.m = DeviceMatrix{w.buffer.data(), rows, cols, type};
    bytes_ += w.buffer.size_bytes();
    return w;
  }

  // `count` floats: `t`'s, or generated as offset + scale * uniform(-1, 1).
  Result<DeviceBuffer> floats(const Tensor* t, int64_t count, float scale, float offset) {
    DeviceBuffer b;
    if (random()) {
      DSERVE_ASSIGN_OR_RETURN(b, DeviceBuffer::allocate(static_cast<size_t>(count) * 4));
      DSERVE_RETURN_IF_ERROR(cuda::fill_random(b.data(), WeightType::kFp32, count, next_seed(),
                                               scale, offset, kDefaultStream));
    } else {
      DSERVE_CHECK(t != nullptr);
      DSERVE_CHECK_MSG(t->numel() == count,
                       "a parameter's shape " + t->shape_string() + " disagrees with the config");
      DSERVE_ASSIGN_OR_RETURN(b, DeviceBuffer::from_host<float>(t->span()));
    }
    bytes_ += b.size_bytes();
    return b;
  }

  // `count` expert ids: `v`'s, or generated uniform in [0, bound).
  Result<DeviceBuffer> ints(const std::vector<int32_t>* v, int64_t count, int32_t bound) {
    DeviceBuffer b;
    if (random()) {
      DSERVE_ASSIGN_OR_RETURN(b, DeviceBuffer::allocate(static_cast<size_t>(count) * 4));
      DSERVE_RETURN_IF_ERROR(
          cuda::fill_random_ints(b.as<int32_t>(), count, next_seed(), bound, kDefaultStream));
    } else {
      DSERVE_CHECK(v != nullptr && static_cast<int64_t>(v->size()) == count);
      DSERVE_ASSIGN_OR_RETURN(b, DeviceBuffer::from_host<int32_t>(*v));
    }
    bytes_ += b.size_bytes();
    return b;
  }

  size_t bytes() const { return bytes_; }

 private:
  uint64_t next_seed() { return *random_seed_ * 1000003u + ++tensors_; }

  WeightType type_;
  std::optional<uint64_t> random_seed_;
  uint64_t tensors_ = 0;
  size_t bytes_ = 0;
};

Result<DeviceBuffer> scratch_floats(int64_t count) {
  return DeviceBuffer::allocate(static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(float));
}

Result<DeviceBuffer> scratch_ints(int64_t count) {
  return DeviceBuffer::allocate(static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(int32_t));
}

// cos and sin of `table` at every position below `positions`, [positions, half] each.
Status upload_rope(const kernels::RopeTable& table, int64_t positions, DeviceBuffer& cos,
                   DeviceBuffer& sin) {
  const int64_t half = table.rope_dim() / 2;
  std::vector<float> c(static_cast<size_t>(positions * half)), s(c.size());
  for (int64_t p = 0; p < positions; ++p)
    table.angles(p, c.data() + p * half, s.data() + p * half);
  DSERVE_ASSIGN_OR_RETURN(cos, DeviceBuffer::from_host<float>(c));
  DSERVE_ASSIGN_OR_RETURN(sin, DeviceBuffer::from_host<float>(s));
  return Status::ok();
}

}  // namespace

Result<std::unique_ptr<DevicePagePool>> gpu_impl::make_pool(int64_t pages, int64_t rows_per_page,
                                                            int64_t width) {
  auto pool = std::make_unique<DevicePagePool>();
  DSERVE_ASSIGN_OR_RETURN(
      pool->slab,
      DeviceBuffer::allocate(static_cast<size_t>(pages * rows_per_page * width) * sizeof(float)));
  pool->rows_per_page = rows_per_page;
  pool->width = width;
  for (int64_t p = pages - 1; p >= 0; --p)
    pool->free.push_back(static_cast<int32_t>(p));
  return pool;
}

Result<std::unique_ptr<GpuModel>> GpuModel::create(const ModelConfig& config,
                                                   const ModelWeights& weights,
                                                   GpuModelOptions options) {
  DSERVE_CHECK_MSG(static_cast<int64_t>(weights.layers.size()) == config.num_layers,
                   "weights and config disagree on the number of layers");
  return create_on_device(config, &weights, options, std::nullopt);
}

Result<std::unique_ptr<GpuModel>> GpuModel::create_random(const ModelConfig& config,
                                                          GpuModelOptions options, uint64_t seed) {
  return create_on_device(config, nullptr, options, seed);
}

Result<std::unique_ptr<GpuModel>> GpuModel::create_on_device(const ModelConfig& config,
                                                             const ModelWeights* weights,
                                                             GpuModelOptions options,
                                                             std::optional<uint64_t> seed) {
  if (options.max_positions < 1 || options.max_requests < 1 || options.max_chunk_tokens < 1) {
    return invalid_argument(
        "GpuModelOptions: max_positions, max_requests and max_chunk_tokens must be at least 1");
  }
  if (options.max_chunk_tokens > 65535) {
    return invalid_argument("GpuModelOptions: max_chunk_tokens is at most 65535, got " +
                            std::to_string(options.max_chunk_tokens));
  }
  if (const std::string why = kernels::select_cuda_device(options.device); !why.empty())
    return unavailable("no GPU for GpuModel: " + why);
  const kernels::DeviceInfo device = kernels::probe_cuda_device(options.device);
  if (config.hc_mult > cuda::v4_limits::kMaxHyperStreams ||
      config.experts_per_token > cuda::v4_limits::kMaxRoutedPerToken) {
    return unimplemented(
        "GpuModel supports hc_mult up to " + std::to_string(cuda::v4_limits::kMaxHyperStreams) +
        " and experts_per_token up to " + std::to_string(cuda::v4_limits::kMaxRoutedPerToken) +
        ", got " + std::to_string(config.hc_mult) + " and " +
        std::to_string(config.experts_per_token));
  }
  if (options.max_positions > INT32_MAX) {
    return invalid_argument(
        "GpuModelOptions.max_positions is at most 2^31 - 1 (positions are "
        "int32 on the device), got " +
        std::to_string(options.max_positions));
  }
  const size_t indexer_shared =
      cuda::indexer_scores_paged_shared_bytes(config.index_n_heads, config.index_head_dim);
  if (indexer_shared > device.shared_memory_per_block) {
    return unimplemented("the indexer's " + std::to_string(config.index_n_heads) + " heads of " +
                         std::to_string(config.index_head_dim) + " channels need " +
                         std::to_string(indexer_shared) + " bytes of shared memory per block; " +
                         device.name + " has " + std::to_string(device.shared_memory_per_block));
  }
  if (config.hidden_size % 8 != 0 || config.moe_intermediate_size % 8 != 0) {
    return unimplemented(
        "GpuModel's expert products read 8 values at a time: hidden_size and "
        "moe_intermediate_size must be multiples of 8, got " +
        std::to_string(config.hidden_size) + " and " +
        std::to_string(config.moe_intermediate_size));
  }
  if (config.head_dim % 4 != 0 || config.head_dim > cuda::attention_limits::kMaxHeadDim) {
    return unimplemented("GpuModel's attention takes head_dim a multiple of 4 up to " +
                         std::to_string(cuda::attention_limits::kMaxHeadDim) + ", got " +
                         std::to_string(config.head_dim));
  }
  if (options.attention == GpuAttention::kTensorCores && config.head_dim % 64 != 0) {
    return unimplemented("GpuAttention::kTensorCores takes head_dim a multiple of 64, got " +
                         std::to_string(config.head_dim));
  }
  const size_t attention_shared = cuda::sparse_attention_shared_bytes(config.head_dim);
  if (attention_shared > device.shared_memory_per_block) {
    return unimplemented("attention over head_dim " + std::to_string(config.head_dim) + " needs " +
                         std::to_string(attention_shared) + " bytes of shared memory per block; " +
                         device.name + " has " + std::to_string(device.shared_memory_per_block));
  }
  for (int64_t l = 0; l < config.num_layers && weights != nullptr; ++l) {
    if (config.mlp_types[static_cast<size_t>(l)] != RoutingKind::kHash) continue;
    for (const int32_t e : weights->layers[static_cast<size_t>(l)].moe.tid2eid) {
      if (e < 0 || e >= config.n_routed_experts) {
        return invalid_argument("layer " + std::to_string(l) + " tid2eid holds expert id " +
                                std::to_string(e) + ", outside [0, " +
                                std::to_string(config.n_routed_experts) + ")");
      }
    }
  }

  DSERVE_ASSIGN_OR_RETURN(cuda::BlasHandle blas, cuda::BlasHandle::create());
  DSERVE_ASSIGN_OR_RETURN(cuda::OwnedStream own_stream, cuda::OwnedStream::create());
  auto impl = std::make_unique<Impl>(std::move(own_stream), std::move(blas));
  Impl& m = *impl;
  m.config = config;
  m.options = options;
  // What a captured launch may need, granted now (nothing may be asked during a capture).
  DSERVE_RETURN_IF_ERROR(cuda::reserve_shared_memory(attention_shared, indexer_shared));
  constexpr size_t kBlasWorkspace = size_t{32} << 20;
  DSERVE_ASSIGN_OR_RETURN(m.blas_workspace, DeviceBuffer::allocate(kBlasWorkspace));
  DSERVE_RETURN_IF_ERROR(cuda::set_blas_workspace(m.blas, m.blas_workspace.data(), kBlasWorkspace));
  const WeightType type =
      options.weights == GpuWeights::kBf16 ? WeightType::kBf16 : WeightType::kFp32;
  Uploader up(type, seed);

  // Global weights.
  const int64_t hidden_w = config.hidden_size;
  const int64_t hc_w = config.hc_mult;
  m.embed_type = type;
  {
    DSERVE_ASSIGN_OR_RETURN(Weight embed, up.matrix(weights ? &weights->embed : nullptr, nullptr,
                                                    config.vocab_size, hidden_w));
    m.embed = std::move(embed.buffer);
  }
  DSERVE_ASSIGN_OR_RETURN(
      m.head, up.matrix(weights ? &weights->head : nullptr, nullptr, config.vocab_size, hidden_w));
  DSERVE_ASSIGN_OR_RETURN(m.norm, up.floats(weights ? &weights->norm : nullptr, hidden_w, 0, 1));
  const HyperHeadWeights* hh = weights ? &weights->hc_head : nullptr;
  DSERVE_ASSIGN_OR_RETURN(m.hc_head_fn, up.matrix(hh ? &hh->fn : nullptr, nullptr, hc_w,
                                                  hc_w * hidden_w, /*force_fp32=*/true));
  DSERVE_ASSIGN_OR_RETURN(m.hc_head_base, up.floats(hh ? &hh->base : nullptr, hc_w, 0, 0));
  DSERVE_ASSIGN_OR_RETURN(m.hc_head_scale, up.floats(hh ? &hh->scale : nullptr, 1, 0, 1));

  const int64_t inter = config.moe_intermediate_size;
  const int64_t shared_inter = inter * config.n_shared_experts;
  const int64_t max_inter = std::max(inter, shared_inter);
  const int64_t mix_width = (2 + hc_w) * hc_w;
  auto hyper = [&](const HyperConnectionWeights* w) -> Result<HyperDev> {
    HyperDev h;
    DSERVE_ASSIGN_OR_RETURN(h.fn, up.matrix(w ? &w->fn : nullptr, nullptr, mix_width,
                                            hc_w * hidden_w, /*force_fp32=*/true));
    DSERVE_ASSIGN_OR_RETURN(h.base, up.floats(w ? &w->base : nullptr, mix_width, 0, 0));
    DSERVE_ASSIGN_OR_RETURN(h.scale, up.floats(w ? &w->scale : nullptr, 3, 0, 1));
    return h;
  };
  auto compressor = [&](const CompressorWeights* w, int64_t rate, int64_t width,
                        int64_t series) -> Result<CompressorDev> {
    CompressorDev c;
    DSERVE_ASSIGN_OR_RETURN(c.wkv,
                            up.matrix(w ? &w->wkv : nullptr, nullptr, series * width, hidden_w));
    DSERVE_ASSIGN_OR_RETURN(c.wgate,
                            up.matrix(w ? &w->wgate : nullptr, nullptr, series * width, hidden_w));
    DSERVE_ASSIGN_OR_RETURN(c.ape, up.floats(w ? &w->ape : nullptr, rate * series * width, 0, 0));
    DSERVE_ASSIGN_OR_RETURN(c.norm, up.floats(w ? &w->norm : nullptr, width, 0, 1));
    c.rate = rate;
    c.width = width;
    c.series = series;
    return c;
  };
  for (int64_t l = 0; l < config.num_layers; ++l) {
    const LayerWeights* lw = weights ? &weights->layers[static_cast<size_t>(l)] : nullptr;
    const AttentionWeights* a = lw ? &lw->attn : nullptr;
    const MoeWeights* moe = lw ? &lw->moe : nullptr;
    LayerDev d;
    d.kind = config.layer_types[static_cast<size_t>(l)];
    d.routing = config.mlp_types[static_cast<size_t>(l)];
    const int64_t rate = config.compress_rate(d.kind);
    DSERVE_CHECK_MSG(!a || a->compressor.has_value() == (rate > 0),
                     "layer " + std::to_string(l) + ": compressor weights disagree with its type");
    DSERVE_CHECK_MSG(!a || a->indexer.has_value() == (d.kind == AttentionKind::kCompressed),
                     "layer " + std::to_string(l) + ": indexer weights disagree with its type");
    DSERVE_ASSIGN_OR_RETURN(d.attn_norm, up.floats(lw ? &lw->attn_norm : nullptr, hidden_w, 0, 1));
    DSERVE_ASSIGN_OR_RETURN(d.ffn_norm, up.floats(lw ? &lw->ffn_norm : nullptr, hidden_w, 0, 1));
    DSERVE_ASSIGN_OR_RETURN(d.hc_attn, hyper(lw ? &lw->hc_attn : nullptr));
    DSERVE_ASSIGN_OR_RETURN(d.hc_ffn, hyper(lw ? &lw->hc_ffn : nullptr));
    const int64_t heads_hd = config.num_heads * config.head_dim;
    const int64_t grouped_width = config.o_groups * config.o_lora_rank;
    DSERVE_ASSIGN_OR_RETURN(
        d.wq_a, up.matrix(a ? &a->wq_a : nullptr, nullptr, config.q_lora_rank, hidden_w));
    DSERVE_ASSIGN_OR_RETURN(
        d.wq_b, up.matrix(a ? &a->wq_b : nullptr, nullptr, heads_hd, config.q_lora_rank));
    DSERVE_ASSIGN_OR_RETURN(d.wkv,
                            up.matrix(a ? &a->wkv : nullptr, nullptr, config.head_dim, hidden_w));
    DSERVE_ASSIGN_OR_RETURN(d.wo_a, up.matrix(a ? &a->wo_a : nullptr, nullptr, grouped_width,
                                              heads_hd / config.o_groups));
    DSERVE_ASSIGN_OR_RETURN(d.wo_b,
                            up.matrix(a ? &a->wo_b : nullptr, nullptr, hidden_w, grouped_width));
    DSERVE_ASSIGN_OR_RETURN(d.q_norm,
                            up.floats(a ? &a->q_norm : nullptr, config.q_lora_rank, 0, 1));
    DSERVE_ASSIGN_OR_RETURN(d.kv_norm, up.floats(a ? &a->kv_norm : nullptr, config.head_dim, 0, 1));
    DSERVE_ASSIGN_OR_RETURN(d.sinks, up.floats(a ? &a->sinks : nullptr, config.num_heads, 0, 0));
    if (rate > 0) {
      const int64_t series = d.kind == AttentionKind::kCompressed ? 2 : 1;
      DSERVE_ASSIGN_OR_RETURN(
          d.compressor, compressor(a ? &*a->compressor : nullptr, rate, config.head_dim, series));
    }
    if (d.kind == AttentionKind::kCompressed) {
      const IndexerWeights* ix = a ? &*a->indexer : nullptr;
      DSERVE_ASSIGN_OR_RETURN(d.index_compressor, compressor(ix ? &ix->compressor : nullptr, rate,
                                                             config.index_head_dim, 2));
      DSERVE_ASSIGN_OR_RETURN(d.index_wq_b, up.matrix(ix ? &ix->wq_b : nullptr, nullptr,
                                                      config.index_n_heads * config.index_head_dim,
                                                      config.q_lora_rank));
      DSERVE_ASSIGN_OR_RETURN(
          d.index_weights_proj,
          up.matrix(ix ? &ix->weights_proj : nullptr, nullptr, config.index_n_heads, hidden_w));
    }
    const int64_t experts = config.n_routed_experts;
    DSERVE_ASSIGN_OR_RETURN(d.router, up.matrix(moe ? &moe->gate : nullptr, nullptr, experts,
                                                hidden_w, /*force_fp32=*/true));
    if (moe ? !moe->bias.empty() : d.routing == RoutingKind::kTopK) {
      DSERVE_ASSIGN_OR_RETURN(d.router_bias, up.floats(moe ? &moe->bias : nullptr, experts, 0, 0));
    }
    if (d.routing == RoutingKind::kHash) {
      DSERVE_ASSIGN_OR_RETURN(d.tid2eid, up.ints(moe ? &moe->tid2eid : nullptr,
                                                 config.vocab_size * config.experts_per_token,
                                                 static_cast<int32_t>(experts)));
    }
    for (int64_t e = 0; e < experts; ++e) {
      const ExpertWeights* ew = moe ? &moe->experts[static_cast<size_t>(e)] : nullptr;
      DSERVE_ASSIGN_OR_RETURN(Weight w13, up.matrix(ew ? &ew->w1 : nullptr, ew ? &ew->w3 : nullptr,
                                                    2 * inter, hidden_w));
      DSERVE_ASSIGN_OR_RETURN(Weight w2,
                              up.matrix(ew ? &ew->w2 : nullptr, nullptr, hidden_w, inter));
      d.expert_w13.push_back(std::move(w13));
      d.expert_w2.push_back(std::move(w2));
    }
    std::vector<const void*> w13_ptrs, w2_ptrs;
    for (int64_t e = 0; e < experts; ++e) {
      w13_ptrs.push_back(d.expert_w13[static_cast<size_t>(e)].m.data);
      w2_ptrs.push_back(d.expert_w2[static_cast<size_t>(e)].m.data);
    }
    DSERVE_ASSIGN_OR_RETURN(d.expert_w13_ptrs, DeviceBuffer::from_host<const void*>(w13_ptrs));
    DSERVE_ASSIGN_OR_RETURN(d.expert_w2_ptrs, DeviceBuffer::from_host<const void*>(w2_ptrs));
    const ExpertWeights* sw = moe ? &moe->shared : nullptr;
    DSERVE_ASSIGN_OR_RETURN(d.shared_w13, up.matrix(sw ? &sw->w1 : nullptr, sw ? &sw->w3 : nullptr,
                                                    2 * shared_inter, hidden_w));
    DSERVE_ASSIGN_OR_RETURN(d.shared_w2,
                            up.matrix(sw ? &sw->w2 : nullptr, nullptr, hidden_w, shared_inter));
    d.shared_inter = shared_inter;
    m.layers.push_back(std::move(d));
  }
  m.weight_bytes = up.bytes();

  // RoPE tables.
  const int64_t positions = options.max_positions;
  const detail::RopeTables tables = detail::rope_tables(config);
  DSERVE_RETURN_IF_ERROR(upload_rope(tables.main, positions, m.main_cos, m.main_sin));
  DSERVE_RETURN_IF_ERROR(upload_rope(tables.compress, positions, m.compress_cos, m.compress_sin));
  const int64_t half = config.rope_head_dim / 2;
  m.main_rope = {m.main_cos.as<float>(), m.main_sin.as<float>(), half, positions};
  m.compress_rope = {m.compress_cos.as<float>(), m.compress_sin.as<float>(), half, positions};

  // Page pools: a page holds one 128-token block's rows (one row at least), and there are
  // pages for max_requests requests at max_positions.
  m.compressed_pools.resize(static_cast<size_t>(config.num_layers));
  m.index_pools.resize(static_cast<size_t>(config.num_layers));
  for (int64_t l = 0; l < config.num_layers; ++l) {
    const LayerDev& d = m.layers[static_cast<size_t>(l)];
    const int64_t rate = config.compress_rate(d.kind);
    if (rate == 0) continue;
    const int64_t rows = std::max<int64_t>(kvstore::kBlockTokens / rate, 1);
    const int64_t pages = max_pages_per_request(positions, rate, rows) * options.max_requests;
    DSERVE_ASSIGN_OR_RETURN(m.compressed_pools[static_cast<size_t>(l)],
                            make_pool(pages, rows, config.head_dim));
    m.pool_bytes += m.compressed_pools[static_cast<size_t>(l)]->slab.size_bytes();
    if (d.index_compressor) {
      DSERVE_ASSIGN_OR_RETURN(m.index_pools[static_cast<size_t>(l)],
                              make_pool(pages, rows, config.index_head_dim));
      m.pool_bytes += m.index_pools[static_cast<size_t>(l)]->slab.size_bytes();
    }
  }

  // Slot-indexed request state: window rings, compressor buffers, block tables.
  const int64_t slots = options.max_requests;
  for (int64_t s = slots - 1; s >= 0; --s)
    m.free_slots.push_back(static_cast<int32_t>(s));
  m.slabs.resize(static_cast<size_t>(config.num_layers));
  auto compressor_slab = [slots](const CompressorDev& d) -> Result<CompressorSlab> {
    CompressorSlab b;
    const int64_t row = d.series * d.width;
    DSERVE_ASSIGN_OR_RETURN(b.pending_kv, scratch_floats(slots * d.rate * row));
    DSERVE_ASSIGN_OR_RETURN(b.pending_gate, scratch_floats(slots * d.rate * row));
    DSERVE_ASSIGN_OR_RETURN(b.overlap_kv, scratch_floats(slots * d.rate * d.width));
    DSERVE_ASSIGN_OR_RETURN(b.overlap_gate, scratch_floats(slots * d.rate * d.width));
    return b;
  };
  auto table_slab = [slots, positions](int64_t rate,
                                       const DevicePagePool& pool) -> Result<TableSlab> {
    TableSlab t;
    t.stride = max_pages_per_request(positions, rate, pool.rows_per_page);
    DSERVE_ASSIGN_OR_RETURN(t.tables, scratch_ints(slots * t.stride));
    return t;
  };
  for (int64_t l = 0; l < config.num_layers; ++l) {
    const LayerDev& d = m.layers[static_cast<size_t>(l)];
    LayerSlabs& slab = m.slabs[static_cast<size_t>(l)];
    DSERVE_ASSIGN_OR_RETURN(slab.windows,
                            scratch_floats(slots * config.sliding_window * config.head_dim));
    if (d.compressor) {
      DSERVE_ASSIGN_OR_RETURN(slab.kv_compressor, compressor_slab(*d.compressor));
      DSERVE_ASSIGN_OR_RETURN(
          slab.compressed,
          table_slab(d.compressor->rate, *m.compressed_pools[static_cast<size_t>(l)]));
    }
    if (d.index_compressor) {
      DSERVE_ASSIGN_OR_RETURN(slab.index_compressor, compressor_slab(*d.index_compressor));
      DSERVE_ASSIGN_OR_RETURN(slab.index_keys, table_slab(d.index_compressor->rate,
                                                          *m.index_pools[static_cast<size_t>(l)]));
    }
  }

  // A generated model's request state is generated too, so that assume_context() can hand out
  // long contexts without running them (the values only have to be finite).
  if (seed) {
    m.random_state = true;
    uint64_t state_seed = *seed * 7919u;
    auto fill = [&](DeviceBuffer& b) {
      return cuda::fill_random(b.data(), WeightType::kFp32,
                               static_cast<int64_t>(b.size_bytes() / sizeof(float)), ++state_seed,
                               1.0f, 0.0f, kDefaultStream);
    };
    for (auto* pools : {&m.compressed_pools, &m.index_pools}) {
      for (auto& pool : *pools) {
        if (pool) DSERVE_RETURN_IF_ERROR(fill(pool->slab));
      }
    }
    for (LayerSlabs& slab : m.slabs) {
      DSERVE_RETURN_IF_ERROR(fill(slab.windows));
      for (CompressorSlab* c : {&slab.kv_compressor, &slab.index_compressor}) {
        for (DeviceBuffer* b :
             {&c->pending_kv, &c->pending_gate, &c->overlap_kv, &c->overlap_gate}) {
          if (b->size_bytes() > 0) DSERVE_RETURN_IF_ERROR(fill(*b));
        }
      }
    }
  }

  // Scratch.
  const int64_t c = options.max_chunk_tokens;
  const int64_t hidden = config.hidden_size;
  const int64_t hc = config.hc_mult;
  const int64_t heads = config.num_heads;
  const int64_t hd = config.head_dim;
  const int64_t k = config.experts_per_token;
  const int64_t ih = config.index_n_heads;
  const int64_t ihd = config.index_head_dim;
  const int64_t entries = m.index_entries_max();
  m.chunk = c;
  m.indexer_tile = std::clamp<int64_t>(
      kIndexerTileFloats / std::max<int64_t>(ih * std::max<int64_t>(entries, 1), 1), 1, c);
  m.logits_tile = std::clamp<int64_t>(kLogitsTileFloats / config.vocab_size, 1, c);
  DSERVE_ASSIGN_OR_RETURN(m.tokens, scratch_ints(c));
  DSERVE_ASSIGN_OR_RETURN(m.window_counts, scratch_ints(2));
  for (DeviceBuffer* rows :
       {&m.row_position, &m.row_slot, &m.row_first_pos, &m.row_first_row, &m.row_end_pos}) {
    DSERVE_ASSIGN_OR_RETURN(*rows, scratch_ints(c));
  }
  // A batch closes at most one window per row (c); the max_requests more are slack.
  for (DeviceBuffer* windows : {&m.csa_windows, &m.hca_windows}) {
    DSERVE_ASSIGN_OR_RETURN(*windows, DeviceBuffer::allocate((static_cast<size_t>(c + slots)) *
                                                             sizeof(cuda::ClosedWindow)));
  }
  DSERVE_ASSIGN_OR_RETURN(m.streams, scratch_floats(c * hc * hidden));
  DSERVE_ASSIGN_OR_RETURN(m.flat, scratch_floats(c * hc * hidden));
  DSERVE_ASSIGN_OR_RETURN(m.mix, scratch_floats(c * (2 + hc) * hc));
  DSERVE_ASSIGN_OR_RETURN(m.pre, scratch_floats(c * hc));
  DSERVE_ASSIGN_OR_RETURN(m.post, scratch_floats(c * hc));
  DSERVE_ASSIGN_OR_RETURN(m.comb, scratch_floats(c * hc * hc));
  DSERVE_ASSIGN_OR_RETURN(m.x, scratch_floats(c * hidden));
  DSERVE_ASSIGN_OR_RETURN(m.sublayer_out, scratch_floats(c * hidden));
  DSERVE_ASSIGN_OR_RETURN(m.q_residual, scratch_floats(c * config.q_lora_rank));
  DSERVE_ASSIGN_OR_RETURN(m.q, scratch_floats(c * heads * hd));
  DSERVE_ASSIGN_OR_RETURN(m.chunk_kv, scratch_floats(c * hd));
  DSERVE_ASSIGN_OR_RETURN(m.attn_out, scratch_floats(c * heads * hd));
  DSERVE_ASSIGN_OR_RETURN(m.grouped, scratch_floats(c * config.o_groups * config.o_lora_rank));
  DSERVE_ASSIGN_OR_RETURN(m.comp_kv, scratch_floats(c * 2 * std::max(hd, ihd)));
  DSERVE_ASSIGN_OR_RETURN(m.comp_gate, scratch_floats(c * 2 * std::max(hd, ihd)));
  DSERVE_ASSIGN_OR_RETURN(m.index_q, scratch_floats(c * ih * ihd));
  DSERVE_ASSIGN_OR_RETURN(m.index_weights, scratch_floats(c * ih));
  DSERVE_ASSIGN_OR_RETURN(m.index_keys, scratch_floats(entries * ihd));
  if (type == WeightType::kBf16) {
    DSERVE_ASSIGN_OR_RETURN(
        m.index_keys16,
        DeviceBuffer::allocate(static_cast<size_t>(entries * ihd) * sizeof(uint16_t)));
  }
  DSERVE_ASSIGN_OR_RETURN(m.index_dots, scratch_floats(m.indexer_tile * ih * entries));
  DSERVE_ASSIGN_OR_RETURN(m.index_scores, scratch_floats(m.indexer_tile * entries));
  DSERVE_ASSIGN_OR_RETURN(m.selected, scratch_ints(c * config.index_topk));
  DSERVE_ASSIGN_OR_RETURN(m.selected_counts, scratch_ints(c));
  DSERVE_ASSIGN_OR_RETURN(m.router, scratch_floats(c * config.n_routed_experts));
  DSERVE_ASSIGN_OR_RETURN(m.route_ids, scratch_ints(c * k));
  DSERVE_ASSIGN_OR_RETURN(m.route_weights, scratch_floats(c * k));
  DSERVE_ASSIGN_OR_RETURN(m.perm_rows, scratch_ints(c * k));
  DSERVE_ASSIGN_OR_RETURN(m.combine_slots, scratch_ints(c * k));
  DSERVE_ASSIGN_OR_RETURN(m.combine_weights, scratch_floats(c * k));
  DSERVE_ASSIGN_OR_RETURN(m.moe_offsets, scratch_ints(config.n_routed_experts + 1));
  DSERVE_ASSIGN_OR_RETURN(m.moe_active, scratch_ints(config.n_routed_experts));
  DSERVE_ASSIGN_OR_RETURN(m.moe_active_count, scratch_ints(1));
  DSERVE_ASSIGN_OR_RETURN(m.moe_slot_of, scratch_ints(c * k));
  DSERVE_ASSIGN_OR_RETURN(m.moe_active_total, scratch_ints(1));
  DSERVE_ASSIGN_OR_RETURN(m.xs, scratch_floats(c * k * hidden));
  DSERVE_ASSIGN_OR_RETURN(m.gate_up, scratch_floats(c * k * 2 * config.moe_intermediate_size));
  DSERVE_ASSIGN_OR_RETURN(m.hidden_act, scratch_floats(c * k * config.moe_intermediate_size));
  DSERVE_ASSIGN_OR_RETURN(m.ys, scratch_floats(c * k * hidden));
  DSERVE_ASSIGN_OR_RETURN(m.shared_gate_up, scratch_floats(c * 2 * max_inter));
  DSERVE_ASSIGN_OR_RETURN(m.shared_act, scratch_floats(c * max_inter));
  DSERVE_ASSIGN_OR_RETURN(m.shared_out, scratch_floats(c * hidden));
  DSERVE_ASSIGN_OR_RETURN(m.final_hidden, scratch_floats(m.logits_tile * hidden));
  DSERVE_ASSIGN_OR_RETURN(m.logits, scratch_floats(m.logits_tile * config.vocab_size));
  DSERVE_ASSIGN_OR_RETURN(m.greedy, scratch_ints(m.logits_tile));
  if (type == WeightType::kBf16) {
    // The widest input any bf16 linear rounds: n rows times its input width.
    const int64_t widest = std::max({c * hidden, c * config.q_lora_rank, c * heads * hd,
                                     c * config.o_groups * config.o_lora_rank, c * k * hidden,
                                     c * k * config.moe_intermediate_size, c * max_inter,
                                     m.logits_tile * hidden, m.indexer_tile * ih * ihd});
    DSERVE_ASSIGN_OR_RETURN(m.bf16_scratch,
                            DeviceBuffer::allocate(static_cast<size_t>(widest) * sizeof(uint16_t)));
  }
  return std::unique_ptr<GpuModel>(new GpuModel(std::move(impl)));
}

}  // namespace dserve::model

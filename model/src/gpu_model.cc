// GpuModel: Model::forward (model.cc and the sublayers in layers.h) as a sequence of CUDA
// launches on the default stream. Each step names its CPU twin; the order of operations inside
// every kernel follows the CPU code, so fp32 weights give the CPU's logits to rounding.

#include "dserve/model/gpu_model.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "block_quant.h"
#include "dserve/kernels/cuda_model_ops.h"
#include "dserve/kernels/cuda_ops.h"
#include "dserve/kernels/device.h"
#include "dserve/kernels/rope.h"
#include "dserve/kvstore/block.h"
#include "layers.h"
#include "number_formats.h"

namespace dserve::model {
namespace cuda = kernels::cuda;
using cuda::DeviceBuffer;
using cuda::DeviceMatrix;
using cuda::WeightType;

namespace {

// The legacy default stream: weight generation at creation. Everything after runs on the
// model's own (blocking) stream, which synchronous copies order with as well.
constexpr cuda::CudaStream kDefaultStream{};
// Scratch the indexer's head products may take per query tile (floats).
constexpr int64_t kIndexerTileFloats = int64_t{32} << 20;
// Scratch the logits may take per tile of output rows (floats).
constexpr int64_t kLogitsTileFloats = int64_t{64} << 20;
// Routed (token, expert) pairs up to which the grouping stays on the device (decode batches),
// as far as moe_group's one block can hold them next to the expert counts.
constexpr int64_t kDeviceGroupingPairs = 2048;
int64_t device_grouping_pairs(int64_t experts) {
  return std::clamp<int64_t>(cuda::kMoeGroupMaxInts - experts, 0, kDeviceGroupingPairs);
}

// Pages one request at max_positions needs in a pool of rows_per_page rows for rate `rate`.
int64_t max_pages_per_request(int64_t max_positions, int64_t rate, int64_t rows_per_page) {
  return std::max<int64_t>(ceil_div(max_positions / rate, rows_per_page), 1);
}

// A device weight and its view.
struct Weight {
  DeviceBuffer buffer;
  DeviceMatrix m;
};

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

struct HyperDev {
  Weight fn;  // fp32
  DeviceBuffer base, scale;
};

struct CompressorDev {
  Weight wkv, wgate;
  DeviceBuffer ape, norm;
  int64_t rate = 0, width = 0, series = 1;
};

struct LayerDev {
  AttentionKind kind = AttentionKind::kSliding;
  RoutingKind routing = RoutingKind::kTopK;
  DeviceBuffer attn_norm, ffn_norm;
  HyperDev hc_attn, hc_ffn;
  Weight wq_a, wq_b, wkv, wo_a, wo_b;
  DeviceBuffer q_norm, kv_norm, sinks;
  std::optional<CompressorDev> compressor;
  std::optional<CompressorDev> index_compressor;
  Weight index_wq_b, index_weights_proj;
  Weight router;  // fp32: routing decisions must not move with the weight format
  DeviceBuffer router_bias, tid2eid;
  std::vector<Weight> expert_w13, expert_w2;     // gate and up stacked: [2 * inter, hidden]
  DeviceBuffer expert_w13_ptrs, expert_w2_ptrs;  // their device addresses, for the decode path
  Weight shared_w13, shared_w2;
  int64_t shared_inter = 0;
};

// Fixed-size pages of rows in one device slab, handed out by index.
struct DevicePagePool {
  DeviceBuffer slab;
  int64_t rows_per_page = 0;
  int64_t width = 0;
  std::vector<int32_t> free;  // a stack of page indices

  float* base() const { return slab.as<float>(); }
};

Result<std::unique_ptr<DevicePagePool>> make_pool(int64_t pages, int64_t rows_per_page,
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

}  // namespace

// --- request state -------------------------------------------------------------------------

namespace {

// A request's rows in one layer's pool: its pages in order, mirrored in its slot's row of the
// layer's block-table slab (uploaded up to `uploaded`).
struct PageList {
  std::vector<int32_t> pages;
  size_t uploaded = 0;
};

struct LayerPages {
  PageList compressed, index_keys;
};

// Per layer, the slot-indexed device state of every request.
struct CompressorSlab {
  DeviceBuffer pending_kv, pending_gate, overlap_kv, overlap_gate;
};
struct TableSlab {
  DeviceBuffer tables;  // int32 [slots, stride]
  int64_t stride = 0;
};
struct LayerSlabs {
  DeviceBuffer windows;  // [slots, sliding_window, head_dim]
  CompressorSlab kv_compressor, index_compressor;
  TableSlab compressed, index_keys;
};

}  // namespace

struct GpuRequestState::Impl {
  GpuModel::Impl* owner = nullptr;
  int32_t slot = -1;
  int64_t position = 0;
  std::vector<LayerPages> layers;

  ~Impl();  // gives the slot and the pages back (defined after GpuModel::Impl)
};

GpuRequestState::GpuRequestState() = default;
GpuRequestState::~GpuRequestState() = default;
GpuRequestState::GpuRequestState(GpuRequestState&&) noexcept = default;
GpuRequestState& GpuRequestState::operator=(GpuRequestState&&) noexcept = default;
int64_t GpuRequestState::position() const {
  return impl_ ? impl_->position : 0;
}

// --- the model -------------------------------------------------------------------------------

struct GpuModel::Impl {
  Impl(cuda::OwnedStream own_stream, cuda::BlasHandle handle)
      : owned_stream(std::move(own_stream)), stream_(owned_stream.get()), blas(std::move(handle)) {}

  ModelConfig config;
  GpuModelOptions options;
  // The stream outlives the cuBLAS handle that uses it (members die in reverse order).
  cuda::OwnedStream owned_stream;
  cuda::CudaStream stream_;
  cuda::BlasHandle blas;
  DeviceBuffer blas_workspace;
  // Decode steps replayed as graphs, one per batch size, and whether the batch being built is
  // one (its launches then take the fixed bounds below instead of this batch's own).
  std::map<int64_t, cuda::CapturedGraph> decode_graphs;
  bool graph_batch = false;
  // The batch is a decode step: the indexer scores through the block tables whatever the batch
  // size, so that a request's picks do not depend on how many others decode with it.
  bool decode_batch = false;
  std::map<int64_t, Status> graph_failures;  // batch sizes whose capture failed: run eagerly
  std::set<int64_t> eager_sizes;             // batch sizes that have run a step
  DeviceBuffer window_counts;                // int32 [2]: windows closed per rate (CSA, HCA)
  size_t weight_bytes = 0;
  size_t pool_bytes = 0;

  // Weights.
  DeviceBuffer embed;
  WeightType embed_type = WeightType::kFp32;
  Weight head;
  DeviceBuffer norm;
  Weight hc_head_fn;
  DeviceBuffer hc_head_base, hc_head_scale;
  std::vector<LayerDev> layers;

  // RoPE tables [max_positions, half] (main, compress).
  DeviceBuffer main_cos, main_sin, compress_cos, compress_sin;
  cuda::RopeView main_rope, compress_rope;

  // Page pools per layer (null where a layer has none), and the slot-indexed request state.
  std::vector<std::unique_ptr<DevicePagePool>> compressed_pools, index_pools;
  std::vector<LayerSlabs> slabs;
  std::vector<int32_t> free_slots;
  bool random_state = false;  // made by create_random: states may assume a context

  // The batch being run: per-row facts (BatchRows) and the windows it closes per rate.
  DeviceBuffer row_position, row_slot, row_first_pos, row_first_row, row_end_pos;
  DeviceBuffer csa_windows, hca_windows;  // ClosedWindow [chunk + max_requests]
  int64_t csa_window_count = 0, hca_window_count = 0;
  int64_t batch_requests = 0;          // requests in the batch
  int64_t batch_max_end = 0;           // the largest end position of a request in it
  int32_t batch_single_slot = 0;       // the slot, when batch_requests == 1
  int64_t batch_distinct_experts = 0;  // routed experts with rows, summed over the layers

  // Activation scratch, sized for max_chunk_tokens (C) tokens.
  int64_t chunk = 0;
  int64_t indexer_tile = 0;
  int64_t logits_tile = 0;
  DeviceBuffer tokens;                                      // int32 [C]
  DeviceBuffer streams, flat, mix, pre, post, comb;         // mHC
  DeviceBuffer x, sublayer_out;                             // [C, hidden]
  DeviceBuffer q_residual, q, chunk_kv, attn_out, grouped;  // attention
  DeviceBuffer comp_kv, comp_gate;                          // [C, 2 * max compressor width]
  DeviceBuffer index_q, index_weights, index_keys, index_dots, index_scores;
  DeviceBuffer index_keys16;  // the gathered keys rounded to bf16 (bf16 weights only)
  DeviceBuffer selected, selected_counts;
  DeviceBuffer router, route_ids, route_weights;  // MoE
  DeviceBuffer perm_rows, combine_slots, combine_weights;
  DeviceBuffer moe_offsets, moe_active, moe_active_count, moe_slot_of, moe_active_total;
  DeviceBuffer xs, gate_up, hidden_act, ys, shared_gate_up, shared_act, shared_out;
  DeviceBuffer final_hidden, logits, greedy;
  DeviceBuffer bf16_scratch;

  int64_t index_entries_max() const {
    return config.csa_rate > 0 ? options.max_positions / config.csa_rate : 0;
  }
  uint16_t* scratch16() const { return bf16_scratch.as<uint16_t>(); }

  Status linear(const float* x_in, int64_t n, const Weight& w, float* y) const {
    return cuda::linear(blas, x_in, n, w.m, y, w.m.rows, scratch16(), stream_);
  }

  // One request's share of a batch: its state and its next tokens.
  struct Segment {
    GpuRequestState::Impl* state;
    std::span<const int32_t> tokens;
  };

  // The batch's per-row facts from row first_row on. The first_row values stay absolute batch
  // indices: only views at 0 may be used where they matter (compressor, attention, window).
  cuda::BatchRows batch_rows(int64_t first_row = 0) const {
    return cuda::BatchRows{
        row_position.as<int32_t>() + first_row, row_slot.as<int32_t>() + first_row,
        row_first_pos.as<int32_t>() + first_row, row_first_row.as<int32_t>() + first_row,
        row_end_pos.as<int32_t>() + first_row};
  }
  cuda::PagedRowsView paged(const DevicePagePool& pool, const TableSlab& table) const {
    return cuda::PagedRowsView{pool.base(), table.tables.as<int32_t>(), table.stride,
                               pool.rows_per_page, pool.width};
  }
  void release(GpuRequestState::Impl& state);
  GpuRequestState::Impl& state_of(GpuRequestState& state) const;

  Status check_tokens(std::span<const int32_t> input, int64_t position) const;
  Status reserve_pages(std::span<const Segment> segments);
  Status run_batch(std::span<const Segment> segments);
  Result<int64_t> prepare_batch(std::span<const Segment> segments);
  Status run_layers(int64_t n);
  template <typename AfterPass>
  Status run_passes(std::span<const int32_t> input, GpuRequestState& state, AfterPass after_pass);
  Status decode_rows(std::span<GpuRequestState* const> states, std::span<const int32_t> tokens);
  Status decode_step(std::span<const Segment> segments);
  Status attention(int64_t l, int64_t n);

  Status moe(int64_t l, int64_t n);
  Status routed_experts_on_device(const LayerDev& d, int64_t n);
  Status routed_experts_through_host(const LayerDev& d, int64_t n);
  Status hyper_in(const HyperDev& hc, const DeviceBuffer& norm_weight, int64_t n);
  Status final_rows(int64_t first_row, int64_t rows, float* logits_out);
};

namespace {

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
  const kernels::DeviceInfo device = kernels::probe_cuda_device();
  if (!device.available) return unavailable("no GPU for GpuModel: " + device.why_unavailable);
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

GpuModel::GpuModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuModel::~GpuModel() = default;
const ModelConfig& GpuModel::config() const {
  return impl_->config;
}
const GpuModelOptions& GpuModel::options() const {
  return impl_->options;
}
size_t GpuModel::weight_bytes() const {
  return impl_->weight_bytes;
}
size_t GpuModel::pool_bytes() const {
  return impl_->pool_bytes;
}

GpuRequestState::Impl::~Impl() {
  if (owner != nullptr) owner->release(*this);
}

void GpuModel::Impl::release(GpuRequestState::Impl& state) {
  for (size_t l = 0; l < state.layers.size(); ++l) {
    for (auto [list, pool] : {std::pair{&state.layers[l].compressed, compressed_pools[l].get()},
                              std::pair{&state.layers[l].index_keys, index_pools[l].get()}}) {
      if (pool != nullptr)
        pool->free.insert(pool->free.end(), list->pages.begin(), list->pages.end());
    }
  }
  free_slots.push_back(state.slot);
}

Result<GpuRequestState> GpuModel::new_state() {
  Impl& m = *impl_;
  if (m.free_slots.empty()) {
    return resource_exhausted("every one of the GpuModel's " +
                              std::to_string(m.options.max_requests) +
                              " request slots is taken (GpuModelOptions.max_requests)");
  }
  GpuRequestState state;
  state.impl_ = std::make_unique<GpuRequestState::Impl>();
  state.impl_->owner = &m;
  state.impl_->slot = m.free_slots.back();
  m.free_slots.pop_back();
  state.impl_->layers.resize(static_cast<size_t>(m.config.num_layers));
  return state;
}

Status GpuModel::Impl::check_tokens(std::span<const int32_t> input, int64_t position) const {
  if (input.empty()) return invalid_argument("forward: the chunk has no tokens");
  DSERVE_RETURN_IF_ERROR(detail::check_token_ids(input, config.vocab_size));
  const int64_t end = position + static_cast<int64_t>(input.size());
  if (end > options.max_positions) {
    return out_of_range("forward: the request would reach position " + std::to_string(end) +
                        ", past this GpuModel's max_positions " +
                        std::to_string(options.max_positions));
  }
  return Status::ok();
}

// Takes the pages every segment's lists need to hold the rows of its positions after the batch,
// and uploads the new block-table entries. On failure gives back everything it took this call
// and reports which pool ran out; the states are as before.
Status GpuModel::Impl::reserve_pages(std::span<const Segment> segments) {
  std::vector<std::pair<PageList*, size_t>> taken;  // list, its size before this call
  std::vector<DevicePagePool*> taken_from;
  Status failure = Status::ok();
  for (const Segment& seg : segments) {
    const int64_t end_pos = seg.state->position + static_cast<int64_t>(seg.tokens.size());
    for (int64_t l = 0; l < config.num_layers && failure.is_ok(); ++l) {
      const int64_t rate = config.compress_rate(layers[static_cast<size_t>(l)].kind);
      LayerPages& lp = seg.state->layers[static_cast<size_t>(l)];
      for (auto [list, pool] :
           {std::pair{&lp.compressed, compressed_pools[static_cast<size_t>(l)].get()},
            std::pair{&lp.index_keys, index_pools[static_cast<size_t>(l)].get()}}) {
        if (pool == nullptr) continue;
        const auto pages = static_cast<size_t>(ceil_div(end_pos / rate, pool->rows_per_page));
        if (list->pages.size() >= pages) continue;
        taken.emplace_back(list, list->pages.size());
        taken_from.push_back(pool);
        while (list->pages.size() < pages) {
          if (pool->free.empty()) {
            failure = resource_exhausted(
                "GPU page pool of layer " + std::to_string(l) + " is full (max_requests " +
                std::to_string(options.max_requests) + " at max_positions " +
                std::to_string(options.max_positions) + ")");
            break;
          }
          list->pages.push_back(pool->free.back());
          pool->free.pop_back();
        }
        if (!failure.is_ok()) break;
      }
    }
    if (!failure.is_ok()) break;
  }
  if (!failure.is_ok()) {
    for (size_t i = taken.size(); i-- > 0;) {
      auto [list, before] = taken[i];
      DevicePagePool* pool = taken_from[i];
      for (size_t k = before; k < list->pages.size(); ++k)
        pool->free.push_back(list->pages[k]);
      list->pages.resize(before);
    }
    return failure;
  }
  // The new entries of each slot's block-table row.
  for (const Segment& seg : segments) {
    for (int64_t l = 0; l < config.num_layers; ++l) {
      LayerPages& lp = seg.state->layers[static_cast<size_t>(l)];
      LayerSlabs& slab = slabs[static_cast<size_t>(l)];
      for (auto [list, table] : {std::pair{&lp.compressed, &slab.compressed},
                                 std::pair{&lp.index_keys, &slab.index_keys}}) {
        if (list->uploaded == list->pages.size()) continue;
        const size_t offset =
            (static_cast<size_t>(seg.state->slot) * static_cast<size_t>(table->stride) +
             list->uploaded) *
            sizeof(int32_t);
        DSERVE_RETURN_IF_ERROR(table->tables.copy_from_host(
            list->pages.data() + list->uploaded,
            (list->pages.size() - list->uploaded) * sizeof(int32_t), offset));
        list->uploaded = list->pages.size();
      }
    }
  }
  return Status::ok();
}

// mHC in around one sublayer (hyper_connection_in + the sublayer's RMSNorm): x = the normed
// collapse of the streams; pre/post/comb for hyper_expand.
Status GpuModel::Impl::hyper_in(const HyperDev& hcw, const DeviceBuffer& norm_weight, int64_t n) {
  const int64_t hc = config.hc_mult;
  const int64_t hidden = config.hidden_size;
  DSERVE_RETURN_IF_ERROR(cuda::rms_norm_to(streams.as<float>(), flat.as<float>(), n, hc * hidden,
                                           nullptr, static_cast<float>(config.rms_norm_eps),
                                           stream_));
  DSERVE_RETURN_IF_ERROR(linear(flat.as<float>(), n, hcw.fn, mix.as<float>()));
  DSERVE_RETURN_IF_ERROR(cuda::hyper_mix(mix.as<float>(), hcw.base.as<float>(),
                                         hcw.scale.as<float>(), n, hc, config.hc_sinkhorn_iters,
                                         static_cast<float>(config.hc_eps), pre.as<float>(),
                                         post.as<float>(), comb.as<float>(), stream_));
  DSERVE_RETURN_IF_ERROR(cuda::hyper_collapse(streams.as<float>(), pre.as<float>(), n, hc, hidden,
                                              x.as<float>(), stream_));
  return cuda::rms_norm(x.as<float>(), n, hidden, norm_weight.as<float>(),
                        static_cast<float>(config.rms_norm_eps), stream_);
}

// attention() of attention.cc for the batch: x -> sublayer_out.
Status GpuModel::Impl::attention(int64_t l, int64_t n) {
  const LayerDev& d = layers[static_cast<size_t>(l)];
  LayerSlabs& slab = slabs[static_cast<size_t>(l)];
  const int64_t heads = config.num_heads;
  const int64_t hd = config.head_dim;
  const auto eps = static_cast<float>(config.rms_norm_eps);
  const cuda::RopeView& rope = d.kind == AttentionKind::kSliding ? main_rope : compress_rope;
  const int32_t* positions = row_position.as<int32_t>();
  const cuda::BatchRows rows = batch_rows();

  DSERVE_RETURN_IF_ERROR(linear(x.as<float>(), n, d.wq_a, q_residual.as<float>()));
  DSERVE_RETURN_IF_ERROR(cuda::rms_norm(q_residual.as<float>(), n, config.q_lora_rank,
                                        d.q_norm.as<float>(), eps, stream_));
  DSERVE_RETURN_IF_ERROR(linear(q_residual.as<float>(), n, d.wq_b, q.as<float>()));
  DSERVE_RETURN_IF_ERROR(cuda::rms_norm(q.as<float>(), n * heads, hd, nullptr, eps, stream_));
  DSERVE_RETURN_IF_ERROR(
      cuda::rope_at(q.as<float>(), n * heads, hd, rope, positions, heads, false, stream_));
  DSERVE_RETURN_IF_ERROR(linear(x.as<float>(), n, d.wkv, chunk_kv.as<float>()));
  DSERVE_RETURN_IF_ERROR(
      cuda::rms_norm(chunk_kv.as<float>(), n, hd, d.kv_norm.as<float>(), eps, stream_));
  DSERVE_RETURN_IF_ERROR(
      cuda::rope_at(chunk_kv.as<float>(), n, hd, rope, positions, 1, false, stream_));

  const int64_t rate = config.compress_rate(d.kind);
  const bool heavy = d.kind == AttentionKind::kHeavy;
  const DeviceBuffer& closed = heavy ? hca_windows : csa_windows;
  const int32_t* closed_count = window_counts.as<int32_t>() + (heavy ? 1 : 0);
  // A captured step launches for the most windows a one-token-per-request batch can close.
  const int64_t closed_bound = graph_batch ? n : (heavy ? hca_window_count : csa_window_count);
  auto run_compressor = [&](const CompressorDev& c, CompressorSlab& b,
                            const cuda::PagedRowsView& entries) -> Status {
    DSERVE_RETURN_IF_ERROR(linear(x.as<float>(), n, c.wkv, comp_kv.as<float>()));
    DSERVE_RETURN_IF_ERROR(linear(x.as<float>(), n, c.wgate, comp_gate.as<float>()));
    const cuda::CompressorView view{c.rate,
                                    c.width,
                                    c.series,
                                    b.pending_kv.as<float>(),
                                    b.pending_gate.as<float>(),
                                    b.overlap_kv.as<float>(),
                                    b.overlap_gate.as<float>(),
                                    c.ape.as<float>(),
                                    c.norm.as<float>()};
    return cuda::compress_batch(comp_kv.as<float>(), comp_gate.as<float>(), n, rows,
                                closed.as<cuda::ClosedWindow>(), closed_count, closed_bound, view,
                                entries, compress_rope, eps, stream_);
  };

  cuda::AttentionInputs in;
  in.q = q.as<float>();
  in.batch_kv = chunk_kv.as<float>();
  in.windows = slab.windows.as<float>();
  in.rate = d.compressor ? rate : 0;
  in.sinks = d.sinks.as<float>();
  // The most entries a row of the batch can see (a captured step: of any batch).
  const int64_t most_visible = rate == 0     ? 0
                               : graph_batch ? options.max_positions / rate
                                             : batch_max_end / rate;
  if (d.compressor) {
    in.compressed = paged(*compressed_pools[static_cast<size_t>(l)], slab.compressed);
    DSERVE_RETURN_IF_ERROR(run_compressor(*d.compressor, slab.kv_compressor, in.compressed));
  }
  if (d.index_compressor) {
    const cuda::PagedRowsView keys = paged(*index_pools[static_cast<size_t>(l)], slab.index_keys);
    DSERVE_RETURN_IF_ERROR(run_compressor(*d.index_compressor, slab.index_compressor, keys));
    // select_entries(): scores of every visible key, then the top index_topk per query.
    const int64_t ih = config.index_n_heads;
    const int64_t ihd = config.index_head_dim;
    const int64_t topk = config.index_topk;
    DSERVE_RETURN_IF_ERROR(linear(q_residual.as<float>(), n, d.index_wq_b, index_q.as<float>()));
    DSERVE_RETURN_IF_ERROR(cuda::rope_at(index_q.as<float>(), n * ih, ihd, compress_rope, positions,
                                         ih, false, stream_));
    DSERVE_RETURN_IF_ERROR(
        linear(x.as<float>(), n, d.index_weights_proj, index_weights.as<float>()));
    const int64_t stride = most_visible;
    const float weight_scale = 1.0f / std::sqrt(static_cast<float>(ih));
    const float score_scale = 1.0f / std::sqrt(static_cast<float>(ihd));
    const bool one_request = batch_requests == 1 && !decode_batch;
    const bool bf16 = options.weights == GpuWeights::kBf16;
    if (stride > 0 && one_request) {
      // One request: its keys gathered once, the head products as one GEMM per query tile
      // (bf16 inputs when the weights are bf16).
      DSERVE_RETURN_IF_ERROR(
          cuda::gather_rows(keys, batch_single_slot, 0, stride, index_keys.as<float>(), stream_));
      if (bf16) {
        DSERVE_RETURN_IF_ERROR(cuda::round_to_bf16(index_keys.as<float>(), stride * ihd,
                                                   index_keys16.as<uint16_t>(), stream_));
      }
    }
    for (int64_t t0 = 0; t0 < n; t0 += indexer_tile) {
      const int64_t tile = std::min(indexer_tile, n - t0);
      if (stride > 0 && one_request) {
        // The rows are consecutive positions ending at batch_max_end - 1: the tile's last row
        // sees the most entries, and no row reads a product past them.
        const int64_t tile_visible = std::min(stride, (batch_max_end - n + t0 + tile) / rate);
        const float* tile_q = index_q.as<float>() + t0 * ih * ihd;
        if (tile_visible > 0 && bf16) {
          DSERVE_RETURN_IF_ERROR(
              cuda::round_to_bf16(tile_q, tile * ih * ihd, scratch16(), stream_));
          DSERVE_RETURN_IF_ERROR(cuda::matmul_bf16(blas, scratch16(), tile * ih, ihd,
                                                   index_keys16.as<uint16_t>(), tile_visible,
                                                   index_dots.as<float>(), stride, stream_));
        } else if (tile_visible > 0) {
          DSERVE_RETURN_IF_ERROR(cuda::matmul(blas, tile_q, tile * ih, ihd, index_keys.as<float>(),
                                              tile_visible, index_dots.as<float>(), stride,
                                              stream_));
        }
        DSERVE_RETURN_IF_ERROR(cuda::indexer_scores(
            index_dots.as<float>(), index_weights.as<float>() + t0 * ih, tile, ih, stride,
            positions + t0, rate, score_scale, weight_scale, index_scores.as<float>(), stream_));
      } else if (stride > 0) {
        // Many requests (decode): scores straight from each row's keys.
        DSERVE_RETURN_IF_ERROR(cuda::indexer_scores_paged(
            index_q.as<float>() + t0 * ih * ihd, index_weights.as<float>() + t0 * ih, tile, ih, ihd,
            batch_rows(t0), keys, stride, rate, score_scale, weight_scale, index_scores.as<float>(),
            stream_));
      }
      DSERVE_RETURN_IF_ERROR(cuda::top_k_indices(
          index_scores.as<float>(), tile, stride, positions + t0, rate, topk,
          selected.as<int32_t>() + t0 * topk, selected_counts.as<int32_t>() + t0, stream_));
    }
    in.selected = selected.as<int32_t>();
    in.selected_counts = selected_counts.as<int32_t>();
    in.selected_stride = topk;
  }

  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const bool tensor_cores = options.attention == GpuAttention::kTensorCores ||
                            (options.attention == GpuAttention::kAuto &&
                             options.weights == GpuWeights::kBf16 && !decode_batch && hd % 64 == 0);
  const auto math =
      tensor_cores ? cuda::AttentionMath::kBf16TensorCores : cuda::AttentionMath::kFp32;
  DSERVE_RETURN_IF_ERROR(cuda::sparse_attention(in, rows, n, heads, hd, config.sliding_window,
                                                scale, math, attn_out.as<float>(), stream_));
  DSERVE_RETURN_IF_ERROR(
      cuda::rope_at(attn_out.as<float>(), n * heads, hd, rope, positions, heads, true, stream_));
  DSERVE_RETURN_IF_ERROR(cuda::store_window(
      chunk_kv.as<float>(), n, rows, hd, slab.windows.as<float>(), config.sliding_window, stream_));
  DSERVE_RETURN_IF_ERROR(cuda::linear_grouped(blas, attn_out.as<float>(), n, config.o_groups,
                                              d.wo_a.m, grouped.as<float>(), scratch16(), stream_));
  return linear(grouped.as<float>(), n, d.wo_b, sublayer_out.as<float>());
}

// moe() of moe.cc: x -> sublayer_out. Routing runs on the device; the routed experts run on
// the device path for small batches and through the host for large ones (below); then the
// shared expert and the combine in moe.cc's order.
Status GpuModel::Impl::moe(int64_t l, int64_t n) {
  const LayerDev& d = layers[static_cast<size_t>(l)];
  const int64_t hidden = config.hidden_size;
  const int64_t experts = config.n_routed_experts;
  const int64_t k = config.experts_per_token;
  const auto limit = static_cast<float>(config.swiglu_limit);
  const bool hash = d.routing == RoutingKind::kHash;

  DSERVE_RETURN_IF_ERROR(linear(x.as<float>(), n, d.router, router.as<float>()));
  DSERVE_RETURN_IF_ERROR(cuda::route_tokens(
      router.as<float>(), d.router_bias.size_bytes() > 0 ? d.router_bias.as<float>() : nullptr,
      hash ? d.tid2eid.as<int32_t>() : nullptr, hash ? tokens.as<int32_t>() : nullptr, n, experts,
      k, static_cast<int>(config.scoring_func), static_cast<float>(config.routed_scaling_factor),
      route_ids.as<int32_t>(), route_weights.as<float>(), stream_));
  const int64_t pairs = n * k;
  if (pairs <= device_grouping_pairs(experts)) {
    DSERVE_RETURN_IF_ERROR(routed_experts_on_device(d, n));
  } else {
    DSERVE_RETURN_IF_ERROR(routed_experts_through_host(d, n));
  }
  // The shared expert over every row.
  DSERVE_RETURN_IF_ERROR(linear(x.as<float>(), n, d.shared_w13, shared_gate_up.as<float>()));
  DSERVE_RETURN_IF_ERROR(cuda::swiglu(shared_gate_up.as<float>(), n, d.shared_inter, limit,
                                      shared_act.as<float>(), stream_));
  DSERVE_RETURN_IF_ERROR(linear(shared_act.as<float>(), n, d.shared_w2, shared_out.as<float>()));
  return cuda::moe_combine(ys.as<float>(), combine_slots.as<int32_t>(), combine_weights.as<float>(),
                           shared_out.as<float>(), n, k, hidden, sublayer_out.as<float>(), stream_);
}

// Routed experts of a small batch (decode): grouping and products on the device, no copy back.
Status GpuModel::Impl::routed_experts_on_device(const LayerDev& d, int64_t n) {
  const int64_t hidden = config.hidden_size;
  const int64_t experts = config.n_routed_experts;
  const int64_t k = config.experts_per_token;
  const int64_t inter = config.moe_intermediate_size;
  const int64_t pairs = n * k;
  const cuda::MoeGroups groups{moe_offsets.as<int32_t>(),      moe_active.as<int32_t>(),
                               moe_active_count.as<int32_t>(), perm_rows.as<int32_t>(),
                               moe_slot_of.as<int32_t>(),      combine_slots.as<int32_t>(),
                               combine_weights.as<float>(),    moe_active_total.as<int32_t>()};
  DSERVE_RETURN_IF_ERROR(cuda::moe_group(route_ids.as<int32_t>(), route_weights.as<float>(), n, k,
                                         experts, groups, stream_));
  DSERVE_RETURN_IF_ERROR(cuda::gather_token_rows(x.as<float>(), perm_rows.as<int32_t>(), pairs,
                                                 hidden, xs.as<float>(), stream_));
  const int64_t max_active = std::min(experts, pairs);
  const WeightType type = d.expert_w13.front().m.type;
  DSERVE_RETURN_IF_ERROR(cuda::moe_experts_gemv(xs.as<float>(), groups, max_active,
                                                d.expert_w13_ptrs.as<const void* const>(), type,
                                                2 * inter, hidden, gate_up.as<float>(), stream_));
  DSERVE_RETURN_IF_ERROR(cuda::swiglu(gate_up.as<float>(), pairs, inter,
                                      static_cast<float>(config.swiglu_limit),
                                      hidden_act.as<float>(), stream_));
  return cuda::moe_experts_gemv(hidden_act.as<float>(), groups, max_active,
                                d.expert_w2_ptrs.as<const void* const>(), type, hidden, inter,
                                ys.as<float>(), stream_);
}

// Routed experts of a large batch (prefill): the routed ids come back to the host, which groups
// the rows by expert; each expert with rows runs as two cuBLAS GEMMs over its contiguous rows.
Status GpuModel::Impl::routed_experts_through_host(const LayerDev& d, int64_t n) {
  const int64_t hidden = config.hidden_size;
  const int64_t experts = config.n_routed_experts;
  const int64_t k = config.experts_per_token;
  const int64_t inter = config.moe_intermediate_size;
  const auto limit = static_cast<float>(config.swiglu_limit);
  std::vector<int32_t> ids(static_cast<size_t>(n * k));
  std::vector<float> weights(ids.size());
  DSERVE_RETURN_IF_ERROR(route_ids.copy_to_host<int32_t>(ids));
  DSERVE_RETURN_IF_ERROR(route_weights.copy_to_host<float>(weights));

  // Rows per expert in token order (as moe.cc pushes them); slot = position in that grouping.
  std::vector<int64_t> count(static_cast<size_t>(experts), 0);
  for (int32_t e : ids) {
    DSERVE_CHECK_MSG(e >= 0 && e < experts, "routed expert id out of range");
    ++count[static_cast<size_t>(e)];
  }
  for (int64_t c : count)
    batch_distinct_experts += c > 0 ? 1 : 0;
  std::vector<int64_t> offset(static_cast<size_t>(experts) + 1, 0);
  for (int64_t e = 0; e < experts; ++e)
    offset[static_cast<size_t>(e) + 1] =
        offset[static_cast<size_t>(e)] + count[static_cast<size_t>(e)];
  std::vector<int64_t> next(offset.begin(), offset.end() - 1);
  std::vector<int32_t> perm(ids.size());
  std::vector<int32_t> slot_of(ids.size());
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < k; ++i) {
      const auto e = static_cast<size_t>(ids[static_cast<size_t>(t * k + i)]);
      const int64_t s = next[e]++;
      perm[static_cast<size_t>(s)] = static_cast<int32_t>(t);
      slot_of[static_cast<size_t>(t * k + i)] = static_cast<int32_t>(s);
    }
  }
  // Per token, its k contributions in ascending expert order (moe.cc adds experts in id order).
  std::vector<int32_t> slots(ids.size());
  std::vector<float> slot_weights(ids.size());
  std::vector<int64_t> order(static_cast<size_t>(k));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < k; ++i)
      order[static_cast<size_t>(i)] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return ids[static_cast<size_t>(t * k + a)] < ids[static_cast<size_t>(t * k + b)];
    });
    for (int64_t j = 0; j < k; ++j) {
      const auto src = static_cast<size_t>(t * k + order[static_cast<size_t>(j)]);
      slots[static_cast<size_t>(t * k + j)] = slot_of[src];
      slot_weights[static_cast<size_t>(t * k + j)] = weights[src];
    }
  }
  DSERVE_RETURN_IF_ERROR(perm_rows.copy_from_host(perm.data(), perm.size() * sizeof(int32_t)));
  DSERVE_RETURN_IF_ERROR(
      combine_slots.copy_from_host(slots.data(), slots.size() * sizeof(int32_t)));
  DSERVE_RETURN_IF_ERROR(
      combine_weights.copy_from_host(slot_weights.data(), slot_weights.size() * sizeof(float)));

  const int64_t pairs = n * k;
  DSERVE_RETURN_IF_ERROR(cuda::gather_token_rows(x.as<float>(), perm_rows.as<int32_t>(), pairs,
                                                 hidden, xs.as<float>(), stream_));
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = count[static_cast<size_t>(e)];
    if (rows == 0) continue;
    const int64_t first = offset[static_cast<size_t>(e)];
    DSERVE_RETURN_IF_ERROR(linear(xs.as<float>() + first * hidden, rows,
                                  d.expert_w13[static_cast<size_t>(e)],
                                  gate_up.as<float>() + first * 2 * inter));
  }
  DSERVE_RETURN_IF_ERROR(
      cuda::swiglu(gate_up.as<float>(), pairs, inter, limit, hidden_act.as<float>(), stream_));
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t rows = count[static_cast<size_t>(e)];
    if (rows == 0) continue;
    const int64_t first = offset[static_cast<size_t>(e)];
    DSERVE_RETURN_IF_ERROR(linear(hidden_act.as<float>() + first * inter, rows,
                                  d.expert_w2[static_cast<size_t>(e)],
                                  ys.as<float>() + first * hidden));
  }
  return Status::ok();
}

// hyper_head + final norm + lm_head for `rows` stream rows from first_row: logits_out (device,
// [rows, vocab]).
Status GpuModel::Impl::final_rows(int64_t first_row, int64_t rows, float* logits_out) {
  const int64_t hc = config.hc_mult;
  const int64_t hidden = config.hidden_size;
  const auto eps = static_cast<float>(config.rms_norm_eps);
  const float* s = streams.as<float>() + first_row * hc * hidden;
  DSERVE_RETURN_IF_ERROR(
      cuda::rms_norm_to(s, flat.as<float>(), rows, hc * hidden, nullptr, eps, stream_));
  DSERVE_RETURN_IF_ERROR(linear(flat.as<float>(), rows, hc_head_fn, mix.as<float>()));
  DSERVE_RETURN_IF_ERROR(cuda::hyper_head_weights(
      mix.as<float>(), hc_head_base.as<float>(), hc_head_scale.as<float>(), rows, hc,
      static_cast<float>(config.hc_eps), pre.as<float>(), stream_));
  DSERVE_RETURN_IF_ERROR(cuda::hyper_collapse(s, pre.as<float>(), rows, hc, hidden,
                                              final_hidden.as<float>(), stream_));
  DSERVE_RETURN_IF_ERROR(
      cuda::rms_norm(final_hidden.as<float>(), rows, hidden, norm.as<float>(), eps, stream_));
  return linear(final_hidden.as<float>(), rows, head, logits_out);
}

// One pass over the layers for a batch of segments (Model::forward's loop, for each segment at
// once): at most `chunk` rows, each segment's state advanced by its tokens.
Status GpuModel::Impl::run_batch(std::span<const Segment> segments) {
  DSERVE_ASSIGN_OR_RETURN(const int64_t n, prepare_batch(segments));
  DSERVE_RETURN_IF_ERROR(run_layers(n));
  for (const Segment& seg : segments)
    seg.state->position += static_cast<int64_t>(seg.tokens.size());
  return Status::ok();
}

// The host's part of a batch: per-row facts and the windows each rate's compressors close (all
// known from positions), copied to the device. Returns the rows.
Result<int64_t> GpuModel::Impl::prepare_batch(std::span<const Segment> segments) {
  // Per-row facts and the windows each rate's compressors close, all known from positions.
  std::vector<int32_t> ids, position, slot, first_pos, first_row, end_pos;
  std::vector<cuda::ClosedWindow> csa, hca;
  batch_max_end = 0;
  batch_distinct_experts = 0;
  const int32_t zero = 0;
  DSERVE_RETURN_IF_ERROR(moe_active_total.copy_from_host(&zero, sizeof(zero)));
  for (const Segment& seg : segments) {
    const auto row0 = static_cast<int32_t>(ids.size());
    const int64_t start = seg.state->position;
    const int64_t end = start + static_cast<int64_t>(seg.tokens.size());
    batch_max_end = std::max(batch_max_end, end);
    for (size_t i = 0; i < seg.tokens.size(); ++i) {
      ids.push_back(seg.tokens[i]);
      position.push_back(static_cast<int32_t>(start + static_cast<int64_t>(i)));
      slot.push_back(seg.state->slot);
      first_pos.push_back(static_cast<int32_t>(start));
      first_row.push_back(row0);
      end_pos.push_back(static_cast<int32_t>(end));
    }
    for (auto [rate, list] : {std::pair{config.csa_rate, &csa}, std::pair{config.hca_rate, &hca}}) {
      for (int64_t w = start / rate; w < end / rate; ++w) {
        list->push_back(
            cuda::ClosedWindow{row0, static_cast<int32_t>(w), w + 1 == end / rate ? 1 : 0});
      }
    }
  }
  const auto n = static_cast<int64_t>(ids.size());
  DSERVE_CHECK(n >= 1 && n <= chunk);
  batch_requests = static_cast<int64_t>(segments.size());
  batch_single_slot = segments.front().state->slot;
  csa_window_count = static_cast<int64_t>(csa.size());
  hca_window_count = static_cast<int64_t>(hca.size());
  const size_t row_bytes = static_cast<size_t>(n) * sizeof(int32_t);
  DSERVE_RETURN_IF_ERROR(tokens.copy_from_host(ids.data(), row_bytes));
  DSERVE_RETURN_IF_ERROR(row_position.copy_from_host(position.data(), row_bytes));
  DSERVE_RETURN_IF_ERROR(row_slot.copy_from_host(slot.data(), row_bytes));
  DSERVE_RETURN_IF_ERROR(row_first_pos.copy_from_host(first_pos.data(), row_bytes));
  DSERVE_RETURN_IF_ERROR(row_first_row.copy_from_host(first_row.data(), row_bytes));
  DSERVE_RETURN_IF_ERROR(row_end_pos.copy_from_host(end_pos.data(), row_bytes));
  DSERVE_RETURN_IF_ERROR(
      csa_windows.copy_from_host(csa.data(), csa.size() * sizeof(cuda::ClosedWindow)));
  DSERVE_RETURN_IF_ERROR(
      hca_windows.copy_from_host(hca.data(), hca.size() * sizeof(cuda::ClosedWindow)));
  const int32_t counts[2] = {static_cast<int32_t>(csa.size()), static_cast<int32_t>(hca.size())};
  DSERVE_RETURN_IF_ERROR(window_counts.copy_from_host(counts, sizeof(counts)));
  return n;
}

// The device's part of a batch: embedding and every layer, launches only (capturable).
Status GpuModel::Impl::run_layers(int64_t n) {
  DSERVE_RETURN_IF_ERROR(cuda::embed_streams(embed.data(), embed_type, tokens.as<int32_t>(), n,
                                             config.hidden_size, config.hc_mult,
                                             streams.as<float>(), stream_));
  for (int64_t l = 0; l < config.num_layers; ++l) {
    const LayerDev& d = layers[static_cast<size_t>(l)];
    DSERVE_RETURN_IF_ERROR(hyper_in(d.hc_attn, d.attn_norm, n));
    DSERVE_RETURN_IF_ERROR(attention(l, n));
    DSERVE_RETURN_IF_ERROR(cuda::hyper_expand(streams.as<float>(), sublayer_out.as<float>(),
                                              post.as<float>(), comb.as<float>(), n, config.hc_mult,
                                              config.hidden_size, stream_));
    DSERVE_RETURN_IF_ERROR(hyper_in(d.hc_ffn, d.ffn_norm, n));
    DSERVE_RETURN_IF_ERROR(moe(l, n));
    DSERVE_RETURN_IF_ERROR(cuda::hyper_expand(streams.as<float>(), sublayer_out.as<float>(),
                                              post.as<float>(), comb.as<float>(), n, config.hc_mult,
                                              config.hidden_size, stream_));
  }
  return Status::ok();
}

GpuRequestState::Impl& GpuModel::Impl::state_of(GpuRequestState& state) const {
  DSERVE_CHECK_MSG(state.impl_ != nullptr && state.impl_->owner == this,
                   "the GPU request state was made by another GpuModel");
  return *state.impl_;
}

// Checks one request's chunk, takes the pages it needs, then runs it in passes of at most
// `chunk` tokens, calling after_pass(first, len) after each (the pass's rows are still in the
// streams then).
template <typename AfterPass>
Status GpuModel::Impl::run_passes(std::span<const int32_t> input, GpuRequestState& state,
                                  AfterPass after_pass) {
  GpuRequestState::Impl& s = state_of(state);
  DSERVE_RETURN_IF_ERROR(check_tokens(input, s.position));
  const Segment whole{&s, input};
  DSERVE_RETURN_IF_ERROR(reserve_pages(std::span(&whole, 1)));
  const auto n = static_cast<int64_t>(input.size());
  for (int64_t first = 0; first < n; first += chunk) {
    const int64_t len = std::min(chunk, n - first);
    const Segment pass{&s, input.subspan(static_cast<size_t>(first), static_cast<size_t>(len))};
    DSERVE_RETURN_IF_ERROR(run_batch(std::span(&pass, 1)));
    DSERVE_RETURN_IF_ERROR(after_pass(first, len));
  }
  return Status::ok();
}

Result<Tensor> GpuModel::forward(std::span<const int32_t> tokens, GpuRequestState& state,
                                 LogitsFor which) {
  Impl& m = *impl_;
  const auto n = static_cast<int64_t>(tokens.size());
  const int64_t vocab = m.config.vocab_size;
  Tensor logits({which == LogitsFor::kLastToken ? 1 : n, vocab});
  int64_t written = 0;
  const Status status = m.run_passes(tokens, state, [&](int64_t first, int64_t len) -> Status {
    // Rows of this pass whose logits are wanted.
    const int64_t want_first =
        which == LogitsFor::kLastToken ? (first + len == n ? len - 1 : len) : 0;
    for (int64_t r = want_first; r < len; r += m.logits_tile) {
      const int64_t rows = std::min(m.logits_tile, len - r);
      DSERVE_RETURN_IF_ERROR(m.final_rows(r, rows, m.logits.as<float>()));
      DSERVE_RETURN_IF_ERROR(m.logits.copy_to_host(
          logits.data() + written * vocab, static_cast<size_t>(rows * vocab) * sizeof(float)));
      written += rows;
    }
    return Status::ok();
  });
  if (!status.is_ok()) return status;
  DSERVE_CHECK(written == logits.rows());
  return logits;
}

Result<int32_t> GpuModel::forward_greedy(std::span<const int32_t> tokens, GpuRequestState& state) {
  Impl& m = *impl_;
  int64_t last_len = 0;
  DSERVE_RETURN_IF_ERROR(m.run_passes(tokens, state, [&](int64_t, int64_t len) {
    last_len = len;
    return Status::ok();
  }));
  DSERVE_RETURN_IF_ERROR(m.final_rows(last_len - 1, 1, m.logits.as<float>()));
  DSERVE_RETURN_IF_ERROR(cuda::argmax_rows(m.logits.as<float>(), 1, m.config.vocab_size,
                                           m.greedy.as<int32_t>(), m.stream_));
  int32_t token = 0;
  DSERVE_RETURN_IF_ERROR(m.greedy.copy_to_host(&token, sizeof(token)));
  return token;
}

// One batch of one token per request.
Status GpuModel::Impl::decode_rows(std::span<GpuRequestState* const> states,
                                   std::span<const int32_t> next) {
  if (states.size() != next.size() || states.empty()) {
    return invalid_argument("decode: " + std::to_string(states.size()) + " states and " +
                            std::to_string(next.size()) +
                            " tokens; one token per state, at least one");
  }
  if (static_cast<int64_t>(states.size()) > chunk) {
    return invalid_argument("decode: " + std::to_string(states.size()) +
                            " requests in one step, past GpuModelOptions.max_chunk_tokens " +
                            std::to_string(chunk));
  }
  std::vector<Segment> segments;
  std::vector<int32_t> seen_slots;
  for (size_t i = 0; i < states.size(); ++i) {
    if (states[i] == nullptr) {
      return invalid_argument("decode: request " + std::to_string(i) + " has no state");
    }
    GpuRequestState::Impl& s = state_of(*states[i]);
    if (std::find(seen_slots.begin(), seen_slots.end(), s.slot) != seen_slots.end()) {
      return invalid_argument("decode: request " + std::to_string(i) +
                              " appears twice in one step");
    }
    seen_slots.push_back(s.slot);
    const Status valid = check_tokens(next.subspan(i, 1), s.position);
    if (!valid.is_ok()) return valid.with_context("decode: request " + std::to_string(i));
    segments.push_back(Segment{&s, next.subspan(i, 1)});
  }
  DSERVE_RETURN_IF_ERROR(reserve_pages(segments));
  decode_batch = true;
  const Status stepped = decode_step(segments);
  decode_batch = false;
  return stepped;
}

Status GpuModel::Impl::decode_step(std::span<const Segment> segments) {
  // Graphs need the device-side MoE grouping (no copy back inside the step).
  const auto rows = static_cast<int64_t>(segments.size());
  if (!options.decode_graphs ||
      rows * config.experts_per_token > device_grouping_pairs(config.n_routed_experts)) {
    return run_batch(segments);
  }
  // A captured step per batch size: the host's part runs as usual, the launches replay.
  DSERVE_ASSIGN_OR_RETURN(const int64_t n, prepare_batch(segments));
  auto graph = decode_graphs.find(n);
  // The first step of a size runs eagerly: every kernel it uses is then loaded before any
  // capture (lazy module loading), and the second step captures.
  const bool first_of_size = eager_sizes.insert(n).second;
  if (graph == decode_graphs.end() && !first_of_size && !graph_failures.contains(n)) {
    graph_batch = true;
    auto captured = cuda::CapturedGraph::capture(stream_, [&] { return run_layers(n); });
    graph_batch = false;
    if (captured.is_ok()) {
      graph = decode_graphs.emplace(n, std::move(captured).value()).first;
    } else {
      // Nothing ran; this batch size runs eagerly from now on (graph_failure() says why).
      graph_failures.emplace(n, captured.status().with_context("capturing the decode step of " +
                                                               std::to_string(n) + " requests"));
    }
  }
  if (graph != decode_graphs.end()) {
    DSERVE_RETURN_IF_ERROR(graph->second.launch(stream_));
  } else {
    DSERVE_RETURN_IF_ERROR(run_layers(n));
  }
  for (const Segment& seg : segments)
    seg.state->position += static_cast<int64_t>(seg.tokens.size());
  return Status::ok();
}

Status GpuModel::decode_graph_status(int64_t batch) const {
  const auto failed = impl_->graph_failures.find(batch);
  if (failed != impl_->graph_failures.end()) return failed->second;
  if (impl_->decode_graphs.contains(batch)) return Status::ok();
  return not_found("no decode step of " + std::to_string(batch) + " requests was captured");
}

Result<int64_t> GpuModel::last_batch_distinct_experts() const {
  // Counted on the host for batches grouped there, on the device for the others.
  int32_t on_device = 0;
  DSERVE_RETURN_IF_ERROR(impl_->moe_active_total.copy_to_host(&on_device, sizeof(on_device)));
  return impl_->batch_distinct_experts + on_device;
}

size_t GpuModel::kv_bytes(const GpuRequestState& state, int64_t layer) const {
  const Impl& m = *impl_;
  DSERVE_CHECK(state.impl_ != nullptr && state.impl_->owner == impl_.get());
  DSERVE_CHECK(layer >= 0 && layer < m.config.num_layers);
  const auto l = static_cast<size_t>(layer);
  const LayerPages& pages = state.impl_->layers[l];
  size_t bytes = 0;
  for (auto [list, pool] : {std::pair{&pages.compressed, m.compressed_pools[l].get()},
                            std::pair{&pages.index_keys, m.index_pools[l].get()}}) {
    if (pool != nullptr) {
      bytes += list->pages.size() * static_cast<size_t>(pool->rows_per_page * pool->width) *
               sizeof(float);
    }
  }
  return bytes;
}

Status GpuModel::assume_context(GpuRequestState& state, int64_t tokens) {
  Impl& m = *impl_;
  if (!m.random_state) {
    return invalid_argument(
        "assume_context: only a model made by create_random has generated "
        "request state to assume");
  }
  GpuRequestState::Impl& s = m.state_of(state);
  if (s.position != 0 || tokens < 0 || tokens > m.options.max_positions) {
    return invalid_argument("assume_context: a fresh state and 0 <= tokens <= max_positions (" +
                            std::to_string(m.options.max_positions) + "), got position " +
                            std::to_string(s.position) + " and tokens " + std::to_string(tokens));
  }
  const std::vector<int32_t> placeholder(static_cast<size_t>(tokens), 0);
  const Impl::Segment whole{&s, placeholder};
  DSERVE_RETURN_IF_ERROR(m.reserve_pages(std::span(&whole, 1)));
  s.position = tokens;
  return Status::ok();
}

Result<Tensor> GpuModel::decode(std::span<GpuRequestState* const> states,
                                std::span<const int32_t> tokens) {
  Impl& m = *impl_;
  DSERVE_RETURN_IF_ERROR(m.decode_rows(states, tokens));
  const auto b = static_cast<int64_t>(states.size());
  const int64_t vocab = m.config.vocab_size;
  Tensor logits({b, vocab});
  for (int64_t r = 0; r < b; r += m.logits_tile) {
    const int64_t rows = std::min(m.logits_tile, b - r);
    DSERVE_RETURN_IF_ERROR(m.final_rows(r, rows, m.logits.as<float>()));
    DSERVE_RETURN_IF_ERROR(m.logits.copy_to_host(
        logits.data() + r * vocab, static_cast<size_t>(rows * vocab) * sizeof(float)));
  }
  return logits;
}

Result<std::vector<int32_t>> GpuModel::decode_greedy(std::span<GpuRequestState* const> states,
                                                     std::span<const int32_t> tokens) {
  Impl& m = *impl_;
  DSERVE_RETURN_IF_ERROR(m.decode_rows(states, tokens));
  const auto b = static_cast<int64_t>(states.size());
  std::vector<int32_t> out(static_cast<size_t>(b));
  for (int64_t r = 0; r < b; r += m.logits_tile) {
    const int64_t rows = std::min(m.logits_tile, b - r);
    DSERVE_RETURN_IF_ERROR(m.final_rows(r, rows, m.logits.as<float>()));
    DSERVE_RETURN_IF_ERROR(cuda::argmax_rows(m.logits.as<float>(), rows, m.config.vocab_size,
                                             m.greedy.as<int32_t>(), m.stream_));
    DSERVE_RETURN_IF_ERROR(
        m.greedy.copy_to_host(out.data() + r, static_cast<size_t>(rows) * sizeof(int32_t)));
  }
  return out;
}

}  // namespace dserve::model

#pragma once
// The inside of GpuModel (gpu_model.h), shared by its sources, one per aspect:
//   gpu_model.cc         requests in and logits out: forward, step, the passes;
//   gpu_model_upload.cc  create(): the weights, pools and scratch put on the device;
//   gpu_model_pages.cc   request slots and the pages of their compressed entries and keys;
//   gpu_model_layers.cc  one pass over the layers for a batch of rows (the launches);
//   gpu_model_graphs.cc  decode steps and their captured CUDA graphs.
// Internal to the model module.

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

namespace gpu_impl {

// The legacy default stream: weight generation at creation. Everything after runs on the
// model's own (blocking) stream, which synchronous copies order with as well.
inline constexpr cuda::CudaStream kDefaultStream{};
// Scratch the indexer's head products may take per query tile (floats).
inline constexpr int64_t kIndexerTileFloats = int64_t{32} << 20;
// Scratch the logits may take per tile of output rows (floats).
inline constexpr int64_t kLogitsTileFloats = int64_t{64} << 20;
// Routed (token, expert) pairs up to which the grouping stays on the device (decode batches),
// as far as moe_group's one block can hold them next to the expert counts.
inline constexpr int64_t kDeviceGroupingPairs = 2048;
inline int64_t device_grouping_pairs(int64_t experts) {
  return std::clamp<int64_t>(cuda::kMoeGroupMaxInts - experts, 0, kDeviceGroupingPairs);
}

// Pages one request at max_positions needs in a pool of rows_per_page rows for rate `rate`.
inline int64_t max_pages_per_request(int64_t max_positions, int64_t rate, int64_t rows_per_page) {
  return std::max<int64_t>(ceil_div(max_positions / rate, rows_per_page), 1);
}

// A device weight and its view.
struct Weight {
  DeviceBuffer buffer;
  DeviceMatrix m;
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
                                                  int64_t width);

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

}  // namespace gpu_impl
using namespace gpu_impl;  // NOLINT: the types of this internal header

struct GpuRequestState::Impl {
  GpuModel::Impl* owner = nullptr;
  int32_t slot = -1;
  int64_t position = 0;
  std::vector<LayerPages> layers;

  ~Impl();  // gives the slot and the pages back (defined after GpuModel::Impl)
};

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

}  // namespace dserve::model

// One pass over the layers for a batch of rows: the host's per-row facts, then the launches,
// each step naming its CPU twin (model.cc, layers.h).

#include "gpu_model_impl.h"
#include "layer_sequence.h"

namespace dserve::model {

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
  // fp8 KV: the window's kv, the compressed entries and the indexer keys and queries hold the
  // values of the served format (kvstore/row_format.h), as on the CPU (attention.cc).
  const bool fp8 = config.kv_dtype == kvstore::KvDtype::kFp8;
  const auto entry_rounding = fp8 ? cuda::KvRounding::kFp8Entry : cuda::KvRounding::kNone;
  const auto key_rounding = fp8 ? cuda::KvRounding::kFp4Key : cuda::KvRounding::kNone;
  DSERVE_RETURN_IF_ERROR(cuda::round_kv_rows(chunk_kv.as<float>(), n, hd, config.rope_head_dim,
                                             entry_rounding, stream_));

  const int64_t rate = config.compress_rate(d.kind);
  const bool heavy = d.kind == AttentionKind::kHeavy;
  const DeviceBuffer& closed = heavy ? hca_windows : csa_windows;
  const int32_t* closed_count = window_counts.as<int32_t>() + (heavy ? 1 : 0);
  // A captured step launches for the most windows a one-token-per-request batch can close.
  const int64_t closed_bound = graph_batch ? n : (heavy ? hca_window_count : csa_window_count);
  auto run_compressor = [&](const CompressorDev& c, CompressorSlab& b,
                            const cuda::PagedRowsView& entries,
                            cuda::KvRounding rounding) -> Status {
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
                                entries, compress_rope, eps, rounding, stream_);
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
    DSERVE_RETURN_IF_ERROR(
        run_compressor(*d.compressor, slab.kv_compressor, in.compressed, entry_rounding));
  }
  if (d.index_compressor) {
    const cuda::PagedRowsView keys = paged(*index_pools[static_cast<size_t>(l)], slab.index_keys);
    DSERVE_RETURN_IF_ERROR(
        run_compressor(*d.index_compressor, slab.index_compressor, keys, key_rounding));
    // select_entries(): scores of every visible key, then the top index_topk per query.
    const int64_t ih = config.index_n_heads;
    const int64_t ihd = config.index_head_dim;
    const int64_t topk = config.index_topk;
    DSERVE_RETURN_IF_ERROR(linear(q_residual.as<float>(), n, d.index_wq_b, index_q.as<float>()));
    DSERVE_RETURN_IF_ERROR(cuda::rope_at(index_q.as<float>(), n * ih, ihd, compress_rope, positions,
                                         ih, false, stream_));
    DSERVE_RETURN_IF_ERROR(
        cuda::round_kv_rows(index_q.as<float>(), n * ih, ihd, 0, key_rounding, stream_));
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
  for (int64_t e = 0; e < experts; ++e) {
    offset[static_cast<size_t>(e) + 1] =
        offset[static_cast<size_t>(e)] + count[static_cast<size_t>(e)];
  }
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
// The CUDA ops of the layer sequence (layer_sequence.h) over the n rows of a pass.
Status GpuModel::Impl::run_layers(int64_t n) {
  struct GpuStepOps {
    Impl& impl;
    int64_t n;
    Status embed() {
      return cuda::embed_streams(impl.embed.data(), impl.embed_type, impl.tokens.as<int32_t>(), n,
                                 impl.config.hidden_size, impl.config.hc_mult,
                                 impl.streams.as<float>(), impl.stream_);
    }
    Status mix_in(int64_t l, detail::Sublayer sublayer) {
      const LayerDev& d = impl.layers[static_cast<size_t>(l)];
      return sublayer == detail::Sublayer::kAttention ? impl.hyper_in(d.hc_attn, d.attn_norm, n)
                                                      : impl.hyper_in(d.hc_ffn, d.ffn_norm, n);
    }
    Status attention(int64_t l) { return impl.attention(l, n); }
    Status ffn(int64_t l) { return impl.moe(l, n); }
    Status mix_out(int64_t, detail::Sublayer) {
      return cuda::hyper_expand(impl.streams.as<float>(), impl.sublayer_out.as<float>(),
                                impl.post.as<float>(), impl.comb.as<float>(), n,
                                impl.config.hc_mult, impl.config.hidden_size, impl.stream_);
    }
    Status layer_done(int64_t) { return Status::ok(); }
  };
  GpuStepOps ops{*this, n};
  return detail::run_layer_sequence(ops, config.num_layers);
}

}  // namespace dserve::model

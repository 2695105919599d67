#pragma once
// The decoder's sequence at inference time (MODEL-V4.md), written once for every backend: the
// token embedding into hc_mult residual streams, then per layer the hyper-connection in (with
// the sublayer's RMSNorm), attention, the hyper-connection out, and the same around the MoE.
// A backend supplies the ops over the rows of one step; the CPU forward (model.cc) and the
// CUDA forward (gpu_model_layers.cc) both run this function, so the order of the ops cannot
// drift between them. What the ops compute, and in which precision, is the backend's.
//
// Ops must provide (each returning Status):
//   embed()                     the step's tokens into the residual streams
//   mix_in(layer, sublayer)     hyper-connection in, then the sublayer's RMSNorm
//   attention(layer)            the attention sublayer over the normed rows
//   ffn(layer)                  the MoE sublayer over the normed rows
//   mix_out(layer, sublayer)    the sublayer's output back into the streams
//   layer_done(layer)           after a layer (observers, traces)

#include <cstdint>

#include "dserve/core/status.h"

namespace dserve::model::detail {

enum class Sublayer { kAttention, kFfn };

template <typename Ops>
Status run_layer_sequence(Ops& ops, int64_t num_layers) {
  DSERVE_RETURN_IF_ERROR(ops.embed());
  for (int64_t l = 0; l < num_layers; ++l) {
    DSERVE_RETURN_IF_ERROR(ops.mix_in(l, Sublayer::kAttention));
    DSERVE_RETURN_IF_ERROR(ops.attention(l));
    DSERVE_RETURN_IF_ERROR(ops.mix_out(l, Sublayer::kAttention));
    DSERVE_RETURN_IF_ERROR(ops.mix_in(l, Sublayer::kFfn));
    DSERVE_RETURN_IF_ERROR(ops.ffn(l));
    DSERVE_RETURN_IF_ERROR(ops.mix_out(l, Sublayer::kFfn));
    DSERVE_RETURN_IF_ERROR(ops.layer_done(l));
  }
  return Status::ok();
}

}  // namespace dserve::model::detail

#pragma once
// Loading a DeepSeek-V4 checkpoint directory into ModelWeights (fp32).
//
// The directory holds `model.safetensors`, or shards listed by `model.safetensors.index.json`;
// files are memory-mapped and every tensor is dequantised straight into its fp32 Tensor. Two
// namings are recognised, by the embedding's name (MODEL-V4.md, "Checkpoint formats"):
// - official (`embed.weight`, `layers.N.attn.wq_a.weight`, ...). The MTP blocks
//   (`mtp.K.*`) are loaded when `mtp.0.e_proj.weight` exists, else `mtp` stays empty.
// - transformers DeepseekV4ForCausalLM (`model.embed_tokens.weight`, fused experts
//   `mlp.experts.gate_up_proj` / `down_proj`, ...). It has no MTP: `mtp` stays empty.
// Element types: F32, F16 and BF16 anywhere; 2-D weights may also be FP8 e4m3 with 128x128
// block scales (`x.scale` F8_E8M0 or F32, or `x.weight_scale_inv` F32) or MXFP4 (I8 [out,
// in/2] + `x.scale` F8_E8M0 [out, in/32]); tid2eid is I64 or I32. Extra tensors are ignored.
// When `head.weight` / `lm_head.weight` is absent and the config ties embeddings, head is a
// copy of embed.

#include <string>

#include "dserve/core/status.h"
#include "dserve/model/config.h"
#include "dserve/model/weights.h"

namespace dserve::model {

// Errors: an invalid `config` (InvalidArgument); no checkpoint files (NotFound); a corrupt
// file (DataLoss / InvalidArgument); missing, mis-shaped or wrongly typed tensors, each named
// with the expected and the found shape/dtype and the file (all of them at once, the list
// capped at 20 lines; NotFound when every problem is a missing tensor, else
// InvalidArgument); tid2eid entries outside [0, n_routed_experts). Uses up to
// hardware_concurrency threads; safe to call concurrently.
Result<ModelWeights> load_checkpoint(const std::string& model_dir, const ModelConfig& config);

}  // namespace dserve::model

namespace dserve::model {

// A short string that changes whenever the checkpoint in `model_dir` does: XXH3-128 over
// config.json and, per safetensors file (by name), its size, its header and 64 evenly spaced
// 64 KiB samples of its data, so that it costs milliseconds on a checkpoint of any size. Used
// as the prefix store's model fingerprint (with the numerics version, kForwardNumerics).
Result<std::string> checkpoint_fingerprint(const std::string& model_dir);

// Changes whenever the forward pass's arithmetic does (and with it every cached block).
inline constexpr const char* kForwardNumerics = "cpu-fp32-1";

}  // namespace dserve::model

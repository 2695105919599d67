#pragma once
// Deterministic random DeepSeek-V4 checkpoints ("tiny models are generated, real models are
// loaded", ARCHITECTURE.md): config.json, safetensors in the official or the transformers
// layout, tokenizer.json and generation_config.json. The same options give the same bytes on
// any machine: every value comes from a counter-based SplitMix64 + Box-Muller stream keyed by
// (seed, official tensor name, element index), never from the write order or the threads.

#include <cstdint>
#include <string>
#include <string_view>

#include "dserve/core/status.h"
#include "dserve/model/config.h"

namespace dserve::model {

struct ModelInitOptions {
  enum class Layout {
    kOfficial,      // DeepSeek names (`layers.N.attn.wq_a.weight`), with the MTP block
    kTransformers,  // DeepseekV4ForCausalLM names, fused experts, no MTP
  };
  enum class DType {
    // The official checkpoint's mix (official layout only): FP8 e4m3 + e8m0 128x128 block
    // scales for attention wq_a/wq_b/wkv/wo_a/wo_b, shared experts and MTP e_proj/h_proj;
    // MXFP4 routed experts; BF16 compressor/indexer/gate weights, embed, head and norms; F32
    // ape, attn_sink, hc_* and gate bias; I64 tid2eid.
    kPacked,
    kBf16,  // every floating-point tensor BF16 (tid2eid I64)
    kF32,   // every floating-point tensor F32 (tid2eid I64)
  };

  std::string preset;  // a name preset_config() knows
  uint64_t seed = 0;
  std::string out_dir;         // created when missing; files of an earlier checkpoint replaced
  std::string tokenizer_json;  // copied into out_dir; must exist
  Layout layout = Layout::kOfficial;
  DType dtype = DType::kPacked;
  // Files larger than this are split into model-0000K-of-0000N.safetensors plus
  // model.safetensors.index.json; otherwise one model.safetensors.
  int64_t shard_bytes = int64_t{2} << 30;
  // Rows of the embedding and lm_head; 0: the preset's. Tests shrink it to run a model of V4's
  // widths without V4's 129,280-row vocabulary (the ids past it are then not tokenizable).
  int64_t vocab_size = 0;
};

// The config of a named preset: "tiny" (CI-sized), "small", "v4-width" (V4-Flash widths,
// 3 layers, 4 routed experts). Unknown name: InvalidArgument listing the presets.
Result<ModelConfig> preset_config(std::string_view name);

// DeepSeek-V4-Flash's layers as far as a request's state goes (43 layers: 2 sliding-only, then
// CSA and HCA alternating, 21 and 20; 512-channel entries with 64 RoPE channels, 128-channel
// indexer keys, a 128-token window, rates 4 and 128): for sizing states and hand-offs in
// benchmarks and tests. No checkpoint of it is made here (its experts are V4-Flash's size).
ModelConfig v4_flash_state_config();

// Writes the checkpoint. Errors: unknown preset, packed dtype with the transformers layout, or
// widths the packed formats cannot hold (InvalidArgument); a missing tokenizer (NotFound,
// checked before anything is written); I/O failures (Unavailable). Uses up to
// hardware_concurrency threads and streams to disk (memory use is bounded, not model-sized).
Status write_random_checkpoint(const ModelInitOptions& opts);

}  // namespace dserve::model

// The two name maps: official DeepSeek-V4 names and `transformers` DeepseekV4ForCausalLM names.

#include "param_specs.h"

namespace dserve::model {
namespace {

using Shape = std::vector<int64_t>;

// Collects specs for one naming scope (the model, a layer, an MTP block).
class SpecBuilder {
 public:
  SpecBuilder(std::vector<ParamSpec>* out, std::string official_prefix, std::string hf_prefix)
      : out_(out), off_(std::move(official_prefix)), hf_(std::move(hf_prefix)) {}

  // A parameter stored whole under both layouts (hf_suffix empty: official layout only).
  ParamSpec& add(const std::string& official, const std::string& hf_suffix, Shape shape,
                 ParamInit init, PackedFormat packed, Tensor* tensor) {
    ParamSpec s;
    s.name = off_ + official;
    s.shape = std::move(shape);
    s.init = init;
    s.packed = packed;
    s.tensor = tensor;
    if (!hf_.empty() && !hf_suffix.empty()) {
      s.hf_name = hf_ + hf_suffix;
      s.hf_shape = s.shape;
    }
    out_->push_back(std::move(s));
    return out_->back();
  }

 private:
  std::vector<ParamSpec>* out_;
  std::string off_;
  std::string hf_;
};

void add_compressor(SpecBuilder& b, const std::string& off, const std::string& hf, int64_t dim,
                    int64_t mult, int64_t rate, int64_t hidden, CompressorWeights* w) {
  b.add(off + "wkv.weight", hf + "kv_proj.weight", {mult * dim, hidden}, ParamInit::kLinear,
        PackedFormat::kBf16, &w->wkv);
  b.add(off + "wgate.weight", hf + "gate_proj.weight", {mult * dim, hidden}, ParamInit::kLinear,
        PackedFormat::kBf16, &w->wgate);
  b.add(off + "ape", hf + "position_bias", {rate, mult * dim}, ParamInit::kApe, PackedFormat::kF32,
        &w->ape);
  b.add(off + "norm.weight", hf + "kv_norm.weight", {dim}, ParamInit::kNorm, PackedFormat::kBf16,
        &w->norm);
}

void add_attention(SpecBuilder& b, const ModelConfig& c, AttentionKind kind, AttentionWeights* w) {
  const int64_t h = c.hidden_size;
  const int64_t qdim = c.num_heads * c.head_dim;
  b.add("attn.wq_a.weight", "self_attn.q_a_proj.weight", {c.q_lora_rank, h}, ParamInit::kLinear,
        PackedFormat::kFp8, &w->wq_a);
  b.add("attn.q_norm.weight", "self_attn.q_a_norm.weight", {c.q_lora_rank}, ParamInit::kNorm,
        PackedFormat::kBf16, &w->q_norm);
  b.add("attn.wq_b.weight", "self_attn.q_b_proj.weight", {qdim, c.q_lora_rank}, ParamInit::kLinear,
        PackedFormat::kFp8, &w->wq_b);
  b.add("attn.wkv.weight", "self_attn.kv_proj.weight", {c.head_dim, h}, ParamInit::kLinear,
        PackedFormat::kFp8, &w->wkv);
  b.add("attn.kv_norm.weight", "self_attn.kv_norm.weight", {c.head_dim}, ParamInit::kNorm,
        PackedFormat::kBf16, &w->kv_norm);
  b.add("attn.wo_a.weight", "self_attn.o_a_proj.weight",
        {c.o_groups * c.o_lora_rank, qdim / c.o_groups}, ParamInit::kLinear, PackedFormat::kFp8,
        &w->wo_a);
  b.add("attn.wo_b.weight", "self_attn.o_b_proj.weight", {h, c.o_groups * c.o_lora_rank},
        ParamInit::kLinear, PackedFormat::kFp8, &w->wo_b);
  b.add("attn.attn_sink", "self_attn.sinks", {c.num_heads}, ParamInit::kSink, PackedFormat::kF32,
        &w->sinks);
  if (kind == AttentionKind::kSliding) return;
  // CSA projections are 2x wide (the overlapping Ca | Cb series), HCA ones 1x.
  const bool csa = kind == AttentionKind::kCompressed;
  if (!w->compressor) w->compressor.emplace();
  add_compressor(b, "attn.compressor.", "self_attn.compressor.", c.head_dim, csa ? 2 : 1,
                 c.compress_rate(kind), h, &*w->compressor);
  if (!csa) return;
  if (!w->indexer) w->indexer.emplace();
  IndexerWeights& ix = *w->indexer;
  const std::string hf = "self_attn.compressor.indexer.";
  b.add("attn.indexer.wq_b.weight", hf + "q_b_proj.weight",
        {c.index_n_heads * c.index_head_dim, c.q_lora_rank}, ParamInit::kLinear,
        PackedFormat::kBf16, &ix.wq_b);
  b.add("attn.indexer.weights_proj.weight", hf + "scorer.weights_proj.weight", {c.index_n_heads, h},
        ParamInit::kLinear, PackedFormat::kBf16, &ix.weights_proj);
  add_compressor(b, "attn.indexer.compressor.", hf, c.index_head_dim, 2, c.csa_rate, h,
                 &ix.compressor);
}

void add_hyper(SpecBuilder& b, const ModelConfig& c, const std::string& off, const std::string& hf,
               HyperConnectionWeights* w) {
  const int64_t mix = (2 + c.hc_mult) * c.hc_mult;
  b.add(off + "fn", hf + "fn", {mix, c.hc_mult * c.hidden_size}, ParamInit::kHcFn,
        PackedFormat::kF32, &w->fn);
  b.add(off + "base", hf + "base", {mix}, ParamInit::kHcBase, PackedFormat::kF32, &w->base);
  b.add(off + "scale", hf + "scale", {3}, ParamInit::kHcScale, PackedFormat::kF32, &w->scale);
}

void add_moe(SpecBuilder& b, const ModelConfig& c, RoutingKind routing, MoeWeights* w) {
  const int64_t h = c.hidden_size;
  const int64_t e = c.n_routed_experts;
  const int64_t inter = c.moe_intermediate_size;
  b.add("ffn.gate.weight", "mlp.gate.weight", {e, h}, ParamInit::kLinear, PackedFormat::kBf16,
        &w->gate);
  if (routing == RoutingKind::kHash) {
    ParamSpec& s =
        b.add("ffn.gate.tid2eid", "mlp.gate.tid2eid", {c.vocab_size, c.experts_per_token},
              ParamInit::kTokenExperts, PackedFormat::kI64, nullptr);
    s.ids = &w->tid2eid;
  } else {
    b.add("ffn.gate.bias", "mlp.gate.e_score_correction_bias", {e}, ParamInit::kGateBias,
          PackedFormat::kF32, &w->bias);
  }
  w->experts.resize(static_cast<size_t>(e));
  for (int64_t i = 0; i < e; ++i) {
    ExpertWeights& x = w->experts[static_cast<size_t>(i)];
    const std::string p = "ffn.experts." + std::to_string(i) + ".";
    // transformers fuses the experts: gate_up_proj [E, 2I, H] = cat(w1, w3) along dim 1,
    // down_proj [E, H, I] = w2.
    b.add(p + "w1.weight", "", {inter, h}, ParamInit::kLinear, PackedFormat::kFp4, &x.w1);
    b.add(p + "w3.weight", "", {inter, h}, ParamInit::kLinear, PackedFormat::kFp4, &x.w3);
    b.add(p + "w2.weight", "", {h, inter}, ParamInit::kLinear, PackedFormat::kFp4, &x.w2);
  }
  const int64_t shared = inter * c.n_shared_experts;
  b.add("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight", {shared, h},
        ParamInit::kLinear, PackedFormat::kFp8, &w->shared.w1);
  b.add("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight", {shared, h},
        ParamInit::kLinear, PackedFormat::kFp8, &w->shared.w3);
  b.add("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight", {h, shared},
        ParamInit::kLinear, PackedFormat::kFp8, &w->shared.w2);
}

void add_layer(std::vector<ParamSpec>* out, const std::string& off, const std::string& hf,
               const ModelConfig& c, AttentionKind kind, RoutingKind routing, LayerWeights* w) {
  SpecBuilder b(out, off, hf);
  const size_t first = out->size();
  b.add("attn_norm.weight", "input_layernorm.weight", {c.hidden_size}, ParamInit::kNorm,
        PackedFormat::kBf16, &w->attn_norm);
  b.add("ffn_norm.weight", "post_attention_layernorm.weight", {c.hidden_size}, ParamInit::kNorm,
        PackedFormat::kBf16, &w->ffn_norm);
  add_hyper(b, c, "hc_attn_", "attn_hc.", &w->hc_attn);
  add_hyper(b, c, "hc_ffn_", "ffn_hc.", &w->hc_ffn);
  add_attention(b, c, kind, &w->attn);
  add_moe(b, c, routing, &w->moe);
  if (hf.empty()) return;
  // Place the routed experts inside the fused transformers tensors.
  const int64_t e = c.n_routed_experts;
  const int64_t inter = c.moe_intermediate_size;
  for (size_t i = first; i < out->size(); ++i) {
    ParamSpec& s = (*out)[i];
    const std::string tail = s.name.substr(off.size());
    if (tail.rfind("ffn.experts.", 0) != 0) continue;
    const int64_t idx = std::stoll(tail.substr(12));
    const char which = tail[tail.size() - 8];  // the digit of "wN.weight"
    if (which == '2') {
      s.hf_name = hf + "mlp.experts.down_proj";
      s.hf_shape = {e, c.hidden_size, inter};
      s.hf_row = idx * c.hidden_size;
    } else {
      s.hf_name = hf + "mlp.experts.gate_up_proj";
      s.hf_shape = {e, 2 * inter, c.hidden_size};
      s.hf_row = idx * 2 * inter + (which == '3' ? inter : 0);
    }
  }
}

void add_hyper_head(SpecBuilder& b, const ModelConfig& c, const std::string& off,
                    const std::string& hf, HyperHeadWeights* w) {
  b.add(off + "fn", hf + "fn", {c.hc_mult, c.hc_mult * c.hidden_size}, ParamInit::kHcFn,
        PackedFormat::kF32, &w->fn);
  b.add(off + "base", hf + "base", {c.hc_mult}, ParamInit::kHcBase, PackedFormat::kF32, &w->base);
  b.add(off + "scale", hf + "scale", {1}, ParamInit::kHcScale, PackedFormat::kF32, &w->scale);
}

}  // namespace

int64_t ParamSpec::numel() const {
  int64_t n = 1;
  for (int64_t d : shape)
    n *= d;
  return n;
}

std::string official_scale_name(const std::string& weight_name) {
  constexpr std::string_view kSuffix = ".weight";
  if (weight_name.size() >= kSuffix.size() &&
      weight_name.compare(weight_name.size() - kSuffix.size(), kSuffix.size(), kSuffix) == 0) {
    return weight_name.substr(0, weight_name.size() - kSuffix.size()) + ".scale";
  }
  return weight_name + ".scale";
}

std::vector<ParamSpec> model_param_specs(const ModelConfig& c, int64_t mtp_layers,
                                         ModelWeights* weights) {
  std::vector<ParamSpec> out;
  const int64_t h = c.hidden_size;
  SpecBuilder top(&out, "", "model.");
  top.add("embed.weight", "embed_tokens.weight", {c.vocab_size, h}, ParamInit::kEmbed,
          PackedFormat::kBf16, &weights->embed);
  top.add("norm.weight", "norm.weight", {h}, ParamInit::kNorm, PackedFormat::kBf16, &weights->norm);
  add_hyper_head(top, c, "hc_head_", "hc_head.hc_", &weights->hc_head);
  ParamSpec& head = top.add("head.weight", "", {c.vocab_size, h}, ParamInit::kLinear,
                            PackedFormat::kBf16, &weights->head);
  head.hf_name = "lm_head.weight";  // outside the `model.` scope
  head.hf_shape = head.shape;

  weights->layers.resize(static_cast<size_t>(c.num_layers));
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const auto n = static_cast<size_t>(i);
    add_layer(&out, "layers." + std::to_string(i) + ".", "model.layers." + std::to_string(i) + ".",
              c, c.layer_types[n], c.mlp_types[n], &weights->layers[n]);
  }
  weights->mtp.resize(static_cast<size_t>(mtp_layers));
  for (int64_t k = 0; k < mtp_layers; ++k) {
    MtpWeights& m = weights->mtp[static_cast<size_t>(k)];
    const std::string p = "mtp." + std::to_string(k) + ".";
    SpecBuilder b(&out, p, "");
    b.add("e_proj.weight", "", {h, h}, ParamInit::kLinear, PackedFormat::kFp8, &m.e_proj);
    b.add("h_proj.weight", "", {h, h}, ParamInit::kLinear, PackedFormat::kFp8, &m.h_proj);
    b.add("enorm.weight", "", {h}, ParamInit::kNorm, PackedFormat::kBf16, &m.enorm);
    b.add("hnorm.weight", "", {h}, ParamInit::kNorm, PackedFormat::kBf16, &m.hnorm);
    b.add("norm.weight", "", {h}, ParamInit::kNorm, PackedFormat::kBf16, &m.norm);
    add_hyper_head(b, c, "hc_head_", "", &m.hc_head);
    // The MTP block: sliding-window attention and score-routed MoE (MODEL-V4.md).
    add_layer(&out, p, "", c, AttentionKind::kSliding, RoutingKind::kTopK, &m.layer);
  }
  return out;
}

}  // namespace dserve::model

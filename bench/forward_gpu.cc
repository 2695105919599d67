// forward_gpu: the CUDA forward pass (model::GpuModel) at V4-Flash layer widths (hidden 4096,
// 64 heads of 512, 256 experts of 2048 with 6 active + 1 shared, the official layer pattern),
// as many layers as fit, weights generated on the device. Reports, against limits measured in
// the same run (device-to-device copy bandwidth, cuBLAS bf16 GEMM rate):
//   - prefill tokens/s at each prompt length, and achieved TFLOP/s as a fraction of the GEMM
//     rate (flops counted below);
//   - decode tokens/s at each (batch, context), and the roofline fraction: the bytes a step
//     must read (attention-path weights, the distinct routed experts' weights, the shared
//     expert, lm_head, and the KV entries attended) per second, over the copy bandwidth;
//   - KV bytes per token per layer for CSA and HCA layers against MODEL-V4.md's formula.
// Long decode contexts are assumed (GpuModel::assume_context), not prefilled.
//
//   forward_gpu [--layers 0] [--prefill 4096,32768] [--batches 1,16,64,256]
//               [--contexts 4096,65536] [--steps 8] [--json FILE] [--config-out DIR]

#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "dserve/core/random.h"
#include "dserve/kernels/cuda_model_ops.h"
#include "dserve/kernels/device.h"
#include "dserve/model/config.h"
#include "dserve/model/gpu_model.h"
#include "dserve/model/model_init.h"

namespace {

using dserve::Result;
using dserve::Status;
using dserve::model::AttentionKind;
using dserve::model::GpuModel;
using dserve::model::GpuRequestState;
using dserve::model::ModelConfig;
namespace cuda = dserve::kernels::cuda;

[[noreturn]] void fail(const std::string& what, const Status& status) {
  std::cerr << "forward_gpu: " << what << ": " << status.to_string() << "\n";
  std::exit(1);
}

template <typename T>
T must(Result<T> r, const std::string& what) {
  if (!r.is_ok()) fail(what, r.status());
  return std::move(r).value();
}

// V4-Flash widths with `layers` layers in the official pattern ([0,0] + [4,128]x20 + [4]; the
// first 3 MoE layers hash-routed).
ModelConfig flash_config(int64_t layers) {
  ModelConfig c = must(dserve::model::preset_config("v4-width"), "v4-width preset");
  c.num_layers = layers;
  c.n_routed_experts = 256;
  c.experts_per_token = 6;
  c.moe_intermediate_size = 2048;
  c.layer_types.clear();
  c.mlp_types.clear();
  for (int64_t l = 0; l < layers; ++l) {
    c.layer_types.push_back(l < 2              ? AttentionKind::kSliding
                            : (l - 2) % 2 == 0 ? AttentionKind::kCompressed
                                               : AttentionKind::kHeavy);
    c.mlp_types.push_back(l < 3 ? dserve::model::RoutingKind::kHash
                                : dserve::model::RoutingKind::kTopK);
  }
  return c;
}

// Bytes of one layer's weights as GpuModel keeps them (bf16 Linear weights, fp32 small ones),
// without the routed experts; and of one routed expert.
struct LayerBytes {
  double attention = 0;  // everything but the experts (attention path, router, shared expert)
  double expert = 0;
  double attention_params = 0;  // parameters behind `attention` (bf16 and fp32 ones)
};
LayerBytes layer_bytes(const ModelConfig& c, AttentionKind kind) {
  const double h = static_cast<double>(c.hidden_size);
  const double hd = static_cast<double>(c.head_dim);
  const double heads_hd = static_cast<double>(c.num_heads) * hd;
  const double q = static_cast<double>(c.q_lora_rank);
  const double grouped = static_cast<double>(c.o_groups * c.o_lora_rank);
  double bf16 = h * q + q * heads_hd + h * hd +
                grouped * heads_hd / static_cast<double>(c.o_groups) + grouped * h;
  if (kind != AttentionKind::kSliding) {
    const double series = kind == AttentionKind::kCompressed ? 2 : 1;
    bf16 += 2 * series * hd * h;
  }
  if (kind == AttentionKind::kCompressed) {
    const double ihd = static_cast<double>(c.index_head_dim);
    bf16 += 2 * 2 * ihd * h + static_cast<double>(c.index_n_heads) * ihd * q +
            static_cast<double>(c.index_n_heads) * h;
  }
  const double inter = static_cast<double>(c.moe_intermediate_size);
  bf16 += 3 * h * inter * static_cast<double>(c.n_shared_experts);
  const double fp32 = static_cast<double>(c.n_routed_experts) * h +  // router
                      2 * static_cast<double>((2 + c.hc_mult) * c.hc_mult) * c.hc_mult * h;
  return LayerBytes{2 * bf16 + 4 * fp32, 2 * 3 * h * inter, bf16 + fp32};
}

// Forward flops of the token at position t (0-based) in one layer: the linear layers it runs
// (6 routed experts and the shared one) and its attention and indexer products.
double token_layer_flops(const ModelConfig& c, AttentionKind kind, int64_t t) {
  const LayerBytes b = layer_bytes(c, kind);
  // One multiply-add per parameter used: the attention path, router, mHC and shared expert,
  // and the routed experts (bf16, 2 bytes a parameter).
  const double params =
      b.attention_params + static_cast<double>(c.experts_per_token) * b.expert / 2;
  double flops = 2 * params;
  const double window = static_cast<double>(std::min<int64_t>(t + 1, c.sliding_window));
  double compressed = 0;
  if (kind == AttentionKind::kHeavy) compressed = static_cast<double>((t + 1) / c.hca_rate);
  if (kind == AttentionKind::kCompressed) {
    const double visible = static_cast<double>((t + 1) / c.csa_rate);
    compressed = std::min(visible, static_cast<double>(c.index_topk));
    flops += 2 * static_cast<double>(c.index_n_heads * c.index_head_dim) * visible;
  }
  flops += 2 * 2 * static_cast<double>(c.num_heads * c.head_dim) * (window + compressed);
  return flops;
}

// KV bytes a decode step reads for one request at context `ctx` in one layer (fp32 rows):
// the window, the attended compressed entries, and on CSA layers every visible indexer key.
double kv_read_bytes(const ModelConfig& c, AttentionKind kind, int64_t ctx) {
  const double hd = static_cast<double>(c.head_dim);
  double rows = static_cast<double>(std::min<int64_t>(ctx, c.sliding_window));
  double bytes = 0;
  if (kind == AttentionKind::kHeavy) rows += static_cast<double>(ctx / c.hca_rate);
  if (kind == AttentionKind::kCompressed) {
    rows += static_cast<double>(std::min<int64_t>(ctx / c.csa_rate, c.index_topk));
    bytes += static_cast<double>(ctx / c.csa_rate) * static_cast<double>(c.index_head_dim) * 4;
  }
  return bytes + rows * hd * 4;
}

std::vector<int64_t> parse_list(const std::string& text) {
  std::vector<int64_t> out;
  size_t start = 0;
  while (start < text.size()) {
    const size_t comma = text.find(',', start);
    out.push_back(std::stoll(text.substr(start, comma - start)));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"GpuModel prefill and decode at V4-Flash widths, against the device's limits"};
  int64_t layers = 0;
  std::string prefill_list = "4096,32768";
  std::string batch_list = "1,16,64,256";
  std::string context_list = "4096,65536";
  int steps = 8;
  std::string json_path;
  std::string config_out;
  app.add_option("--layers", layers, "decoder layers (0: as many as fit)");
  app.add_option("--config-out", config_out,
                 "write the model's config.json (transformers layout) into this directory, for "
                 "bench/forward_gpu_transformers.py");
  app.add_option("--prefill", prefill_list, "prompt lengths for prefill");
  app.add_option("--batches", batch_list, "decode batch sizes");
  app.add_option("--contexts", context_list, "decode context lengths");
  app.add_option("--steps", steps, "timed decode steps per point")->check(CLI::PositiveNumber);
  app.add_option("--json", json_path, "also write the figures as JSON lines here");
  CLI11_PARSE(app, argc, argv);
  const auto prefills = parse_list(prefill_list);
  const auto batches = parse_list(batch_list);
  const auto contexts = parse_list(context_list);

  const auto device = dserve::kernels::probe_cuda_device();
  if (!device.available) {
    std::cerr << "forward_gpu: no usable GPU: " << device.why_unavailable << "\n";
    return 2;
  }
  std::cout << "device: " << device.name << ", " << device.memory_bytes / (1u << 20) << " MiB\n";

  // The device's own limits, measured first.
  const double copy_bw = must(cuda::measure_copy_bandwidth(size_t{1} << 30, 20), "copy bandwidth");
  double gemm_peak = 0;
  {
    auto blas = must(cuda::BlasHandle::create(), "cuBLAS");
    gemm_peak = must(cuda::measure_bf16_gemm_flops(blas, 8192, 8192, 8192, 20), "GEMM peak");
  }
  std::printf("copy bandwidth (read + write): %.0f GB/s; cuBLAS bf16 GEMM 8192^3: %.1f TFLOP/s\n",
              copy_bw / 1e9, gemm_peak / 1e12);

  const int64_t max_batch = *std::max_element(batches.begin(), batches.end());
  const int64_t max_context = *std::max_element(contexts.begin(), contexts.end());
  const int64_t max_prompt = *std::max_element(prefills.begin(), prefills.end());
  dserve::model::GpuModelOptions options;
  options.weights = dserve::model::GpuWeights::kBf16;
  // A decode point runs a warm-up step, the timed steps and as many untimed ones.
  options.max_positions = std::max<int64_t>(max_context + 2 * steps + 1, max_prompt);
  options.max_requests = max_batch;
  options.max_chunk_tokens = std::max<int64_t>(4096, max_batch);
  if (layers == 0) {
    // Weights plus, per layer, the pools for max_batch requests at max_positions; 12 GiB kept
    // for scratch and the runtime.
    const auto memory = must(cuda::device_memory(), "device memory");
    const ModelConfig probe = flash_config(4);
    double per_layer = 0;
    for (const AttentionKind kind : {AttentionKind::kCompressed, AttentionKind::kHeavy}) {
      const LayerBytes b = layer_bytes(probe, kind);
      const double pools =
          static_cast<double>(max_batch) * static_cast<double>(options.max_positions) *
          (kind == AttentionKind::kCompressed
               ? static_cast<double>(probe.head_dim + probe.index_head_dim) * 4 / probe.csa_rate
               : static_cast<double>(probe.head_dim) * 4 / probe.hca_rate);
      per_layer = std::max(per_layer, b.attention + 256 * b.expert + pools);
    }
    const double usable = static_cast<double>(memory.free_bytes) - 12.0 * (1u << 30);
    layers = std::max<int64_t>(1, static_cast<int64_t>(usable / per_layer));
  }
  const ModelConfig config = flash_config(layers);
  std::printf(
      "model: %lld layers at V4-Flash widths, bf16 weights, fp32 KV; max_positions %lld, "
      "max_requests %lld\n",
      static_cast<long long>(layers), static_cast<long long>(options.max_positions),
      static_cast<long long>(options.max_requests));
  if (!config_out.empty()) {
    std::ofstream(config_out + "/config.json") << dserve::model::model_config_to_json(config);
    std::printf("wrote %s/config.json\n", config_out.c_str());
  }
  auto model = must(GpuModel::create_random(config, options, 7), "create_random");
  std::printf("weights %.1f GiB, KV pools %.1f GiB\n",
              static_cast<double>(model->weight_bytes()) / (1u << 30),
              static_cast<double>(model->pool_bytes()) / (1u << 30));
  std::ofstream json;
  if (!json_path.empty()) json.open(json_path);
  dserve::SplitMix64 rng(11);
  auto random_tokens = [&](int64_t n) {
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (auto& id : ids)
      id = static_cast<int32_t>(rng.below(static_cast<uint64_t>(config.vocab_size)));
    return ids;
  };

  // Prefill.
  for (const int64_t len : prefills) {
    const auto ids = random_tokens(len);
    auto state = must(model->new_state(), "new_state");
    const double seconds = must(
        cuda::time_seconds_synchronized([&] { return model->forward_greedy(ids, state).status(); }),
        "prefill " + std::to_string(len));
    double flops = 2.0 * static_cast<double>(config.vocab_size * config.hidden_size);
    for (int64_t l = 0; l < layers; ++l) {
      for (int64_t t = 0; t < len; ++t)
        flops += token_layer_flops(config, config.layer_types[static_cast<size_t>(l)], t);
    }
    std::printf("prefill %6lld tokens: %8.0f tokens/s, %6.1f TFLOP/s = %.2f of the GEMM rate\n",
                static_cast<long long>(len), static_cast<double>(len) / seconds,
                flops / seconds / 1e12, flops / seconds / gemm_peak);
    if (json) {
      json << "{\"kind\":\"prefill\",\"tokens\":" << len << ",\"seconds\":" << seconds
           << ",\"tflops\":" << flops / seconds / 1e12
           << ",\"gemm_fraction\":" << flops / seconds / gemm_peak << "}\n";
    }
    if (len == prefills.front()) {
      // KV bytes per token per layer, by layer type, against the bf16 formula of MODEL-V4.md.
      for (int64_t l = 0; l < layers; ++l) {
        const AttentionKind kind = config.layer_types[static_cast<size_t>(l)];
        if (kind == AttentionKind::kSliding) continue;
        const double per_token =
            static_cast<double>(model->kv_bytes(state, l)) / static_cast<double>(len);
        const double formula =
            kind == AttentionKind::kCompressed
                ? (config.head_dim + config.index_head_dim) * 2.0 / config.csa_rate
                : config.head_dim * 2.0 / config.hca_rate;
        std::printf(
            "KV bytes per token, layer %lld (%s): %.1f measured (fp32 rows), %.1f by the "
            "bf16 formula\n",
            static_cast<long long>(l), kind == AttentionKind::kCompressed ? "CSA" : "HCA",
            per_token, formula);
        if (l >= 3) break;
      }
    }
  }

  // Decode.
  double attention_weights = static_cast<double>(config.vocab_size * config.hidden_size) * 2;
  for (int64_t l = 0; l < layers; ++l)
    attention_weights += layer_bytes(config, config.layer_types[static_cast<size_t>(l)]).attention;
  const double expert_bytes = layer_bytes(config, AttentionKind::kSliding).expert;
  for (const int64_t ctx : contexts) {
    for (const int64_t batch : batches) {
      std::vector<GpuRequestState> states;
      std::vector<GpuRequestState*> rows;
      for (int64_t b = 0; b < batch; ++b) {
        states.push_back(must(model->new_state(), "new_state"));
        const Status s = model->assume_context(states.back(), ctx);
        if (!s.is_ok()) fail("assume_context", s);
      }
      for (auto& st : states)
        rows.push_back(&st);
      std::vector<int32_t> next = random_tokens(batch);
      next = must(model->decode_greedy(rows, next), "decode warm-up");
      const double seconds = must(cuda::time_seconds_synchronized([&]() -> Status {
                                    for (int s = 0; s < steps; ++s) {
                                      auto out = model->decode_greedy(rows, next);
                                      if (!out.is_ok()) return out.status();
                                      next = std::move(out).value();
                                    }
                                    return Status::ok();
                                  }),
                                  "decode");
      // The distinct routed experts per step, over as many steps again, untimed.
      int64_t distinct = 0;
      for (int s = 0; s < steps; ++s) {
        next = must(model->decode_greedy(rows, next), "decode");
        distinct += must(model->last_batch_distinct_experts(), "routed experts");
      }
      const double step = seconds / steps;
      double kv = 0;
      for (int64_t l = 0; l < layers; ++l)
        kv += kv_read_bytes(config, config.layer_types[static_cast<size_t>(l)], ctx);
      const double bytes = attention_weights +
                           static_cast<double>(distinct) / steps * expert_bytes +
                           kv * static_cast<double>(batch);
      std::printf(
          "decode ctx %6lld batch %4lld: %9.0f tokens/s, %7.2f ms/step, %.1f GB/step, "
          "roofline %.2f of copy bandwidth\n",
          static_cast<long long>(ctx), static_cast<long long>(batch),
          static_cast<double>(batch) / step, step * 1e3, bytes / 1e9, bytes / step / copy_bw);
      if (json) {
        json << "{\"kind\":\"decode\",\"context\":" << ctx << ",\"batch\":" << batch
             << ",\"step_seconds\":" << step << ",\"bytes\":" << bytes
             << ",\"roofline\":" << bytes / step / copy_bw << "}\n";
      }
    }
  }
  return 0;
}

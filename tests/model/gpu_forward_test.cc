// GpuModel against the CPU reference (Model) on the same checkpoints: logits of whole
// forwards, of chunked prefills and of one-token decode, greedy generations, and the errors a
// caller can act on. Runs where a GPU is usable; elsewhere every test reports SKIPPED with
// kernels::probe_cuda_device()'s reason.
//
// Tolerances (largest |gpu - cpu| over a row of logits, relative to the row's largest |cpu|):
// fp32 weights 1e-4 (the two backends differ by summation order only); bf16 weights 3e-2 (the
// weights and every GEMM input are rounded to 8 bits of mantissa) for the median row. A few
// rows may exceed it with a correct backend: on the CPU, rounding only attention's inputs to
// bf16 flips a discrete choice of the tiny model (an MoE route) for 3 of 9 prompts, moving
// later rows by up to 0.4.

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "dserve/core/random.h"
#include "dserve/kernels/device.h"
#include "dserve/model/checkpoint.h"
#include "dserve/model/gpu_model.h"
#include "dserve/model/model.h"
#include "dserve/model/model_init.h"
#include "dserve/model/sampler.h"
#include "test_model.h"

namespace dserve::model {
namespace {

constexpr double kFp32Tolerance = 1e-4;
constexpr double kBf16Tolerance = 3e-2;

using testing_support::relative_row_diff;

std::vector<int32_t> prompt(int64_t n, uint64_t seed, int64_t vocab) {
  SplitMix64 rng(seed);
  std::vector<int32_t> ids{0};
  while (static_cast<int64_t>(ids.size()) < n)
    ids.push_back(static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab))));
  return ids;
}

// Worst relative row difference between two [rows, vocab] logits.
double worst_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  double worst = 0.0;
  for (int64_t t = 0; t < std::min(a.rows(), b.rows()); ++t)
    worst = std::max(worst, relative_row_diff(a.row(t), b.row(t), a.cols()));
  return worst;
}

// Median relative row difference: a few rows may jump where a perturbation the size of bf16
// rounding flips a discrete choice (an MoE route, an indexer pick) of the tiny model.
double median_diff(std::vector<double> diffs) {
  if (diffs.empty()) return 0.0;
  const auto mid = diffs.begin() + static_cast<std::ptrdiff_t>(diffs.size() / 2);
  std::nth_element(diffs.begin(), mid, diffs.end());
  return *mid;
}

std::vector<double> row_diffs(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  std::vector<double> diffs;
  for (int64_t t = 0; t < std::min(a.rows(), b.rows()); ++t)
    diffs.push_back(relative_row_diff(a.row(t), b.row(t), a.cols()));
  return diffs;
}

Tensor cpu_logits(const Model& model, const std::vector<int32_t>& ids) {
  RequestState state = model.new_state();
  auto logits = model.forward(ids, state);
  EXPECT_TRUE(logits.is_ok()) << logits.status().to_string();
  return std::move(logits).value();
}

// The GPU's logits of every position, running the prompt in chunks of `chunk` tokens.
Tensor gpu_logits(GpuModel& model, const std::vector<int32_t>& ids, int64_t chunk) {
  auto state = model.new_state();
  EXPECT_TRUE(state.is_ok()) << state.status().to_string();
  const int64_t vocab = model.config().vocab_size;
  Tensor all({static_cast<int64_t>(ids.size()), vocab});
  for (size_t begin = 0; begin < ids.size(); begin += static_cast<size_t>(chunk)) {
    const size_t end = std::min(ids.size(), begin + static_cast<size_t>(chunk));
    auto logits = model.forward(std::span(ids).subspan(begin, end - begin), *state);
    EXPECT_TRUE(logits.is_ok()) << logits.status().to_string();
    if (!logits.is_ok()) return all;
    std::copy(logits->data(), logits->data() + logits->numel(),
              all.row(static_cast<int64_t>(begin)));
  }
  EXPECT_EQ(state->position(), static_cast<int64_t>(ids.size()));
  return all;
}

std::vector<int32_t> cpu_greedy(const Model& model, const std::vector<int32_t>& ids, int steps) {
  RequestState state = model.new_state();
  std::vector<int32_t> out;
  auto logits = model.forward(ids, state, LogitsFor::kLastToken);
  for (int i = 0; i < steps && logits.is_ok(); ++i) {
    out.push_back(argmax(logits->span()));
    const int32_t next = out.back();
    logits = model.forward(std::span(&next, 1), state, LogitsFor::kLastToken);
  }
  EXPECT_TRUE(logits.is_ok()) << logits.status().to_string();
  return out;
}

std::vector<int32_t> gpu_greedy(GpuModel& model, const std::vector<int32_t>& ids, int steps) {
  auto state = model.new_state();
  EXPECT_TRUE(state.is_ok()) << state.status().to_string();
  std::vector<int32_t> out;
  auto token = model.forward_greedy(ids, *state);
  for (int i = 0; i < steps && token.is_ok(); ++i) {
    out.push_back(*token);
    const int32_t next = out.back();
    token = model.forward_greedy(std::span(&next, 1), *state);
  }
  EXPECT_TRUE(token.is_ok()) << token.status().to_string();
  return out;
}

class GpuForwardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const kernels::DeviceInfo device = kernels::probe_cuda_device();
    if (!device.available) GTEST_SKIP() << "no usable GPU: " << device.why_unavailable;
  }

  static std::unique_ptr<GpuModel> gpu(const Model& cpu, GpuWeights weights,
                                       int64_t max_chunk_tokens = 1024) {
    GpuModelOptions options;
    options.weights = weights;
    options.max_positions = 2048;
    options.max_requests = 2;
    options.max_chunk_tokens = max_chunk_tokens;
    auto model = GpuModel::create(cpu.config(), cpu.weights(), options);
    EXPECT_TRUE(model.is_ok()) << model.status().to_string();
    return model.is_ok() ? std::move(model).value() : nullptr;
  }
};

TEST_F(GpuForwardTest, Fp32LogitsMatchCpuForWholeAndChunkedPrefill) {
  const Model& cpu = testing_support::tiny_model();
  auto model = gpu(cpu, GpuWeights::kFp32);
  ASSERT_NE(model, nullptr);
  // 70 tokens: 17 CSA entries against index_topk 8 (sparse selection), 4 HCA entries, the
  // sliding window (16) wrapping several times.
  const auto ids = prompt(70, 42, cpu.config().vocab_size);
  const Tensor expected = cpu_logits(cpu, ids);
  for (int64_t chunk : {70, 16, 3, 1}) {
    const double diff = worst_diff(gpu_logits(*model, ids, chunk), expected);
    EXPECT_LT(diff, kFp32Tolerance) << "chunk " << chunk;
    std::cout << "[ figures  ] fp32 chunk " << chunk << ": worst relative logit diff " << diff
              << "\n";
  }
}

// Up to 2048 routed pairs a batch groups its rows by expert on the device; a longer prefill
// groups them on the host and runs each expert through cuBLAS. Both give the CPU's logits.
TEST_F(GpuForwardTest, LongPrefillGroupsExpertsOnTheHost) {
  const Model& cpu = testing_support::tiny_model();
  auto model = gpu(cpu, GpuWeights::kFp32, /*max_chunk_tokens=*/2048);
  ASSERT_NE(model, nullptr);
  const int64_t n = 2048 / cpu.config().experts_per_token + 77;  // past the device grouping
  const auto ids = prompt(n, 8, cpu.config().vocab_size);
  const double diff = worst_diff(gpu_logits(*model, ids, n), cpu_logits(cpu, ids));
  EXPECT_LT(diff, kFp32Tolerance);
  std::cout << "[ figures  ] fp32 " << n << "-token prefill (host grouping): worst relative "
            << "logit diff " << diff << "\n";
}

TEST_F(GpuForwardTest, PassesSplitByScratchSizeGiveTheSameLogits) {
  const Model& cpu = testing_support::tiny_model();
  auto small = gpu(cpu, GpuWeights::kFp32, /*max_chunk_tokens=*/5);
  ASSERT_NE(small, nullptr);
  const auto ids = prompt(37, 7, cpu.config().vocab_size);
  EXPECT_LT(worst_diff(gpu_logits(*small, ids, 37), cpu_logits(cpu, ids)), kFp32Tolerance);
}

TEST_F(GpuForwardTest, Fp32GreedyGenerationsEqualCpu) {
  const Model& cpu = testing_support::tiny_model();
  auto model = gpu(cpu, GpuWeights::kFp32);
  ASSERT_NE(model, nullptr);
  int equal = 0;
  for (uint64_t p = 0; p < 20; ++p) {
    const auto ids = prompt(8 + static_cast<int64_t>(p) * 5, 1000 + p, cpu.config().vocab_size);
    const auto want = cpu_greedy(cpu, ids, 256);
    const auto got = gpu_greedy(*model, ids, 256);
    EXPECT_EQ(got, want) << "prompt " << p;
    equal += got == want ? 1 : 0;
  }
  std::cout << "[ figures  ] fp32 greedy: " << equal << "/20 prompts x 256 tokens equal\n";
}

// fp8 KV on the device: the window's kv, the compressed entries and the indexer keys and
// queries are rounded where the GPU writes them, with the arithmetic the host's row formats use
// (GpuMath.KvRoundingMatchesTheRowFormats checks it bit for bit on the host). The logits then
// follow the CPU's fp8 forward; a value that lands on the other side of an e4m3 rounding
// boundary (fp32 sums in another order) can move a logit by more than fp32 ever does, so the
// bound is looser and the figures are printed.
TEST_F(GpuForwardTest, Fp8KvLogitsFollowTheCpuFp8Forward) {
  const Model& cpu = testing_support::tiny_model(kvstore::KvDtype::kFp8);
  auto model = gpu(cpu, GpuWeights::kFp32);
  ASSERT_NE(model, nullptr);
  const auto ids = prompt(70, 42, cpu.config().vocab_size);
  const Tensor expected = cpu_logits(cpu, ids);
  const double fp32_gap = worst_diff(cpu_logits(testing_support::tiny_model(), ids), expected);
  for (int64_t chunk : {70, 16, 1}) {
    const double diff = worst_diff(gpu_logits(*model, ids, chunk), expected);
    EXPECT_LT(diff, 0.05) << "chunk " << chunk;
    std::cout << "[ figures  ] fp8 KV chunk " << chunk << ": worst relative logit diff to the "
              << "CPU's fp8 forward " << diff << " (fp8 against fp32 on the CPU: " << fp32_gap
              << ")\n";
  }
}

TEST_F(GpuForwardTest, Bf16LogitsWithinTolerance) {
  const Model& cpu = testing_support::tiny_model();
  auto model = gpu(cpu, GpuWeights::kBf16);
  ASSERT_NE(model, nullptr);
  const auto ids = prompt(70, 43, cpu.config().vocab_size);
  const std::vector<double> diffs = row_diffs(gpu_logits(*model, ids, 70), cpu_logits(cpu, ids));
  EXPECT_LT(median_diff(diffs), kBf16Tolerance);
  std::cout << "[ figures  ] bf16: median relative logit diff " << median_diff(diffs) << ", worst "
            << *std::max_element(diffs.begin(), diffs.end()) << "\n";
  int equal = 0;
  for (uint64_t p = 0; p < 20; ++p) {
    const auto prompt_ids = prompt(16, 2000 + p, cpu.config().vocab_size);
    equal += gpu_greedy(*model, prompt_ids, 256) == cpu_greedy(cpu, prompt_ids, 256) ? 1 : 0;
  }
  std::cout << "[ figures  ] bf16 greedy: " << equal << "/20 prompts x 256 tokens equal\n";
}

TEST_F(GpuForwardTest, V4WidthPresetMatchesCpu) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("dserve-v4-width-" + std::to_string(::getpid()));
  ModelInitOptions opts;
  opts.preset = "v4-width";
  opts.seed = 5;
  opts.out_dir = dir.string();
  opts.tokenizer_json = testing_support::tokenizer_json();
  ASSERT_TRUE(write_random_checkpoint(opts).is_ok());
  auto config = load_model_config(dir.string());
  ASSERT_TRUE(config.is_ok()) << config.status().to_string();
  auto weights = load_checkpoint(dir.string(), *config);
  ASSERT_TRUE(weights.is_ok()) << weights.status().to_string();
  std::filesystem::remove_all(dir);
  const Model cpu(std::move(config).value(), std::move(weights).value());
  auto model = gpu(cpu, GpuWeights::kFp32);
  ASSERT_NE(model, nullptr);
  // 300 tokens: 75 CSA entries (top-k 512 takes them all), 2 HCA entries.
  const auto ids = prompt(300, 9, cpu.config().vocab_size);
  const Tensor want = cpu_logits(cpu, ids);
  const double diff = worst_diff(gpu_logits(*model, ids, 300), want);
  EXPECT_LT(diff, kFp32Tolerance);
  std::cout << "[ figures  ] v4-width fp32: worst relative logit diff " << diff << "\n";
  {
    // bf16 weights: the prefill's attention runs on tensor cores (GpuAttention::kAuto), 64
    // heads of 512 channels in four 16-head blocks per row.
    auto bf16 = gpu(cpu, GpuWeights::kBf16);
    ASSERT_NE(bf16, nullptr);
    const double bf16_diff = median_diff(row_diffs(gpu_logits(*bf16, ids, 300), want));
    EXPECT_LT(bf16_diff, kBf16Tolerance);
    std::cout << "[ figures  ] v4-width bf16, tensor-core attention: median relative logit diff "
              << bf16_diff << "\n";
  }
  for (uint64_t p = 0; p < 4; ++p) {
    const auto prompt_ids = prompt(64, 3000 + p, cpu.config().vocab_size);
    EXPECT_EQ(gpu_greedy(*model, prompt_ids, 32), cpu_greedy(cpu, prompt_ids, 32))
        << "prompt " << p;
  }
}

// Attention on tensor cores (bf16 queries, keys and probabilities) against the fp32 CUDA-core
// kernel, on the same bf16 weights: prefill passes whole and in chunks, and decode steps. The
// tiny model's 4 heads fill a quarter of a 16-head block (the rest is padding). Compared by
// the median row (see median_diff); tests/kernels/attention_test checks the kernel itself
// output for output.
TEST_F(GpuForwardTest, TensorCoreAttentionMatchesCudaCores) {
  const Model& cpu = testing_support::tiny_model();
  auto with = [&](GpuAttention attention) -> std::unique_ptr<GpuModel> {
    GpuModelOptions options;
    options.weights = GpuWeights::kBf16;
    options.max_positions = 2048;
    options.max_requests = 1;
    options.attention = attention;
    auto model = GpuModel::create(cpu.config(), cpu.weights(), options);
    EXPECT_TRUE(model.is_ok()) << model.status().to_string();
    return model.is_ok() ? std::move(model).value() : nullptr;
  };
  auto cores = with(GpuAttention::kCudaCores);
  auto tensor = with(GpuAttention::kTensorCores);
  ASSERT_NE(cores, nullptr);
  ASSERT_NE(tensor, nullptr);
  const int64_t vocab = cpu.config().vocab_size;
  const auto ids = prompt(70, 47, vocab);
  const Tensor want = cpu_logits(cpu, ids);
  for (const int64_t chunk : {70, 7}) {
    const Tensor got = gpu_logits(*tensor, ids, chunk);
    const double against_cores = median_diff(row_diffs(got, gpu_logits(*cores, ids, chunk)));
    const double against_cpu = median_diff(row_diffs(got, want));
    EXPECT_LT(against_cores, kBf16Tolerance) << "chunks of " << chunk;
    EXPECT_LT(against_cpu, kBf16Tolerance) << "chunks of " << chunk;
    std::cout << "[ figures  ] tensor-core attention, chunks of " << chunk
              << ": median relative row diff " << against_cores << " against CUDA cores, "
              << against_cpu << " against the CPU\n";
  }
  // Decode steps past the window and several compressor windows, fed the same tokens.
  auto a = cores->new_state();
  auto b = tensor->new_state();
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  ASSERT_TRUE(cores->forward(ids, *a).is_ok());
  ASSERT_TRUE(tensor->forward(ids, *b).is_ok());
  const auto steps = prompt(48, 48, vocab);
  std::vector<double> diffs;
  for (size_t i = 0; i < steps.size(); ++i) {
    GpuRequestState* sa = &*a;
    GpuRequestState* sb = &*b;
    auto la = cores->decode(std::span(&sa, 1), std::span(&steps[i], 1));
    auto lb = tensor->decode(std::span(&sb, 1), std::span(&steps[i], 1));
    ASSERT_TRUE(la.is_ok()) << la.status().to_string();
    ASSERT_TRUE(lb.is_ok()) << lb.status().to_string();
    diffs.push_back(relative_row_diff(lb->row(0), la->row(0), vocab));
  }
  const double decode_diff = median_diff(diffs);
  EXPECT_LT(decode_diff, kBf16Tolerance);
  std::cout << "[ figures  ] tensor-core attention, 48 decode steps: median relative row diff "
            << decode_diff << "\n";
}

// Requests at different positions decode together in one batch: each gets the tokens and
// logits it gets alone on the CPU.
TEST_F(GpuForwardTest, BatchedDecodeMatchesEachRequestAlone) {
  const Model& cpu = testing_support::tiny_model();
  GpuModelOptions options;
  options.weights = GpuWeights::kFp32;
  options.max_positions = 1024;
  options.max_requests = 6;
  options.max_chunk_tokens = 256;
  auto created = GpuModel::create(cpu.config(), cpu.weights(), options);
  ASSERT_TRUE(created.is_ok()) << created.status().to_string();
  GpuModel& model = **created;
  const int64_t vocab = cpu.config().vocab_size;
  constexpr int kRequests = 6;
  constexpr int kSteps = 64;
  std::vector<GpuRequestState> states;
  std::vector<RequestState> cpu_states;
  std::vector<int32_t> next;
  for (int r = 0; r < kRequests; ++r) {
    // Prompt lengths around window and compressor boundaries: 1, 15, 16, 17, 64, 130.
    const int64_t len = std::vector<int64_t>{1, 15, 16, 17, 64, 130}[static_cast<size_t>(r)];
    const auto ids = prompt(len, 500 + static_cast<uint64_t>(r), vocab);
    auto s = model.new_state();
    ASSERT_TRUE(s.is_ok()) << s.status().to_string();
    auto first = model.forward_greedy(ids, *s);
    ASSERT_TRUE(first.is_ok()) << first.status().to_string();
    states.push_back(std::move(s).value());
    cpu_states.push_back(cpu.new_state());
    auto cpu_logits_first = cpu.forward(ids, cpu_states.back(), LogitsFor::kLastToken);
    ASSERT_TRUE(cpu_logits_first.is_ok());
    EXPECT_EQ(*first, argmax(cpu_logits_first->span())) << "request " << r;
    next.push_back(*first);
  }
  std::vector<GpuRequestState*> batch;
  for (GpuRequestState& s : states)
    batch.push_back(&s);
  double worst = 0.0;
  for (int step = 0; step < kSteps; ++step) {
    auto logits = model.decode(batch, next);
    ASSERT_TRUE(logits.is_ok()) << logits.status().to_string();
    for (int r = 0; r < kRequests; ++r) {
      const int32_t token = next[static_cast<size_t>(r)];
      auto want = cpu.forward(std::span(&token, 1), cpu_states[static_cast<size_t>(r)],
                              LogitsFor::kLastToken);
      ASSERT_TRUE(want.is_ok());
      worst = std::max(worst, relative_row_diff(logits->row(r), want->data(), vocab));
      const int32_t gpu_next =
          argmax(std::span<const float>(logits->row(r), static_cast<size_t>(vocab)));
      ASSERT_EQ(gpu_next, argmax(want->span())) << "request " << r << " step " << step;
      next[static_cast<size_t>(r)] = gpu_next;
    }
  }
  EXPECT_LT(worst, kFp32Tolerance);
  std::cout << "[ figures  ] batched decode (" << kRequests << " requests x " << kSteps
            << " steps): worst relative logit diff " << worst << "\n";
  // decode_greedy picks the same tokens as decode's logits.
  auto greedy = model.decode_greedy(batch, next);
  ASSERT_TRUE(greedy.is_ok()) << greedy.status().to_string();
  for (int r = 0; r < kRequests; ++r) {
    const int32_t token = next[static_cast<size_t>(r)];
    auto want = cpu.forward(std::span(&token, 1), cpu_states[static_cast<size_t>(r)],
                            LogitsFor::kLastToken);
    ASSERT_TRUE(want.is_ok());
    EXPECT_EQ((*greedy)[static_cast<size_t>(r)], argmax(want->span())) << "request " << r;
  }
}

// A decode step replayed from its captured graph computes what the same step launched anew
// computes, bit for bit, at several batch sizes (each captured on first use).
TEST_F(GpuForwardTest, DecodeGraphsReplayTheEagerStep) {
  const Model& cpu = testing_support::tiny_model();
  GpuModelOptions options;
  options.weights = GpuWeights::kBf16;
  options.max_positions = 512;
  options.max_requests = 4;
  options.max_chunk_tokens = 128;
  auto graphs = GpuModel::create(cpu.config(), cpu.weights(), options);
  options.decode_graphs = false;
  auto eager = GpuModel::create(cpu.config(), cpu.weights(), options);
  ASSERT_TRUE(graphs.is_ok() && eager.is_ok());
  std::vector<GpuRequestState> a, b;
  std::vector<int32_t> next;
  for (int r = 0; r < 4; ++r) {
    const auto ids = prompt(20 + 9 * r, 700 + static_cast<uint64_t>(r), cpu.config().vocab_size);
    a.push_back(std::move((*graphs)->new_state()).value());
    b.push_back(std::move((*eager)->new_state()).value());
    auto ta = (*graphs)->forward_greedy(ids, a.back());
    auto tb = (*eager)->forward_greedy(ids, b.back());
    ASSERT_TRUE(ta.is_ok() && tb.is_ok());
    ASSERT_EQ(*ta, *tb);
    next.push_back(*ta);
  }
  for (int step = 0; step < 24; ++step) {
    const size_t batch = 1 + static_cast<size_t>(step) % 4;  // sizes 1..4, each replayed
    std::vector<GpuRequestState*> ra, rb;
    for (size_t r = 0; r < batch; ++r) {
      ra.push_back(&a[r]);
      rb.push_back(&b[r]);
    }
    const std::span<const int32_t> tokens(next.data(), batch);
    auto la = (*graphs)->decode(ra, tokens);
    auto lb = (*eager)->decode(rb, tokens);
    ASSERT_TRUE(la.is_ok()) << la.status().to_string();
    ASSERT_TRUE(lb.is_ok()) << lb.status().to_string();
    ASSERT_EQ(la->span().size(), lb->span().size());
    for (size_t i = 0; i < la->span().size(); ++i)
      ASSERT_EQ(la->span()[i], lb->span()[i]) << "step " << step << " value " << i;
    for (size_t r = 0; r < batch; ++r) {
      next[r] = argmax(std::span<const float>(la->row(static_cast<int64_t>(r)),
                                              static_cast<size_t>(cpu.config().vocab_size)));
    }
  }
  // The replays were graphs, not an eager fallback.
  for (int64_t batch = 1; batch <= 4; ++batch) {
    const Status captured = (*graphs)->decode_graph_status(batch);
    EXPECT_TRUE(captured.is_ok()) << "batch " << batch << ": " << captured.to_string();
    EXPECT_EQ((*eager)->decode_graph_status(batch).code(), StatusCode::kNotFound);
  }
}

// The benchmark path: generated weights and assumed contexts give finite logits at every
// batch size the benchmark uses, and a loaded model refuses assume_context.
TEST_F(GpuForwardTest, GeneratedModelDecodesAssumedContexts) {
  const Model& cpu = testing_support::tiny_model();
  GpuModelOptions options;
  options.max_positions = 1024;
  options.max_requests = 16;
  options.max_chunk_tokens = 64;
  auto created = GpuModel::create_random(cpu.config(), options, 3);
  ASSERT_TRUE(created.is_ok()) << created.status().to_string();
  GpuModel& model = **created;
  std::vector<GpuRequestState> states;
  for (int b = 0; b < 16; ++b) {
    states.push_back(std::move(model.new_state()).value());
    ASSERT_TRUE(model.assume_context(states.back(), 300 + b * 37).is_ok());
  }
  std::vector<GpuRequestState*> rows;
  for (auto& s : states)
    rows.push_back(&s);
  const std::vector<int32_t> tokens(16, 5);
  auto logits = model.decode(rows, tokens);
  ASSERT_TRUE(logits.is_ok()) << logits.status().to_string();
  for (float v : logits->span())
    ASSERT_TRUE(std::isfinite(v));
  auto routed = model.last_batch_distinct_experts();
  ASSERT_TRUE(routed.is_ok());
  EXPECT_GT(*routed, 0);
  EXPECT_GT(model.kv_bytes(states.front(), 1), size_t{0});

  auto loaded = gpu(cpu, GpuWeights::kFp32);
  ASSERT_NE(loaded, nullptr);
  auto state = loaded->new_state();
  ASSERT_TRUE(state.is_ok());
  EXPECT_EQ(loaded->assume_context(*state, 10).code(), StatusCode::kInvalidArgument);
}

TEST_F(GpuForwardTest, RefusesBadInputWithoutTouchingTheState) {
  const Model& cpu = testing_support::tiny_model();
  auto model = gpu(cpu, GpuWeights::kFp32);
  ASSERT_NE(model, nullptr);
  auto state = model->new_state();
  ASSERT_TRUE(state.is_ok());
  const std::vector<int32_t> bad = {0, static_cast<int32_t>(cpu.config().vocab_size)};
  EXPECT_EQ(model->forward(bad, *state).status().code(), StatusCode::kOutOfRange);
  EXPECT_EQ(model->forward({}, *state).status().code(), StatusCode::kInvalidArgument);
  const std::vector<int32_t> too_long(2049, 3);
  const auto past = model->forward(too_long, *state);
  EXPECT_EQ(past.status().code(), StatusCode::kOutOfRange);
  EXPECT_NE(past.status().message().find("max_positions 2048"), std::string::npos)
      << past.status().to_string();
  EXPECT_EQ(state->position(), 0);
  // Slots for max_requests (2) requests: a third state is refused while two are held, and
  // granted again once one is gone.
  std::vector<GpuRequestState> held;
  auto second = model->new_state();
  ASSERT_TRUE(second.is_ok());
  held.push_back(std::move(state).value());
  held.push_back(std::move(second).value());
  EXPECT_EQ(model->new_state().status().code(), StatusCode::kResourceExhausted);
  held.pop_back();
  EXPECT_TRUE(model->new_state().is_ok());
  // decode() checks every request before running any.
  GpuRequestState* one = &held.front();
  const std::vector<int32_t> token = {3};
  EXPECT_EQ(model->decode(std::span(&one, 1), {}).status().code(), StatusCode::kInvalidArgument);
  GpuRequestState* twice[] = {one, one};
  const std::vector<int32_t> tokens2 = {3, 4};
  EXPECT_EQ(model->decode(twice, tokens2).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(one->position(), 0);
  EXPECT_TRUE(model->decode(std::span(&one, 1), token).is_ok());
  EXPECT_EQ(one->position(), 1);
}

// Where no GPU is usable (CI), create() says so with the probe's reason instead of failing
// later; callers fall back to the CPU backend on UNAVAILABLE.
TEST(GpuModelWithoutGpu, CreateIsUnavailableWithTheReason) {
  const kernels::DeviceInfo device = kernels::probe_cuda_device();
  if (device.available) GTEST_SKIP() << "a GPU is usable here (" << device.name << ")";
  const Model& cpu = testing_support::tiny_model();
  auto model = GpuModel::create(cpu.config(), cpu.weights());
  ASSERT_FALSE(model.is_ok());
  EXPECT_EQ(model.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(model.status().message().find(device.why_unavailable), std::string::npos)
      << model.status().to_string();
  GpuModelOptions bad;
  bad.max_chunk_tokens = 0;
  EXPECT_EQ(GpuModel::create(cpu.config(), cpu.weights(), bad).status().code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dserve::model

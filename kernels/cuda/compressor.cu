// Window compressors on the GPU (MODEL-V4.md "The compressors"; the CPU twin is
// model/src/compressor.cc). A chunk's projections close zero or more windows; each closed
// window becomes one entry written straight into the request's pages. Three launches in
// stream order: pool (reads pending and overlap state), then the new overlap (reads pending),
// then the new pending tokens (overwrites pending).

#include "common.cuh"
#include "dserve/kernels/cuda_model_ops.h"

namespace dserve::kernels::cuda {
namespace {

constexpr int kThreads = 128;

// Where the projected values of the token at position p come from: this chunk (p >= first_pos)
// or the pending buffer of the open window (slot p % rate).
struct TokenSource {
  const float* kv;
  const float* gate;
  const float* pending_kv;
  const float* pending_gate;
  const float* ape;
  int64_t first_pos;
  int64_t rate;
  int64_t row;  // series * width

  __device__ float value(int64_t p, int64_t col) const {
    return p >= first_pos ? kv[(p - first_pos) * row + col] : pending_kv[(p % rate) * row + col];
  }
  // The gate logit with the position bias added.
  __device__ float logit(int64_t p, int64_t col) const {
    const float g =
        p >= first_pos ? gate[(p - first_pos) * row + col] : pending_gate[(p % rate) * row + col];
    return g + ape[(p % rate) * row + col];
  }
};

// One block per closed window: each thread pools channels (softmax over the window's gate
// logits per channel, the previous window's Ca first for overlapping compressors), then the
// block RMS-normalises the entry, rotates its rope channels at the window's first position
// and writes it into its page. Dynamic shared memory: width floats.
__global__ void pool_windows_kernel(TokenSource src, CompressorView state, int64_t first_window,
                                    PagedRowsView entries, RopeView rope, float eps) {
  extern __shared__ float entry[];
  __shared__ float scratch[kWarpSize];
  const int64_t w = first_window + blockIdx.x;
  const int64_t rate = state.rate;
  const int64_t width = state.width;
  const bool overlapping = state.series == 2;
  const bool has_prior = overlapping && w >= 1;
  // Window w - 1 is read from the overlap state when it closed before this chunk's windows.
  const bool prior_in_state = has_prior && w - 1 < first_window;
  const int64_t cb = overlapping ? width : 0;

  float sum_sq = 0.0f;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
    auto prior_logit = [&](int64_t j) {
      return prior_in_state ? state.overlap_gate[j * width + c] : src.logit((w - 1) * rate + j, c);
    };
    auto prior_value = [&](int64_t j) {
      return prior_in_state ? state.overlap_kv[j * width + c] : src.value((w - 1) * rate + j, c);
    };
    const int64_t prior = has_prior ? rate : 0;
    float max_v = -INFINITY;
    for (int64_t j = 0; j < prior; ++j)
      max_v = fmaxf(max_v, prior_logit(j));
    for (int64_t j = 0; j < rate; ++j)
      max_v = fmaxf(max_v, src.logit(w * rate + j, cb + c));
    float denominator = 0.0f;
    for (int64_t j = 0; j < prior; ++j)
      denominator += expf(prior_logit(j) - max_v);
    for (int64_t j = 0; j < rate; ++j)
      denominator += expf(src.logit(w * rate + j, cb + c) - max_v);
    const float inv = 1.0f / denominator;
    float pooled = 0.0f;
    for (int64_t j = 0; j < prior; ++j)
      pooled += expf(prior_logit(j) - max_v) * inv * prior_value(j);
    for (int64_t j = 0; j < rate; ++j) {
      pooled +=
          expf(src.logit(w * rate + j, cb + c) - max_v) * inv * src.value(w * rate + j, cb + c);
    }
    entry[c] = pooled;
    sum_sq += pooled * pooled;
  }
  sum_sq = block_all_reduce(sum_sq, SumOp{}, scratch);
  const float inv_rms = 1.0f / sqrtf(sum_sq / static_cast<float>(width) + eps);
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x)
    entry[c] = state.norm[c] * (entry[c] * inv_rms);
  __syncthreads();

  const int64_t page = entries.block_table[w / entries.rows_per_page];
  float* out = entries.pool + (page * entries.rows_per_page + w % entries.rows_per_page) * width;
  const int64_t rope_start = width - 2 * rope.half;
  const int64_t angles = (w * rate) * rope.half;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
    if (c < rope_start) {
      out[c] = entry[c];
      continue;
    }
    const int64_t pair = (c - rope_start) / 2;
    const float cs = rope.cos[angles + pair];
    const float sn = rope.sin[angles + pair];
    const float a = entry[rope_start + 2 * pair];
    const float b = entry[rope_start + 2 * pair + 1];
    out[c] = (c - rope_start) % 2 == 0 ? a * cs - b * sn : b * cs + a * sn;
  }
}

}  // namespace

Status compress_chunk(const float* kv, const float* gate, int64_t first_pos, int64_t n,
                      const CompressorView& state, const PagedRowsView& entries,
                      const RopeView& rope, float eps, CudaStream stream) {
  DSERVE_CHECK(first_pos >= 0 && n >= 0 && state.rate >= 1 && state.width >= 1);
  DSERVE_CHECK(state.series == 1 || state.series == 2);
  DSERVE_CHECK(entries.width == state.width && 2 * rope.half <= state.width);
  if (n == 0) return Status::ok();
  const int64_t rate = state.rate;
  const int64_t row = state.series * state.width;
  const int64_t first_window = first_pos / rate;
  const int64_t windows = (first_pos + n) / rate - first_window;
  const TokenSource src{kv,   gate, state.pending_kv, state.pending_gate, state.ape, first_pos,
                        rate, row};
  if (windows > 0) {
    DSERVE_CHECK_MSG((first_window + windows - 1) * rate < rope.capacity,
                     "a window position is past the RoPE table");
    const size_t shared = static_cast<size_t>(state.width) * sizeof(float);
    pool_windows_kernel<<<static_cast<unsigned>(windows), kThreads, shared, native(stream)>>>(
        src, state, first_window, entries, rope, eps);
    DSERVE_RETURN_IF_ERROR(launch_status("pool_windows_kernel launch"));
  }
  // The last closed window's Ca series becomes the next window's prior.
  if (windows > 0 && state.series == 2) {
    const int64_t last = first_window + windows - 1;
    const int64_t width = state.width;
    float* overlap_kv = state.overlap_kv;
    float* overlap_gate = state.overlap_gate;
    DSERVE_RETURN_IF_ERROR(for_each_index(
        rate * width,
        [=] __device__(int64_t i) {
          const int64_t j = i / width;
          const int64_t c = i % width;
          overlap_kv[i] = src.value(last * rate + j, c);
          overlap_gate[i] = src.logit(last * rate + j, c);
        },
        stream, "compressor overlap launch"));
  }
  // Tokens of the window left open wait in the pending buffer.
  const int64_t open_start = (first_pos + n) / rate * rate;
  const int64_t first_pending = open_start > first_pos ? open_start : first_pos;
  const int64_t pending = first_pos + n - first_pending;
  float* pending_kv = state.pending_kv;
  float* pending_gate = state.pending_gate;
  return for_each_index(
      pending * row,
      [=] __device__(int64_t i) {
        const int64_t p = first_pending + i / row;
        const int64_t col = i % row;
        pending_kv[(p % rate) * row + col] = kv[(p - first_pos) * row + col];
        pending_gate[(p % rate) * row + col] = gate[(p - first_pos) * row + col];
      },
      stream, "compressor pending launch");
}

}  // namespace dserve::kernels::cuda

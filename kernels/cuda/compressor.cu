// Window compressors on the GPU (MODEL-V4.md "The compressors"; the CPU twin is
// model/src/compressor.cc). A batch's rows close zero or more windows of each request; each
// closed window becomes one entry written straight into that request's pages. Three launches in
// stream order: pool (reads pending and overlap rows), then the new overlap (reads pending),
// then the new pending tokens (overwrites pending).

#include "common.cuh"
#include "dserve/kernels/cuda_model_ops.h"
#include "v4_math.h"

namespace dserve::kernels::cuda {
namespace {

constexpr int kThreads = 128;

// Where the projected values of one request's token at position p come from: this batch's
// rows (p >= first_pos) or the pending rows of its slot (the open window, slot p % rate).
struct TokenSource {
  const float* kv;
  const float* gate;
  const float* pending_kv;  // of this request's slot
  const float* pending_gate;
  const float* ape;
  int64_t first_pos;
  int64_t first_row;
  int64_t rate;
  int64_t row;  // series * width

  __device__ int64_t batch_row(int64_t p) const { return first_row + (p - first_pos); }
  __device__ float value(int64_t p, int64_t col) const {
    return p >= first_pos ? kv[batch_row(p) * row + col] : pending_kv[(p % rate) * row + col];
  }
  // The gate logit with the position bias added.
  __device__ float logit(int64_t p, int64_t col) const {
    const float g =
        p >= first_pos ? gate[batch_row(p) * row + col] : pending_gate[(p % rate) * row + col];
    return g + ape[(p % rate) * row + col];
  }
};

__device__ TokenSource source_of(const float* kv, const float* gate, const BatchRows& rows,
                                 int64_t any_row, const CompressorView& state) {
  const int64_t row = state.series * state.width;
  const int64_t slot = rows.slot[any_row];
  return TokenSource{kv,
                     gate,
                     state.pending_kv + slot * state.rate * row,
                     state.pending_gate + slot * state.rate * row,
                     state.ape,
                     rows.first_pos[any_row],
                     rows.first_row[any_row],
                     state.rate,
                     row};
}

// One block per closed window: each thread pools channels (softmax over the window's gate
// logits per channel, the previous window's Ca first for overlapping compressors), then the
// block RMS-normalises the entry, rotates its rope channels at the window's first position
// and writes it into its page. Dynamic shared memory: width floats.
__global__ void pool_windows_kernel(const float* __restrict__ kv, const float* __restrict__ gate,
                                    BatchRows rows, const ClosedWindow* __restrict__ windows,
                                    const int32_t* __restrict__ window_count, CompressorView state,
                                    PagedRowsView entries, RopeView rope, float eps,
                                    KvRounding rounding) {
  extern __shared__ float entry[];
  __shared__ float scratch[kWarpSize];
  if (static_cast<int32_t>(blockIdx.x) >= *window_count) return;
  const ClosedWindow closed = windows[blockIdx.x];
  const TokenSource src = source_of(kv, gate, rows, closed.row, state);
  const int64_t slot = rows.slot[closed.row];
  const int64_t w = closed.window;
  const int64_t rate = state.rate;
  const int64_t width = state.width;
  const bool overlapping = state.series == 2;
  const bool has_prior = overlapping && w >= 1;
  // Window w - 1 is read from the overlap rows when it closed before this batch.
  const bool prior_in_state = has_prior && w - 1 < src.first_pos / rate;
  const float* overlap_kv = state.overlap_kv + slot * rate * width;
  const float* overlap_gate = state.overlap_gate + slot * rate * width;
  const int64_t cb = overlapping ? width : 0;

  float sum_sq = 0.0f;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
    auto prior_logit = [&](int64_t j) {
      return prior_in_state ? overlap_gate[j * width + c] : src.logit((w - 1) * rate + j, c);
    };
    auto prior_value = [&](int64_t j) {
      return prior_in_state ? overlap_kv[j * width + c] : src.value((w - 1) * rate + j, c);
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

  const int32_t* table = entries.block_tables + slot * entries.table_stride;
  const int64_t page = table[w / entries.rows_per_page];
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
  if (rounding == KvRounding::kNone) return;
  // fp8 KV: the entry as stored (one thread: a few hundred channels, a handful of entries per
  // step). __syncthreads makes the block's writes to `out` visible to it.
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (rounding == KvRounding::kFp8Entry) {
    v4::round_fp8_entry(out, static_cast<int>(width), static_cast<int>(2 * rope.half));
  } else {
    v4::round_fp4_key(out, static_cast<int>(width));
  }
}

}  // namespace

Status compress_batch(const float* kv, const float* gate, int64_t n, const BatchRows& rows,
                      const ClosedWindow* windows, const int32_t* window_count, int64_t max_windows,
                      const CompressorView& state, const PagedRowsView& entries,
                      const RopeView& rope, float eps, KvRounding rounding, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && max_windows >= 0 && state.rate >= 1 && state.width >= 1);
  DSERVE_CHECK(state.series == 1 || state.series == 2);
  DSERVE_CHECK(entries.width == state.width && 2 * rope.half <= state.width);
  if (n == 0) return Status::ok();
  const int64_t rate = state.rate;
  const int64_t width = state.width;
  const int64_t row = state.series * width;
  const CompressorView view = state;
  const BatchRows r = rows;
  if (max_windows > 0) {
    DSERVE_CHECK(windows != nullptr && window_count != nullptr && max_windows <= INT32_MAX);
    const size_t shared = static_cast<size_t>(width) * sizeof(float);
    pool_windows_kernel<<<static_cast<unsigned>(max_windows), kThreads, shared, native(stream)>>>(
        kv, gate, r, windows, window_count, view, entries, rope, eps, rounding);
    DSERVE_RETURN_IF_ERROR(launch_status("pool_windows_kernel launch"));
    // Each request's last closed window's Ca series becomes its next window's prior (reads
    // the pending rows before the next launch overwrites them).
    if (state.series == 2) {
      DSERVE_RETURN_IF_ERROR(for_each_index(
          max_windows * rate * width,
          [=] __device__(int64_t i) {
            if (i / (rate * width) >= *window_count) return;
            const ClosedWindow closed = windows[i / (rate * width)];
            if (closed.last == 0) return;
            const int64_t j = (i / width) % rate;
            const int64_t c = i % width;
            const TokenSource src = source_of(kv, gate, r, closed.row, view);
            const int64_t at =
                static_cast<int64_t>(r.slot[closed.row]) * rate * width + j * width + c;
            const int64_t p = static_cast<int64_t>(closed.window) * rate + j;
            view.overlap_kv[at] = src.value(p, c);
            view.overlap_gate[at] = src.logit(p, c);
          },
          stream, "compressor overlap launch"));
    }
  }
  // Tokens of each request's window left open wait in its pending rows.
  return for_each_index(
      n * row,
      [=] __device__(int64_t i) {
        const int64_t t = i / row;
        const int64_t col = i % row;
        const int64_t p = r.position[t];
        if (p < static_cast<int64_t>(r.end_pos[t]) / rate * rate) return;
        const int64_t at = (static_cast<int64_t>(r.slot[t]) * rate + p % rate) * row + col;
        view.pending_kv[at] = kv[i];
        view.pending_gate[at] = gate[i];
      },
      stream, "compressor pending launch");
}

Status round_kv_rows(float* rows, int64_t n, int64_t width, int64_t rope_channels,
                     KvRounding rounding, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && width >= 1 && rope_channels >= 0 && rope_channels <= width);
  if (rounding == KvRounding::kNone || n == 0) return Status::ok();
  const int w = static_cast<int>(width);
  const int rope = static_cast<int>(rope_channels);
  return for_each_index(
      n,
      [=] __device__(int64_t r) {
        float* row = rows + r * w;
        if (rounding == KvRounding::kFp8Entry) {
          v4::round_fp8_entry(row, w, rope);
        } else {
          v4::round_fp4_key(row, w);
        }
      },
      stream, "round_kv_rows launch");
}

}  // namespace dserve::kernels::cuda

// The Lightning Indexer's selection on the GPU (the CPU twin is select_entries in
// model/src/attention.cc): per-entry scores from the head dot products (a GEMM the caller
// makes), then an exact top-k per query by radix select on the scores' ordered bit patterns,
// written in ascending index order with the CPU's tie rule (lower index first).

#include "common.cuh"
#include "dserve/kernels/cuda_model_ops.h"

namespace dserve::kernels::cuda {
namespace {

constexpr int kTopKThreads = 256;
constexpr int kRadixBits = 8;
constexpr int kBuckets = 1 << kRadixBits;

// Entries a query at `pos` may see: entry w summarises tokens below (w + 1) * rate.
__device__ int64_t visible_entries(int64_t pos, int64_t rate) {
  return (pos + 1) / rate;
}

// An unsigned key that orders like the float: larger float, larger key.
// -0 and +0 get one key: the CPU's comparison holds them equal.
__device__ uint32_t order_key(float v) {
  const uint32_t u = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of `v` over the block (blockDim.x = kTopKThreads); *total gets the sum.
// `scratch` holds kTopKThreads / 32 + 1 ints.
__device__ int block_exclusive_scan(int v, int* scratch, int* total) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  int inclusive = v;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  if (threadIdx.x == 0) {
    int running = 0;
    for (int w = 0; w < kTopKThreads / kWarpSize; ++w) {
      const int s = scratch[w];
      scratch[w] = running;
      running += s;
    }
    scratch[kTopKThreads / kWarpSize] = running;
  }
  __syncthreads();
  const int result = scratch[warp] + inclusive - v;
  *total = scratch[kTopKThreads / kWarpSize];
  __syncthreads();
  return result;
}

// One block per query row.
__global__ void top_k_kernel(const float* __restrict__ scores, int64_t stride,
                             const int32_t* __restrict__ positions, int64_t rate, int64_t k,
                             int32_t* __restrict__ selected, int32_t* __restrict__ counts) {
  __shared__ int histogram[kBuckets];
  __shared__ int scan_scratch[kTopKThreads / kWarpSize + 1];
  __shared__ uint32_t chosen_prefix;
  __shared__ int still_needed;
  const int64_t t = blockIdx.x;
  const float* row = scores + t * stride;
  int32_t* out = selected + t * k;
  const int64_t visible = visible_entries(positions[t], rate);
  if (visible <= k) {
    for (int64_t s = threadIdx.x; s < visible; s += blockDim.x)
      out[s] = static_cast<int32_t>(s);
    if (threadIdx.x == 0) counts[t] = static_cast<int32_t>(visible);
    return;
  }
  // Radix select, most significant digit first: find the key of the k-th largest score, and
  // how many entries equal to it are taken (the lowest-indexed ones).
  uint32_t prefix = 0;
  uint32_t prefix_mask = 0;
  if (threadIdx.x == 0) still_needed = static_cast<int>(k);
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int b = threadIdx.x; b < kBuckets; b += blockDim.x)
      histogram[b] = 0;
    __syncthreads();
    for (int64_t s = threadIdx.x; s < visible; s += blockDim.x) {
      const uint32_t key = order_key(row[s]);
      if ((key & prefix_mask) == prefix) atomicAdd(&histogram[(key >> shift) & (kBuckets - 1)], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int above = 0;
      int digit = kBuckets - 1;
      for (; digit > 0; --digit) {
        if (above + histogram[digit] >= still_needed) break;
        above += histogram[digit];
      }
      still_needed -= above;
      chosen_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
    }
    __syncthreads();
    prefix = chosen_prefix;
    prefix_mask |= static_cast<uint32_t>(kBuckets - 1) << shift;
  }
  const uint32_t threshold = prefix;
  const int ties_taken = still_needed;  // entries equal to the threshold to take, lowest first
  // Compaction in index order: every key above the threshold, and the first ties.
  int written = 0;
  int ties_seen = 0;
  for (int64_t base = 0; base < visible; base += blockDim.x) {
    const int64_t s = base + threadIdx.x;
    const uint32_t key = s < visible ? order_key(row[s]) : 0u;
    const bool above = s < visible && key > threshold;
    const bool tie = s < visible && key == threshold;
    int tie_total = 0;
    const int tie_rank = ties_seen + block_exclusive_scan(tie ? 1 : 0, scan_scratch, &tie_total);
    const bool take = above || (tie && tie_rank < ties_taken);
    int take_total = 0;
    const int slot = written + block_exclusive_scan(take ? 1 : 0, scan_scratch, &take_total);
    if (take) out[slot] = static_cast<int32_t>(s);
    ties_seen += tie_total;
    written += take_total;
  }
  if (threadIdx.x == 0) counts[t] = static_cast<int32_t>(k);
}

// One block per (row, tile of kPagedEntries entries): the row's rotated queries and weights
// sit in shared memory; each warp takes entries in turn, each lane whole heads (lane, lane +
// 32, ...), reading the key through the block table.
constexpr int kPagedThreads = 128;
constexpr int kPagedEntries = 64;
static_assert(kPagedThreads / kWarpSize == 4, "indexer_scores_paged_shared_bytes assumes 4 warps");

__global__ void indexer_scores_paged_kernel(const float* __restrict__ q,
                                            const float* __restrict__ weights, int64_t heads,
                                            int64_t dim, BatchRows rows, PagedRowsView keys,
                                            int64_t stride, int64_t rate, float score_scale,
                                            float weight_scale, float* __restrict__ scores) {
  extern __shared__ float shared[];
  float* q_row = shared;                      // [heads, dim + 1] (padded: no bank clash)
  float* w_row = shared + heads * (dim + 1);  // [heads]
  float* key = w_row + heads;                 // [warps, dim]
  float* terms = key + (kPagedThreads / kWarpSize) * dim;  // [warps, heads]
  const int64_t t = blockIdx.x;
  for (int64_t i = threadIdx.x; i < heads * dim; i += blockDim.x)
    q_row[(i / dim) * (dim + 1) + i % dim] = q[t * heads * dim + i];
  for (int64_t h = threadIdx.x; h < heads; h += blockDim.x)
    w_row[h] = weights[t * heads + h] * weight_scale;
  __syncthreads();
  const int64_t visible = visible_entries(rows.position[t], rate);
  const int32_t* table = keys.block_tables + static_cast<int64_t>(rows.slot[t]) * keys.table_stride;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  float* my_key = key + warp * dim;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * kPagedEntries;
  const int64_t last = first + kPagedEntries < stride ? first + kPagedEntries : stride;
  for (int64_t s = first + warp; s < last; s += kPagedThreads / kWarpSize) {
    if (s >= visible) {
      if (lane == 0) scores[t * stride + s] = -INFINITY;
      continue;
    }
    const int64_t page = table[s / keys.rows_per_page];
    const float* k = keys.pool + (page * keys.rows_per_page + s % keys.rows_per_page) * keys.width;
    for (int64_t c = lane; c < dim; c += kWarpSize)
      my_key[c] = k[c];
    __syncwarp();
    float* my_terms = terms + warp * heads;
    for (int64_t h = lane; h < heads; h += kWarpSize) {
      float dot = 0.0f;
      const float* qh = q_row + h * (dim + 1);
      for (int64_t c = 0; c < dim; ++c)
        dot += qh[c] * my_key[c];
      my_terms[h] = fmaxf(dot, 0.0f) * score_scale * w_row[h];
    }
    __syncwarp();
    // Heads summed in order, as the CPU and indexer_scores do: a request's picks must not
    // depend on which path (or which batch) scored it.
    if (lane == 0) {
      float total = 0.0f;
      for (int64_t h = 0; h < heads; ++h)
        total += my_terms[h];
      scores[t * stride + s] = total;
    }
    __syncwarp();
  }
}

size_t indexer_granted = 48 * 1024;

}  // namespace

Status reserve_indexer_shared(size_t bytes) {
  return grant_shared_memory(indexer_scores_paged_kernel, bytes, indexer_granted,
                             "indexer_scores_paged_kernel");
}

Status indexer_scores(const float* dots, const float* weights, int64_t n, int64_t heads,
                      int64_t stride, const int32_t* positions, int64_t rate, float score_scale,
                      float weight_scale, float* scores, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && heads >= 1 && stride >= 0 && rate >= 1);
  return for_each_index(
      n * stride,
      [=] __device__(int64_t i) {
        const int64_t t = i / stride;
        const int64_t s = i % stride;
        if (s >= visible_entries(positions[t], rate)) {
          scores[i] = -INFINITY;
          return;
        }
        float acc = 0.0f;
        for (int64_t h = 0; h < heads; ++h) {
          const float wh = weights[t * heads + h] * weight_scale;
          acc += fmaxf(dots[(t * heads + h) * stride + s], 0.0f) * score_scale * wh;
        }
        scores[i] = acc;
      },
      stream, "indexer_scores launch");
}

Status indexer_scores_paged(const float* q, const float* weights, int64_t n, int64_t heads,
                            int64_t dim, const BatchRows& rows, const PagedRowsView& keys,
                            int64_t stride, int64_t rate, float score_scale, float weight_scale,
                            float* scores, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && heads >= 1 && dim >= 1 && stride >= 0 && rate >= 1);
  DSERVE_CHECK(keys.width == dim);
  if (n == 0 || stride == 0) return Status::ok();
  DSERVE_CHECK_MSG(n <= INT32_MAX && stride / kPagedEntries < 65535,
                   "indexer batch past the launch grid");
  const size_t shared = indexer_scores_paged_shared_bytes(heads, dim);
  DSERVE_RETURN_IF_ERROR(reserve_indexer_shared(shared));
  const dim3 grid(static_cast<unsigned>(n),
                  static_cast<unsigned>((stride + kPagedEntries - 1) / kPagedEntries));
  indexer_scores_paged_kernel<<<grid, kPagedThreads, shared, native(stream)>>>(
      q, weights, heads, dim, rows, keys, stride, rate, score_scale, weight_scale, scores);
  return launch_status("indexer_scores_paged_kernel launch");
}

Status top_k_indices(const float* scores, int64_t n, int64_t stride, const int32_t* positions,
                     int64_t rate, int64_t k, int32_t* selected, int32_t* counts,
                     CudaStream stream) {
  DSERVE_CHECK(n >= 0 && k >= 1 && rate >= 1 && stride >= 0);
  if (n == 0) return Status::ok();
  DSERVE_CHECK_MSG(n <= INT32_MAX, "too many query rows for one launch");
  top_k_kernel<<<static_cast<unsigned>(n), kTopKThreads, 0, native(stream)>>>(
      scores, stride, positions, rate, k, selected, counts);
  return launch_status("top_k_kernel launch");
}

}  // namespace dserve::kernels::cuda

// MoE pieces that are not GEMMs: routing (v4::route_token, one thread per token), gathering the
// rows routed to each expert, the clamped SwiGLU, and the weighted combine of the experts'
// outputs with the shared expert's, in a fixed order per token.

#include "common.cuh"
#include "dserve/kernels/cuda_model_ops.h"
#include "v4_math.h"

namespace dserve::kernels::cuda {

static_assert(v4_limits::kMaxRoutedPerToken == v4::kMaxRoutedPerToken,
              "cuda_model_ops.h and v4_math.h disagree");

Status route_tokens(float* logits, const float* bias, const int32_t* tid2eid, const int32_t* tokens,
                    int64_t n, int64_t experts, int64_t k, int scoring, float routed_scale,
                    int32_t* ids, float* weights, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && experts >= 1 && k >= 1 && k <= v4::kMaxRoutedPerToken && k <= experts);
  DSERVE_CHECK(scoring >= 0 && scoring <= 2);
  DSERVE_CHECK_MSG((tid2eid == nullptr) == (tokens == nullptr),
                   "hash routing needs both tid2eid and the tokens");
  const int ie = static_cast<int>(experts);
  const int ik = static_cast<int>(k);
  const auto how = static_cast<v4::Scoring>(scoring);
  return for_each_index(
      n,
      [=] __device__(int64_t t) {
        const int32_t* hash =
            tid2eid != nullptr ? tid2eid + static_cast<int64_t>(tokens[t]) * ik : nullptr;
        v4::route_token(logits + t * ie, bias, hash, ie, ik, how, routed_scale, ids + t * ik,
                        weights + t * ik);
      },
      stream, "route_tokens launch");
}

Status swiglu(const float* gate_up, int64_t rows, int64_t inter, float limit, float* out,
              CudaStream stream) {
  DSERVE_CHECK(rows >= 0 && inter >= 0);
  return for_each_index(
      rows * inter,
      [=] __device__(int64_t i) {
        const int64_t r = i / inter;
        const int64_t c = i % inter;
        const float* row = gate_up + r * 2 * inter;
        out[i] = v4::swiglu(row[c], row[inter + c], limit);
      },
      stream, "swiglu launch");
}

Status gather_token_rows(const float* x, const int32_t* rows, int64_t count, int64_t hidden,
                         float* xs, CudaStream stream) {
  DSERVE_CHECK(count >= 0 && hidden >= 0);
  return for_each_index(
      count * hidden,
      [=] __device__(int64_t i) {
        xs[i] = x[static_cast<int64_t>(rows[i / hidden]) * hidden + i % hidden];
      },
      stream, "gather_token_rows launch");
}

Status moe_combine(const float* ys, const int32_t* slots, const float* weights, const float* shared,
                   int64_t n, int64_t k, int64_t hidden, float* out, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && k >= 0 && hidden >= 0);
  return for_each_index(
      n * hidden,
      [=] __device__(int64_t i) {
        const int64_t t = i / hidden;
        const int64_t d = i % hidden;
        float acc = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
          acc += weights[t * k + j] * ys[static_cast<int64_t>(slots[t * k + j]) * hidden + d];
        }
        out[i] = acc + shared[i];
      },
      stream, "moe_combine launch");
}

}  // namespace dserve::kernels::cuda

// --- Small batches (decode): grouping and expert products on the device ---------------------

namespace dserve::kernels::cuda {
namespace {

constexpr int kGroupThreads = 256;

// One block: counts per expert, offsets, the active experts in id order, each pair's slot (its
// expert's offset plus the number of earlier pairs routed there, so slots follow token order
// as moe.cc's rows do), and per token its k (slot, weight) in ascending expert order.
__global__ void moe_group_kernel(const int32_t* __restrict__ ids, const float* __restrict__ weights,
                                 int64_t n, int64_t k, int64_t experts, MoeGroups groups) {
  extern __shared__ int counts[];  // [experts]
  const int64_t pairs = n * k;
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x)
    counts[e] = 0;
  __syncthreads();
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x)
    atomicAdd(&counts[ids[p]], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int running = 0;
    int active = 0;
    for (int64_t e = 0; e < experts; ++e) {
      groups.offsets[e] = running;
      if (counts[e] > 0) groups.active[active++] = static_cast<int32_t>(e);
      running += counts[e];
    }
    groups.offsets[experts] = running;
    *groups.active_count = active;
    if (groups.active_total != nullptr) *groups.active_total += active;
  }
  __syncthreads();
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) {
    const int32_t e = ids[p];
    int rank = 0;
    for (int64_t q = 0; q < p; ++q)
      rank += ids[q] == e ? 1 : 0;
    const int32_t slot = groups.offsets[e] + rank;
    groups.rows[slot] = static_cast<int32_t>(p / k);
    groups.slot_of[p] = slot;
  }
  __syncthreads();
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
    // Insertion sort of the token's k pairs by expert id (stable: equal ids keep their order).
    int32_t order[v4::kMaxRoutedPerToken];
    for (int64_t i = 0; i < k; ++i) {
      int64_t j = i;
      while (j > 0 && ids[t * k + order[j - 1]] > ids[t * k + i]) {
        order[j] = order[j - 1];
        --j;
      }
      order[j] = static_cast<int32_t>(i);
    }
    for (int64_t j = 0; j < k; ++j) {
      groups.combine_slots[t * k + j] = groups.slot_of[t * k + order[j]];
      groups.combine_weights[t * k + j] = weights[t * k + order[j]];
    }
  }
}

constexpr int kGemvThreads = 128;
constexpr int kGemvRowsPerWarp = 4;
constexpr int kGemvTokens = 8;  // tokens of one expert per pass over a weight row

template <typename W>
__device__ float weight_at(const W* w, int64_t i);
template <>
__device__ float weight_at<float>(const float* w, int64_t i) {
  return w[i];
}
template <>
__device__ float weight_at<uint16_t>(const uint16_t* w, int64_t i) {
  return __uint_as_float(static_cast<uint32_t>(w[i]) << 16);
}

// out[s, r] = x[s, :] . W_e[r, :] for the rows s of each active expert e. Grid: (active slot,
// row tile); a warp takes kGemvRowsPerWarp rows, reads each weight row once per kGemvTokens
// tokens, lanes split the columns.
template <typename W>
__global__ void moe_gemv_kernel(const float* __restrict__ x, MoeGroups groups,
                                const void* const* __restrict__ expert_weights, int64_t rows,
                                int64_t cols, float* __restrict__ out) {
  if (static_cast<int>(blockIdx.x) >= *groups.active_count) return;
  const int32_t e = groups.active[blockIdx.x];
  const int64_t first = groups.offsets[e];
  const int64_t count = groups.offsets[e + 1] - first;
  const W* w = static_cast<const W*>(expert_weights[e]);
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t row0 =
      (static_cast<int64_t>(blockIdx.y) * (kGemvThreads / kWarpSize) + warp) * kGemvRowsPerWarp;
  for (int64_t r = row0; r < row0 + kGemvRowsPerWarp && r < rows; ++r) {
    const W* wr = w + r * cols;
    for (int64_t s0 = 0; s0 < count; s0 += kGemvTokens) {
      const int64_t tokens = count - s0 < kGemvTokens ? count - s0 : kGemvTokens;
      float acc[kGemvTokens] = {};
      for (int64_t c = lane; c < cols; c += kWarpSize) {
        const float wv = weight_at<W>(wr, c);
#pragma unroll
        for (int j = 0; j < kGemvTokens; ++j) {
          if (j < tokens) acc[j] += wv * x[(first + s0 + j) * cols + c];
        }
      }
#pragma unroll
      for (int j = 0; j < kGemvTokens; ++j) {
        const float total = warp_all_reduce(acc[j], SumOp{});
        if (lane == 0 && j < tokens) out[(first + s0 + j) * rows + r] = total;
      }
    }
  }
}

}  // namespace

Status moe_group(const int32_t* ids, const float* weights, int64_t n, int64_t k, int64_t experts,
                 const MoeGroups& groups, CudaStream stream) {
  DSERVE_CHECK(n >= 1 && k >= 1 && k <= v4::kMaxRoutedPerToken && experts >= 1);
  const size_t shared = static_cast<size_t>(experts) * sizeof(int);
  DSERVE_CHECK_MSG(shared <= 48 * 1024, "too many experts for moe_group's shared memory");
  moe_group_kernel<<<1, kGroupThreads, shared, native(stream)>>>(ids, weights, n, k, experts,
                                                                 groups);
  return launch_status("moe_group_kernel launch");
}

Status moe_experts_gemv(const float* x, const MoeGroups& groups, int64_t max_active,
                        const void* const* expert_weights, WeightType type, int64_t rows,
                        int64_t cols, float* out, CudaStream stream) {
  DSERVE_CHECK(max_active >= 0 && rows >= 1 && cols >= 1);
  if (max_active == 0) return Status::ok();
  const int64_t rows_per_block = (kGemvThreads / kWarpSize) * kGemvRowsPerWarp;
  const dim3 grid(static_cast<unsigned>(max_active),
                  static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block));
  if (type == WeightType::kBf16) {
    moe_gemv_kernel<uint16_t>
        <<<grid, kGemvThreads, 0, native(stream)>>>(x, groups, expert_weights, rows, cols, out);
  } else {
    moe_gemv_kernel<float>
        <<<grid, kGemvThreads, 0, native(stream)>>>(x, groups, expert_weights, rows, cols, out);
  }
  return launch_status("moe_gemv_kernel launch");
}

}  // namespace dserve::kernels::cuda

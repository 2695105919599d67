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
// as moe.cc's rows do), and per token its k (slot, weight) in ascending expert order. The ids
// are staged in shared memory; each thread then walks them in order for its own experts.
__global__ void moe_group_kernel(const int32_t* __restrict__ ids, const float* __restrict__ weights,
                                 int64_t n, int64_t k, int64_t experts, MoeGroups groups) {
  extern __shared__ int shared_ints[];
  int* next_slot = shared_ints;           // [experts]: counts, then each expert's next slot
  int* pair_ids = shared_ints + experts;  // [n * k]
  const int64_t pairs = n * k;
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x)
    next_slot[e] = 0;
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x)
    pair_ids[p] = ids[p];
  __syncthreads();
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x)
    atomicAdd(&next_slot[pair_ids[p]], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int running = 0;
    int active = 0;
    for (int64_t e = 0; e < experts; ++e) {
      const int count = next_slot[e];
      groups.offsets[e] = running;
      next_slot[e] = running;
      if (count > 0) groups.active[active++] = static_cast<int32_t>(e);
      running += count;
    }
    groups.offsets[experts] = running;
    *groups.active_count = active;
    if (groups.active_total != nullptr) *groups.active_total += active;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < experts; e += blockDim.x) {
    int slot = next_slot[e];
    for (int64_t p = 0; p < pairs; ++p) {
      if (pair_ids[p] != e) continue;
      groups.rows[slot] = static_cast<int32_t>(p / k);
      groups.slot_of[p] = slot;
      ++slot;
    }
  }
  __syncthreads();
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) {
    // Insertion sort of the token's k pairs by expert id (stable: equal ids keep their order).
    int32_t order[v4::kMaxRoutedPerToken];
    for (int64_t i = 0; i < k; ++i) {
      int64_t j = i;
      while (j > 0 && pair_ids[t * k + order[j - 1]] > pair_ids[t * k + i]) {
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

// 16 bytes of weights as floats: 4 fp32 values or 8 bf16 values (the upper halves of fp32).
template <typename W>
struct WeightVector;
template <>
struct WeightVector<float> {
  static constexpr int kWidth = 4;
  __device__ static void load(const float* row, int64_t v, float* out) {
    const float4 a = reinterpret_cast<const float4*>(row)[v];
    out[0] = a.x;
    out[1] = a.y;
    out[2] = a.z;
    out[3] = a.w;
  }
};
template <>
struct WeightVector<uint16_t> {
  static constexpr int kWidth = 8;
  __device__ static void load(const uint16_t* row, int64_t v, float* out) {
    const uint4 a = reinterpret_cast<const uint4*>(row)[v];
    const uint32_t words[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);              // the lower address
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);  // the higher address
    }
  }
};

// out[s, r] = x[s, :] . W_e[r, :] for the rows s of each active expert e. Grid: (active slot,
// row tile). A warp takes kGemvRowsPerWarp weight rows and up to kGemvTokens of the expert's
// tokens at a time; each lane walks 16-byte column vectors, holding the tokens' x values in
// registers across the warp's rows, so every weight byte is read once per kGemvTokens tokens
// with one 16-byte load. cols is a multiple of 8 and every weight row starts 16-byte aligned.
template <typename W>
__global__ void moe_gemv_kernel(const float* __restrict__ x, MoeGroups groups,
                                const void* const* __restrict__ expert_weights, int64_t rows,
                                int64_t cols, float* __restrict__ out) {
  constexpr int V = WeightVector<W>::kWidth;
  if (static_cast<int>(blockIdx.x) >= *groups.active_count) return;
  const int32_t e = groups.active[blockIdx.x];
  const int64_t first = groups.offsets[e];
  const int64_t count = groups.offsets[e + 1] - first;
  const W* w = static_cast<const W*>(expert_weights[e]);
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int64_t row0 =
      (static_cast<int64_t>(blockIdx.y) * (kGemvThreads / kWarpSize) + warp) * kGemvRowsPerWarp;
  if (row0 >= rows) return;
  const int64_t warp_rows = rows - row0 < kGemvRowsPerWarp ? rows - row0 : kGemvRowsPerWarp;
  const int64_t vectors = cols / V;
  for (int64_t s0 = 0; s0 < count; s0 += kGemvTokens) {
    const int64_t tokens = count - s0 < kGemvTokens ? count - s0 : kGemvTokens;
    float acc[kGemvRowsPerWarp][kGemvTokens] = {};
    for (int64_t v = lane; v < vectors; v += kWarpSize) {
      float xv[kGemvTokens][V];
#pragma unroll
      for (int j = 0; j < kGemvTokens; ++j) {
#pragma unroll
        for (int i = 0; i < V; i += 4) {
          float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          if (j < tokens) {
            a = reinterpret_cast<const float4*>(x + (first + s0 + j) * cols + v * V)[i / 4];
          }
          xv[j][i] = a.x;
          xv[j][i + 1] = a.y;
          xv[j][i + 2] = a.z;
          xv[j][i + 3] = a.w;
        }
      }
#pragma unroll
      for (int r = 0; r < kGemvRowsPerWarp; ++r) {
        if (r >= warp_rows) break;
        float wv[V];
        WeightVector<W>::load(w + (row0 + r) * cols, v, wv);
#pragma unroll
        for (int j = 0; j < kGemvTokens; ++j) {
#pragma unroll
          for (int i = 0; i < V; ++i)
            acc[r][j] += wv[i] * xv[j][i];
        }
      }
    }
    // warp_rows and tokens are the same in every lane, so whole warps reduce together.
#pragma unroll
    for (int r = 0; r < kGemvRowsPerWarp; ++r) {
#pragma unroll
      for (int j = 0; j < kGemvTokens; ++j) {
        if (r >= warp_rows || j >= tokens) continue;
        const float total = warp_all_reduce(acc[r][j], SumOp{});
        if (lane == 0) out[(first + s0 + j) * rows + row0 + r] = total;
      }
    }
  }
}

}  // namespace

Status moe_group(const int32_t* ids, const float* weights, int64_t n, int64_t k, int64_t experts,
                 const MoeGroups& groups, CudaStream stream) {
  DSERVE_CHECK(n >= 1 && k >= 1 && k <= v4::kMaxRoutedPerToken && experts >= 1);
  DSERVE_CHECK_MSG(experts + n * k <= kMoeGroupMaxInts,
                   "too many experts or pairs for moe_group's shared memory");
  const size_t shared = static_cast<size_t>(experts + n * k) * sizeof(int);
  moe_group_kernel<<<1, kGroupThreads, shared, native(stream)>>>(ids, weights, n, k, experts,
                                                                 groups);
  return launch_status("moe_group_kernel launch");
}

Status moe_experts_gemv(const float* x, const MoeGroups& groups, int64_t max_active,
                        const void* const* expert_weights, WeightType type, int64_t rows,
                        int64_t cols, float* out, CudaStream stream) {
  DSERVE_CHECK(max_active >= 0 && rows >= 1 && cols >= 1);
  DSERVE_CHECK_MSG(cols % 8 == 0,
                   "moe_experts_gemv reads 16-byte vectors: cols must be a multiple of 8");
  DSERVE_CHECK_MSG(reinterpret_cast<uintptr_t>(x) % 16 == 0,
                   "moe_experts_gemv reads x as 16-byte vectors from a base that is not aligned");
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

// V4 sparse attention for a batch of rows (the CPU twin is model/src/attention.cc): each query
// attends its sliding window (its request's ring of earlier tokens plus the batch's keys) and the
// layer's compressed entries (the indexer's picks on CSA layers, every visible one on HCA
// layers) read through the block table, with the head's sink in the softmax denominator. K = V
// (one shared head, MQA).
//
// One block per (row, group of heads). The group shares each key: a tile of kTileKeys keys is
// read from global memory once into shared memory, every (head, key) dot product of the tile is
// taken from there (a warp per product, lanes split the channels), and each head keeps a running
// maximum and sum (online softmax) so the keys are read once in all. Each thread owns output
// channels and accumulates them for every head of the group. Small batches take small groups so
// that there are still enough blocks to fill the device.

#include <cuda_bf16.h>

#include "common.cuh"
#include "dserve/kernels/cuda_model_ops.h"

namespace dserve::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kMaxGroup = attention_limits::kMaxHeadsPerBlock;
constexpr int kTileKeys = attention_limits::kTileKeys;
constexpr int kMaxChannelsPerThread = 2;
static_assert(attention_limits::kMaxHeadDim == kThreads * kMaxChannelsPerThread,
              "cuda_model_ops.h's head_dim bound must match the kernel's channels per thread");

struct Shape {
  int64_t heads, head_dim, sliding_window;
  float scale;
  int group;  // heads per block
};

// Where key i of row t lives: the first n_window keys are the window (the request's ring for
// positions before its first row in the batch, the batch's keys after), then the compressed
// entries (the indexer's picks, or every visible one) through the request's block table.
struct RowKeys {
  const float* ring;
  const float* batch_kv;
  const int32_t* table;
  const int32_t* selected;  // this row's picks, or null
  PagedRowsView compressed;
  int64_t first_key, n_window, first_pos, first_row, sliding_window, head_dim;

  __device__ const float* key(int64_t i) const {
    if (i < n_window) {
      const int64_t p = first_key + i;
      return p >= first_pos ? batch_kv + (first_row + p - first_pos) * head_dim
                            : ring + (p % sliding_window) * head_dim;
    }
    const int64_t j = i - n_window;
    const int64_t e = selected != nullptr ? selected[j] : j;
    const int64_t page = table[e / compressed.rows_per_page];
    return compressed.pool +
           (page * compressed.rows_per_page + e % compressed.rows_per_page) * compressed.width;
  }
};

// Row t's keys, and how many it attends (*total: its window plus its compressed entries).
__device__ RowKeys row_keys(const AttentionInputs& in, const BatchRows& rows, const Shape& shape,
                            int64_t t, int64_t* total) {
  const int64_t hd = shape.head_dim;
  const int64_t pos = rows.position[t];
  const int64_t slot = rows.slot[t];
  RowKeys keys;
  keys.ring = in.windows + slot * shape.sliding_window * hd;
  keys.batch_kv = in.batch_kv;
  keys.table =
      in.rate > 0 ? in.compressed.block_tables + slot * in.compressed.table_stride : nullptr;
  keys.selected = in.selected != nullptr ? in.selected + t * in.selected_stride : nullptr;
  keys.compressed = in.compressed;
  keys.first_key = pos - shape.sliding_window + 1 > 0 ? pos - shape.sliding_window + 1 : 0;
  keys.n_window = pos - keys.first_key + 1;
  keys.first_pos = rows.first_pos[t];
  keys.first_row = rows.first_row[t];
  keys.sliding_window = shape.sliding_window;
  keys.head_dim = hd;
  int64_t n_comp = 0;
  if (in.rate > 0) n_comp = in.selected != nullptr ? in.selected_counts[t] : (pos + 1) / in.rate;
  *total = keys.n_window + n_comp;
  return keys;
}

__global__ void __launch_bounds__(kThreads, 2)
    sparse_attention_kernel(AttentionInputs in, BatchRows rows, Shape shape,
                            float* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t hd = shape.head_dim;
  const int64_t hd4 = hd / 4;
  const int64_t h0 = static_cast<int64_t>(blockIdx.x) * shape.group;
  const int group =
      static_cast<int>(shape.heads - h0 < shape.group ? shape.heads - h0 : shape.group);
  const int64_t t = blockIdx.y;
  int64_t total = 0;
  const RowKeys keys = row_keys(in, rows, shape, t, &total);

  // Shared memory (sparse_attention_shared_bytes): the tile's key addresses, then the group's
  // queries [kMaxGroup, hd], the tile's keys [kTileKeys, hd], its scores [kMaxGroup, kTileKeys]
  // and per head the running maximum, running sum and this tile's rescale factor.
  const float** tile_keys = reinterpret_cast<const float**>(shared_bytes);
  float* q_s = reinterpret_cast<float*>(shared_bytes + kTileKeys * sizeof(const float*));
  float* k_s = q_s + kMaxGroup * hd;
  float* p_s = k_s + kTileKeys * hd;
  float* run_max = p_s + kMaxGroup * kTileKeys;
  float* run_sum = run_max + kMaxGroup;
  float* rescale = run_sum + kMaxGroup;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  {
    const float4* q4 = reinterpret_cast<const float4*>(in.q + (t * shape.heads + h0) * hd);
    float4* q_s4 = reinterpret_cast<float4*>(q_s);
    for (int64_t i = tid; i < group * hd4; i += kThreads)
      q_s4[i] = q4[i];
  }
  // The sink starts each head's maximum, so exp(sink - max) stays finite throughout.
  if (tid < group) {
    run_max[tid] = in.sinks[h0 + tid];
    run_sum[tid] = 0.0f;
  }

  float acc[kMaxGroup][kMaxChannelsPerThread];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
#pragma unroll
    for (int ci = 0; ci < kMaxChannelsPerThread; ++ci)
      acc[h][ci] = 0.0f;
  }

  for (int64_t start = 0; start < total; start += kTileKeys) {
    const int tile = static_cast<int>(total - start < kTileKeys ? total - start : kTileKeys);
    if (tid < tile) tile_keys[tid] = keys.key(start + tid);
    __syncthreads();  // also orders the previous tile's reads before these writes
    {
      float4* k_s4 = reinterpret_cast<float4*>(k_s);
      for (int64_t i = tid; i < tile * hd4; i += kThreads) {
        k_s4[i] = reinterpret_cast<const float4*>(tile_keys[i / hd4])[i % hd4];
      }
    }
    __syncthreads();
    for (int pair = warp; pair < group * tile; pair += kWarps) {
      const int h = pair / tile;
      const int j = pair % tile;
      const float4* q4 = reinterpret_cast<const float4*>(q_s + h * hd);
      const float4* k4 = reinterpret_cast<const float4*>(k_s + j * hd);
      float dot = 0.0f;
      for (int64_t c = lane; c < hd4; c += kWarpSize) {
        const float4 a = q4[c];
        const float4 b = k4[c];
        dot += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
      }
      dot = warp_all_reduce(dot, SumOp{});
      if (lane == 0) p_s[h * kTileKeys + j] = dot * shape.scale;
    }
    __syncthreads();
    if (tid < group) {
      float* p = p_s + tid * kTileKeys;
      const float old_max = run_max[tid];
      float new_max = old_max;
      for (int j = 0; j < tile; ++j)
        new_max = fmaxf(new_max, p[j]);
      float sum = 0.0f;
      for (int j = 0; j < tile; ++j) {
        p[j] = expf(p[j] - new_max);
        sum += p[j];
      }
      for (int j = tile; j < kTileKeys; ++j)
        p[j] = 0.0f;  // a short last tile adds nothing below
      const float factor = expf(old_max - new_max);
      run_sum[tid] = run_sum[tid] * factor + sum;
      run_max[tid] = new_max;
      rescale[tid] = factor;
    }
    __syncthreads();
    // Scores four keys at a time; a short tile's missing keys have score 0 and read key 0.
#pragma unroll
    for (int ci = 0; ci < kMaxChannelsPerThread; ++ci) {
      const int64_t c = tid + static_cast<int64_t>(ci) * kThreads;
      if (c >= hd) break;
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
        if (h < group) acc[h][ci] *= rescale[h];
      }
      for (int j0 = 0; j0 < tile; j0 += 4) {
        float v[4];
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
          v[jj] = k_s[(j0 + jj < tile ? j0 + jj : 0) * hd + c];
#pragma unroll
        for (int h = 0; h < kMaxGroup; ++h) {
          if (h >= group) break;
          const float4 p4 = reinterpret_cast<const float4*>(p_s + h * kTileKeys)[j0 / 4];
          acc[h][ci] += p4.x * v[0] + p4.y * v[1] + p4.z * v[2] + p4.w * v[3];
        }
      }
    }
  }
  __syncthreads();  // the last tile's sums are in run_sum and run_max

#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (h >= group) break;
    const float denominator = run_sum[h] + expf(in.sinks[h0 + h] - run_max[h]);
    const float inv = 1.0f / denominator;
    float* o = out + (t * shape.heads + h0 + h) * hd;
#pragma unroll
    for (int ci = 0; ci < kMaxChannelsPerThread; ++ci) {
      const int64_t c = tid + static_cast<int64_t>(ci) * kThreads;
      if (c < hd) o[c] = acc[h][ci] * inv;
    }
  }
}

// --- bf16 on tensor cores -----------------------------------------------------------------
// One block of 4 warps per (row, 16 heads): the heads are the rows of mma.sync m16n8k16 tiles
// (a short last group is padded with zero queries). Per tile of 16 keys, rounded to bf16 in
// shared memory: each warp multiplies a quarter of the channels into partial scores
// S[16 heads, 16 keys]; the partials are summed in shared memory, where one thread per head
// updates its running maximum and sum and writes the probabilities P as bf16; then each warp
// adds P . K for its quarter of the output channels to fp32 accumulators, rescaled per head.
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16): lane = 4 * g + q; A holds rows g and
// g + 8 at columns 2q, 2q + 1 and 2q + 8, 2q + 9; B holds column g at rows 2q, 2q + 1 and
// 2q + 8, 2q + 9; C holds rows g and g + 8 at columns 2q, 2q + 1. The lower index sits in the
// lower half of each 32-bit register.

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * kWarpSize;
constexpr int kMmaHeads = 16;
constexpr int kMmaKeys = 16;
constexpr int kMmaPad = 8;  // bf16 after each row of queries, keys, probabilities: no conflicts
constexpr int kMmaProbStride = kMmaKeys + kMmaPad;
constexpr int kMaxOutTiles = attention_limits::kMaxHeadDim / kMmaWarps / 8;
static_assert(kMmaWarps == 4 && kMmaHeads == 16 && kMmaKeys == 16 && kMmaProbStride == 24 &&
                  kMmaPad == 8,
              "sparse_attention_mma_shared_bytes in cuda_model_ops.h spells out this layout");
static_assert(sparse_attention_mma_shared_bytes(attention_limits::kMaxHeadDim) <= 48 * 1024,
              "the tensor-core kernel runs without the dynamic shared memory opt-in");

__device__ uint32_t pack_bf16(float lo, float hi) {
  const uint32_t l = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
  const uint32_t h = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
  return l | (h << 16);
}

__device__ uint32_t load_pair(const uint16_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Four consecutive fp32 values as bf16 at dst (8-byte aligned).
__device__ void store_bf16x4(uint16_t* dst, float4 v) {
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  d[0] = pack_bf16(v.x, v.y);
  d[1] = pack_bf16(v.z, v.w);
}

// d += a . b for one m16n8k16 tile: bf16 inputs, fp32 accumulators.
__device__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__global__ void __launch_bounds__(kMmaThreads)
    sparse_attention_mma_kernel(AttentionInputs in, BatchRows rows, Shape shape,
                                float* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t hd = shape.head_dim;
  const int64_t hd4 = hd / 4;
  const int64_t stride = hd + kMmaPad;  // bf16 per row of q_s and k_s
  const int64_t h0 = static_cast<int64_t>(blockIdx.x) * kMmaHeads;
  const int group = static_cast<int>(shape.heads - h0 < kMmaHeads ? shape.heads - h0 : kMmaHeads);
  const int64_t t = blockIdx.y;
  int64_t total = 0;
  const RowKeys keys = row_keys(in, rows, shape, t, &total);

  // Shared memory (sparse_attention_shared_bytes covers it): the tile's key addresses, the
  // queries and the tile's keys as bf16 [16, hd + pad], the warps' partial scores
  // [4, 16, 16], the probabilities as bf16 [16, 16 + pad], and per head the running maximum,
  // running sum and this tile's rescale factor.
  const float** tile_keys = reinterpret_cast<const float**>(shared_bytes);
  uint16_t* q_s = reinterpret_cast<uint16_t*>(shared_bytes + kMmaKeys * sizeof(const float*));
  uint16_t* k_s = q_s + kMmaHeads * stride;
  float* s_part = reinterpret_cast<float*>(k_s + kMmaKeys * stride);
  uint16_t* p_s = reinterpret_cast<uint16_t*>(s_part + kMmaWarps * kMmaHeads * kMmaKeys);
  float* run_max = reinterpret_cast<float*>(p_s + kMmaHeads * kMmaProbStride);
  float* run_sum = run_max + kMmaHeads;
  float* rescale = run_sum + kMmaHeads;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int g = lane / 4;
  const int q = lane % 4;
  for (int64_t i = tid; i < kMmaHeads * hd4; i += kMmaThreads) {
    const int64_t h = i / hd4;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (h < group)
      v = reinterpret_cast<const float4*>(in.q + (t * shape.heads + h0 + h) * hd)[i % hd4];
    store_bf16x4(q_s + h * stride + (i % hd4) * 4, v);
  }
  if (tid < group) {
    run_max[tid] = in.sinks[h0 + tid];
    run_sum[tid] = 0.0f;
  }

  // This warp's quarter of the channels, for the partial scores and for the output.
  const int64_t quarter = hd / kMmaWarps;
  const int64_t c_begin = warp * quarter;
  const int out_tiles = static_cast<int>(quarter / 8);
  float o[kMaxOutTiles][4];
#pragma unroll
  for (int nt = 0; nt < kMaxOutTiles; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      o[nt][i] = 0.0f;
  }

  for (int64_t start = 0; start < total; start += kMmaKeys) {
    const int tile = static_cast<int>(total - start < kMmaKeys ? total - start : kMmaKeys);
    if (tid < tile) tile_keys[tid] = keys.key(start + tid);
    __syncthreads();  // also orders the previous tile's reads before these writes
    for (int64_t i = tid; i < kMmaKeys * hd4; i += kMmaThreads) {
      const int64_t j = i / hd4;
      float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (j < tile) v = reinterpret_cast<const float4*>(tile_keys[j])[i % hd4];
      store_bf16x4(k_s + j * stride + (i % hd4) * 4, v);
    }
    __syncthreads();

    float s[2][4] = {};
    for (int64_t k0 = c_begin; k0 < c_begin + quarter; k0 += 16) {
      const uint32_t a[4] = {load_pair(q_s + g * stride + k0 + 2 * q),
                             load_pair(q_s + (g + 8) * stride + k0 + 2 * q),
                             load_pair(q_s + g * stride + k0 + 2 * q + 8),
                             load_pair(q_s + (g + 8) * stride + k0 + 2 * q + 8)};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const uint16_t* key = k_s + (nt * 8 + g) * stride + k0 + 2 * q;
        mma_bf16(s[nt], a, load_pair(key), load_pair(key + 8));
      }
    }
    float* part = s_part + warp * kMmaHeads * kMmaKeys;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      part[g * kMmaKeys + nt * 8 + 2 * q] = s[nt][0];
      part[g * kMmaKeys + nt * 8 + 2 * q + 1] = s[nt][1];
      part[(g + 8) * kMmaKeys + nt * 8 + 2 * q] = s[nt][2];
      part[(g + 8) * kMmaKeys + nt * 8 + 2 * q + 1] = s[nt][3];
    }
    __syncthreads();

    if (tid < kMmaHeads) {
      uint16_t* p = p_s + tid * kMmaProbStride;
      if (tid < group) {
        auto score = [&](int j) {
          float v = 0.0f;
          for (int w = 0; w < kMmaWarps; ++w)
            v += s_part[(w * kMmaHeads + tid) * kMmaKeys + j];
          return v * shape.scale;
        };
        const float old_max = run_max[tid];
        float new_max = old_max;
        for (int j = 0; j < tile; ++j)
          new_max = fmaxf(new_max, score(j));
        float sum = 0.0f;
        for (int j = 0; j < kMmaKeys; ++j) {
          const float e = j < tile ? expf(score(j) - new_max) : 0.0f;
          sum += e;
          p[j] = __bfloat16_as_ushort(__float2bfloat16_rn(e));
        }
        const float factor = expf(old_max - new_max);
        run_sum[tid] = run_sum[tid] * factor + sum;
        run_max[tid] = new_max;
        rescale[tid] = factor;
      } else {
        for (int j = 0; j < kMmaKeys; ++j)
          p[j] = 0;
        rescale[tid] = 1.0f;
      }
    }
    __syncthreads();

    const uint32_t a[4] = {load_pair(p_s + g * kMmaProbStride + 2 * q),
                           load_pair(p_s + (g + 8) * kMmaProbStride + 2 * q),
                           load_pair(p_s + g * kMmaProbStride + 2 * q + 8),
                           load_pair(p_s + (g + 8) * kMmaProbStride + 2 * q + 8)};
    const float r_lo = rescale[g];
    const float r_hi = rescale[g + 8];
#pragma unroll
    for (int nt = 0; nt < kMaxOutTiles; ++nt) {
      if (nt >= out_tiles) break;
      o[nt][0] *= r_lo;
      o[nt][1] *= r_lo;
      o[nt][2] *= r_hi;
      o[nt][3] *= r_hi;
      const uint16_t* column = k_s + c_begin + nt * 8 + g;
      const uint32_t b0 = static_cast<uint32_t>(column[(2 * q) * stride]) |
                          (static_cast<uint32_t>(column[(2 * q + 1) * stride]) << 16);
      const uint32_t b1 = static_cast<uint32_t>(column[(2 * q + 8) * stride]) |
                          (static_cast<uint32_t>(column[(2 * q + 9) * stride]) << 16);
      mma_bf16(o[nt], a, b0, b1);
    }
  }
  __syncthreads();  // the last tile's sums are in run_sum and run_max

  const int rows_of_lane[2] = {g, g + 8};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int h = rows_of_lane[half];
    if (h >= group) continue;
    const float inv = 1.0f / (run_sum[h] + expf(in.sinks[h0 + h] - run_max[h]));
    float* o_row = out + (t * shape.heads + h0 + h) * hd + c_begin + 2 * q;
#pragma unroll
    for (int nt = 0; nt < kMaxOutTiles; ++nt) {
      if (nt >= out_tiles) break;
      o_row[nt * 8] = o[nt][2 * half] * inv;
      o_row[nt * 8 + 1] = o[nt][2 * half + 1] * inv;
    }
  }
}

size_t attention_granted = 48 * 1024;
int device_multiprocessors = 0;  // of the current device, read when shared memory is reserved

// Heads per block: the largest group (a power of two up to kMaxGroup) that still gives every
// multiprocessor its blocks, so large batches read each key once per kMaxGroup heads and small
// ones keep the device busy.
int heads_per_block(int64_t n, int64_t heads) {
  // Two blocks fit on a multiprocessor (__launch_bounds__ and the shared memory allow it).
  // sparse_attention reserves shared memory first, which reads the multiprocessor count.
  DSERVE_CHECK(device_multiprocessors > 0);
  const int64_t wanted = 2 * int64_t{device_multiprocessors};
  int group = kMaxGroup;
  while (group > 1 && (group > heads || n * ((heads + group - 1) / group) < wanted))
    group /= 2;
  return group;
}

}  // namespace

Status reserve_attention_shared(size_t bytes) {
  if (device_multiprocessors == 0) {
    int device = 0;
    DSERVE_RETURN_IF_ERROR(cuda_status(cudaGetDevice(&device), "cudaGetDevice"));
    DSERVE_RETURN_IF_ERROR(cuda_status(
        cudaDeviceGetAttribute(&device_multiprocessors, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute(multiprocessors)"));
  }
  return grant_shared_memory(sparse_attention_kernel, bytes, attention_granted,
                             "sparse_attention_kernel");
}

Status sparse_attention(const AttentionInputs& in, const BatchRows& rows, int64_t n, int64_t heads,
                        int64_t head_dim, int64_t sliding_window, float scale, AttentionMath math,
                        float* out, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && heads >= 1 && sliding_window >= 1);
  DSERVE_CHECK_MSG(head_dim >= 4 && head_dim % 4 == 0 && head_dim <= attention_limits::kMaxHeadDim,
                   "sparse_attention takes head_dim a multiple of 4 up to kMaxHeadDim");
  DSERVE_CHECK(in.rate == 0 || in.compressed.width == head_dim);
  if (n == 0) return Status::ok();
  // Queries and keys are read as float4: every base must be 16-byte aligned.
  for (const void* base :
       {static_cast<const void*>(in.q), static_cast<const void*>(in.batch_kv),
        static_cast<const void*>(in.windows), static_cast<const void*>(in.compressed.pool)}) {
    DSERVE_CHECK_MSG(reinterpret_cast<uintptr_t>(base) % 16 == 0,
                     "sparse_attention reads 16-byte vectors from a base that is not aligned");
  }
  DSERVE_CHECK_MSG(n <= 65535, "a batch of more than 65535 rows exceeds the launch grid");
  const size_t shared = sparse_attention_shared_bytes(head_dim);
  DSERVE_RETURN_IF_ERROR(reserve_attention_shared(shared));
  if (math == AttentionMath::kBf16TensorCores) {
    DSERVE_CHECK_MSG(head_dim % 64 == 0, "tensor-core attention takes head_dim a multiple of 64");
    const Shape shape{heads, head_dim, sliding_window, scale, kMmaHeads};
    const dim3 grid(static_cast<unsigned>((heads + kMmaHeads - 1) / kMmaHeads),
                    static_cast<unsigned>(n));
    sparse_attention_mma_kernel<<<grid, kMmaThreads, sparse_attention_mma_shared_bytes(head_dim),
                                  native(stream)>>>(in, rows, shape, out);
    return launch_status("sparse_attention_mma_kernel launch");
  }
  const int group = heads_per_block(n, heads);
  const Shape shape{heads, head_dim, sliding_window, scale, group};
  const dim3 grid(static_cast<unsigned>((heads + group - 1) / group), static_cast<unsigned>(n));
  sparse_attention_kernel<<<grid, kThreads, shared, native(stream)>>>(in, rows, shape, out);
  return launch_status("sparse_attention_kernel launch");
}

}  // namespace dserve::kernels::cuda

// V4 sparse attention for a batch of rows (the CPU twin is model/src/attention.cc): each query
// attends its sliding window (its request's ring of earlier tokens plus the batch's keys) and the
// layer's compressed entries (the indexer's picks on CSA layers, every visible one on HCA
// layers) read through the block table, with the head's sink in the softmax denominator. K = V
// (one shared head, MQA).
//
// One block per (head, row): its warps take keys in turn for the dot products (lanes split
// the channels), the block takes the softmax, then each thread sums its channels of the output
// over all keys. Key row addresses are resolved once into shared memory.

#include "common.cuh"
#include "dserve/kernels/cuda_model_ops.h"

namespace dserve::kernels::cuda {
namespace {

constexpr int kThreads = 128;

struct Shape {
  int64_t heads, head_dim, sliding_window;
  float scale;
};

__global__ void sparse_attention_kernel(AttentionInputs in, BatchRows rows, Shape shape,
                                        float* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  __shared__ float scratch[kWarpSize];
  const int64_t h = blockIdx.x;
  const int64_t t = blockIdx.y;
  const int64_t hd = shape.head_dim;
  const int64_t pos = rows.position[t];
  const int64_t first_pos = rows.first_pos[t];
  const int64_t first_row = rows.first_row[t];
  const int64_t slot = rows.slot[t];
  const float* ring = in.windows + slot * shape.sliding_window * hd;
  const int64_t first_key = pos - shape.sliding_window + 1 > 0 ? pos - shape.sliding_window + 1 : 0;
  const int64_t n_window = pos - first_key + 1;
  int64_t n_comp = 0;
  if (in.rate > 0) n_comp = in.selected != nullptr ? in.selected_counts[t] : (pos + 1) / in.rate;
  const int64_t total = n_window + n_comp;
  const PagedRowsView& c = in.compressed;
  const int32_t* table = in.rate > 0 ? c.block_tables + slot * c.table_stride : nullptr;

  // Shared memory: key row pointers [total], then logits [total].
  const float** keys = reinterpret_cast<const float**>(shared_bytes);
  float* logits = reinterpret_cast<float*>(shared_bytes + sizeof(const float*) * total);
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    if (i < n_window) {
      const int64_t p = first_key + i;
      keys[i] = p >= first_pos ? in.batch_kv + (first_row + p - first_pos) * hd
                               : ring + (p % shape.sliding_window) * hd;
    } else {
      const int64_t j = i - n_window;
      const int64_t e = in.selected != nullptr ? in.selected[t * in.selected_stride + j] : j;
      const int64_t page = table[e / c.rows_per_page];
      keys[i] = c.pool + (page * c.rows_per_page + e % c.rows_per_page) * c.width;
    }
  }
  __syncthreads();

  const float* q = in.q + (t * shape.heads + h) * hd;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  for (int64_t i = warp; i < total; i += warps) {
    const float* k = keys[i];
    float dot = 0.0f;
    for (int64_t c = lane; c < hd; c += kWarpSize)
      dot += q[c] * k[c];
    dot = warp_all_reduce(dot, SumOp{});
    if (lane == 0) logits[i] = dot * shape.scale;
  }
  __syncthreads();

  const float sink = in.sinks[h];
  float local_max = sink;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x)
    local_max = fmaxf(local_max, logits[i]);
  const float max_v = block_all_reduce(local_max, MaxOp{}, scratch);
  float local_sum = 0.0f;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const float e = expf(logits[i] - max_v);
    logits[i] = e;
    local_sum += e;
  }
  const float sum = block_all_reduce(local_sum, SumOp{}, scratch) + expf(sink - max_v);
  const float inv = 1.0f / sum;
  __syncthreads();

  float* o = out + (t * shape.heads + h) * hd;
  for (int64_t c = threadIdx.x; c < hd; c += blockDim.x) {
    float acc = 0.0f;
    for (int64_t i = 0; i < total; ++i)
      acc += (logits[i] * inv) * keys[i][c];
    o[c] = acc;
  }
}

size_t attention_granted = 48 * 1024;

}  // namespace

Status reserve_attention_shared(size_t bytes) {
  return grant_shared_memory(sparse_attention_kernel, bytes, attention_granted,
                             "sparse_attention_kernel");
}

Status sparse_attention(const AttentionInputs& in, const BatchRows& rows, int64_t n, int64_t heads,
                        int64_t head_dim, int64_t sliding_window, int64_t max_compressed,
                        float scale, float* out, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && heads >= 1 && head_dim >= 1 && sliding_window >= 1);
  DSERVE_CHECK(max_compressed >= 0);
  DSERVE_CHECK(in.rate == 0 || in.compressed.width == head_dim);
  if (n == 0) return Status::ok();
  DSERVE_CHECK_MSG(n <= 65535, "a batch of more than 65535 rows exceeds the launch grid");
  const size_t shared = sparse_attention_shared_bytes(sliding_window, max_compressed);
  DSERVE_RETURN_IF_ERROR(reserve_attention_shared(shared));
  const Shape shape{heads, head_dim, sliding_window, scale};
  const dim3 grid(static_cast<unsigned>(heads), static_cast<unsigned>(n));
  sparse_attention_kernel<<<grid, kThreads, shared, native(stream)>>>(in, rows, shape, out);
  return launch_status("sparse_attention_kernel launch");
}

}  // namespace dserve::kernels::cuda

// Greedy sampling on the GPU: the argmax of each row, the lowest index among equals (the rule
// of model::argmax), so that greedy decoding picks the same token on both backends.

#include "common.cuh"
#include "dserve/kernels/cuda_model_ops.h"

namespace dserve::kernels::cuda {
namespace {

constexpr int kThreads = 256;

struct Best {
  float value;
  int64_t index;
};

// a beats b when larger, or equal and earlier; an index < 0 is "nothing yet".
__device__ Best better(Best a, Best b) {
  if (b.index < 0) return a;
  if (a.index < 0) return b;
  if (a.value > b.value || (a.value == b.value && a.index < b.index)) return a;
  return b;
}

__global__ void argmax_kernel(const float* __restrict__ x, int64_t n, int32_t* __restrict__ out) {
  __shared__ float values[kThreads];
  __shared__ int64_t indices[kThreads];
  const float* row = x + static_cast<int64_t>(blockIdx.x) * n;
  Best best{0.0f, -1};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    best = better(best, Best{row[i], i});
  values[threadIdx.x] = best.value;
  indices[threadIdx.x] = best.index;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) {
      const Best other{values[threadIdx.x + half], indices[threadIdx.x + half]};
      const Best mine{values[threadIdx.x], indices[threadIdx.x]};
      const Best winner = better(mine, other);
      values[threadIdx.x] = winner.value;
      indices[threadIdx.x] = winner.index;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<int32_t>(indices[0] < 0 ? 0 : indices[0]);
}

}  // namespace

Status argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* out, CudaStream stream) {
  DSERVE_CHECK(rows >= 0 && n >= 1);
  if (rows == 0) return Status::ok();
  DSERVE_CHECK_MSG(rows <= INT32_MAX, "too many rows for one launch");
  argmax_kernel<<<static_cast<unsigned>(rows), kThreads, 0, native(stream)>>>(x, n, out);
  return launch_status("argmax_kernel launch");
}

}  // namespace dserve::kernels::cuda

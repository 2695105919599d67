// Row softmax, the CUDA twin of cpu::softmax: x[rows, n] <- exp(x - max) / sum, in place;
// -inf entries get 0 and a row of -inf only becomes all zeros.

#include <cstdint>

#include "common.cuh"

namespace dserve::kernels::cuda {
namespace {

constexpr int kMaxThreads = 256;

// x: [rows, n] row-major, in place.
// Launch: one block per row (grid-stride over rows beyond the grid), threads = whole warps
// covering n, at most 256. Three passes over the row, as the CPU reference does them: max,
// sum of exp(x - max), scaling; the later passes re-read the row from L1/L2 (attention rows
// are a few thousand floats at most). expf is the accurate one (no fast-math), so the result
// differs from the reference by summation order only.
__global__ void softmax_kernel(float* __restrict__ x, int64_t rows, int64_t n) {
  __shared__ float scratch[kWarpSize];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float* xr = x + row * n;
    float max_v = -INFINITY;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      max_v = fmaxf(max_v, xr[i]);
    max_v = block_all_reduce(max_v, MaxOp{}, scratch);
    if (max_v == -INFINITY) {
      // Every entry is masked: exp(-inf - -inf) would be NaN; the reference writes zeros.
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        xr[i] = 0.0f;
      continue;
    }
    float sum = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      sum += expf(xr[i] - max_v);
    sum = block_all_reduce(sum, SumOp{}, scratch);
    const float inv = 1.0f / sum;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
      xr[i] = expf(xr[i] - max_v) * inv;
  }
}

}  // namespace

Status softmax(float* x, int64_t rows, int64_t n, CudaStream stream) {
  DSERVE_CHECK(rows >= 0 && n >= 0);
  if (rows == 0 || n == 0) return Status::ok();
  DSERVE_CHECK(x != nullptr);
  const int blocks = static_cast<int>(std::min(rows, kMaxBlocks));
  softmax_kernel<<<blocks, threads_for_row(n, kMaxThreads), 0, native(stream)>>>(x, rows, n);
  return launch_status("softmax_kernel launch");
}

}  // namespace dserve::kernels::cuda

// Interleaved partial RoPE, the CUDA twin of cpu::rope_interleaved: in each row of x[rows,
// dim], pairs (2i, 2i+1) of the last 2 * half channels rotate by the angle i of the row's
// cos/sin (negated when inverse).

#include <cstdint>

#include "common.cuh"

namespace dserve::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// x: [rows, dim] in place; cos, sin: [rows / rows_per_angle (rounded up), half].
// Launch: one thread per (row, pair), a flat grid-stride loop of 256-thread blocks over
// rows * half pairs. A row's rope slice is only 2 * half floats (64 for V4), too little for a
// block each; the flat layout keeps a warp on consecutive pairs, so its loads of x, cos and
// sin are coalesced.
__global__ void rope_interleaved_kernel(float* __restrict__ x, int64_t rows, int64_t dim,
                                        int64_t half, const float* __restrict__ cos,
                                        const float* __restrict__ sin, int64_t rows_per_angle,
                                        bool inverse) {
  const int64_t total = rows * half;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += stride) {
    const int64_t row = t / half;
    const int64_t i = t % half;
    const int64_t angle = (row / rows_per_angle) * half + i;
    const float c = cos[angle];
    const float s = inverse ? -sin[angle] : sin[angle];
    float* pair = x + row * dim + (dim - 2 * half) + 2 * i;
    const float a = pair[0];
    const float b = pair[1];
    pair[0] = a * c - b * s;
    pair[1] = b * c + a * s;
  }
}

}  // namespace

Status rope_interleaved(float* x, int64_t rows, int64_t dim, int64_t half, const float* cos,
                        const float* sin, int64_t rows_per_angle, bool inverse, CudaStream stream) {
  DSERVE_CHECK(rows >= 0 && half >= 0 && 2 * half <= dim && rows_per_angle >= 1);
  if (rows == 0 || half == 0) return Status::ok();
  DSERVE_CHECK(x != nullptr && cos != nullptr && sin != nullptr);
  const int64_t total = rows * half;
  const int blocks = static_cast<int>(std::min((total + kThreads - 1) / kThreads, kMaxBlocks));
  rope_interleaved_kernel<<<blocks, kThreads, 0, native(stream)>>>(x, rows, dim, half, cos, sin,
                                                                   rows_per_angle, inverse);
  return launch_status("rope_interleaved_kernel launch");
}

}  // namespace dserve::kernels::cuda

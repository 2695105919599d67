// RMSNorm, the CUDA twin of cpu::rms_norm: x[n, d] <- x * rsqrt(mean(x^2) + eps) * weight[d].

#include <cstdint>

#include "common.cuh"

namespace dserve::kernels::cuda {
namespace {

constexpr int kMaxThreads = 256;

// kVec consecutive floats, moved as one 16-byte access when kVec is 4.
template <int kVec>
struct Pack {
  float v[kVec];
};

template <int kVec>
__device__ Pack<kVec> load(const float* p) {
  Pack<kVec> r;
  if constexpr (kVec == 4) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    r.v[0] = f.x;
    r.v[1] = f.y;
    r.v[2] = f.z;
    r.v[3] = f.w;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      r.v[j] = p[j];
  }
  return r;
}

template <int kVec>
__device__ void store(float* p, const Pack<kVec>& r) {
  if constexpr (kVec == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      p[j] = r.v[j];
  }
}

// x: [n, d] row-major, normalised in place; weight: [d] or nullptr.
// Launch: one block per row (grid-stride over rows beyond the grid), threads = whole warps
// covering the row's d / kVec packs, at most 256. kVec = 4 (16-byte accesses, coalesced across
// the warp) when d % 4 == 0 and x and weight are 16-byte aligned, else 1. Two passes over the
// row: the sum of squares with a block reduction, then the scaling; the second pass re-reads
// the row from L1/L2 (a 4096-wide row is 16 KB) instead of keeping it in registers, which
// would bound d.
template <int kVec>
__global__ void rms_norm_kernel(float* __restrict__ x, int64_t n, int64_t d,
                                const float* __restrict__ weight, float eps) {
  __shared__ float scratch[kWarpSize];
  const int64_t packs = d / kVec;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    float* xr = x + row * d;
    float sum_sq = 0.0f;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const Pack<kVec> v = load<kVec>(xr + p * kVec);
#pragma unroll
      for (int j = 0; j < kVec; ++j)
        sum_sq += v.v[j] * v.v[j];
    }
    sum_sq = block_all_reduce(sum_sq, SumOp{}, scratch);
    // Same expression as the CPU reference (IEEE division and sqrt: no fast-math here).
    const float inv = 1.0f / sqrtf(sum_sq / static_cast<float>(d) + eps);
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      Pack<kVec> v = load<kVec>(xr + p * kVec);
      if (weight != nullptr) {
        const Pack<kVec> w = load<kVec>(weight + p * kVec);
#pragma unroll
        for (int j = 0; j < kVec; ++j)
          v.v[j] = w.v[j] * (v.v[j] * inv);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j)
          v.v[j] *= inv;
      }
      store<kVec>(xr + p * kVec, v);
    }
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace

Status rms_norm(float* x, int64_t n, int64_t d, const float* weight, float eps, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && d >= 0);
  if (n == 0 || d == 0) return Status::ok();
  DSERVE_CHECK(x != nullptr);
  const int blocks = static_cast<int>(std::min(n, kMaxBlocks));
  if (d % 4 == 0 && aligned16(x) && (weight == nullptr || aligned16(weight))) {
    rms_norm_kernel<4>
        <<<blocks, threads_for_row(d / 4, kMaxThreads), 0, native(stream)>>>(x, n, d, weight, eps);
  } else {
    rms_norm_kernel<1>
        <<<blocks, threads_for_row(d, kMaxThreads), 0, native(stream)>>>(x, n, d, weight, eps);
  }
  return launch_status("rms_norm_kernel launch");
}

}  // namespace dserve::kernels::cuda

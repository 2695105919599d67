#pragma once
// Shared by the kernels of kernels/cuda: CUDA/cuBLAS error codes turned into Status where the
// call is made, the stream handle of the public API, and block-wide reductions.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "dserve/core/status.h"
#include "dserve/kernels/cuda_ops.h"

namespace dserve::kernels::cuda {

inline cudaStream_t native(CudaStream stream) {
  return static_cast<cudaStream_t>(stream.handle);
}

// OK, or INTERNAL "<call>: <cudaGetErrorString>". Clears the runtime's last error so that it is
// reported once.
inline Status cuda_status(cudaError_t err, const char* call) {
  if (err == cudaSuccess) return Status::ok();
  cudaGetLastError();
  return internal_error(std::string(call) + ": " + cudaGetErrorString(err));
}

// The status of the kernel launch just made (bad configuration, no image for this device).
inline Status launch_status(const char* kernel) {
  return cuda_status(cudaGetLastError(), kernel);
}

// OK, or INTERNAL "<call>: <cuBLAS's message>".
inline Status cublas_status(cublasStatus_t status, const char* call) {
  if (status == CUBLAS_STATUS_SUCCESS) return Status::ok();
  return internal_error(std::string(call) + ": " + cublasGetStatusString(status));
}

inline cublasHandle_t handle_of(const BlasHandle& blas) {
  return static_cast<cublasHandle_t>(blas.native());
}

// Opt-in dynamic shared memory of the kernels that may need more than 48 KiB (attention.cu,
// indexer.cu); a no-op when that much is already granted.
Status reserve_attention_shared(size_t bytes);
Status reserve_indexer_shared(size_t bytes);

// Above the default 48 KiB a kernel must opt in. `granted` keeps the largest size granted so
// far (one device per process, as everywhere in this backend).
template <typename Kernel>
Status grant_shared_memory(Kernel kernel, size_t bytes, size_t& granted, const char* name) {
  if (bytes <= granted) return Status::ok();
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(bytes));
  DSERVE_RETURN_IF_ERROR(
      cuda_status(err, (std::string("cudaFuncSetAttribute(") + name + " shared memory)").c_str()));
  granted = bytes;
  return Status::ok();
}

constexpr int kWarpSize = 32;
// Upper bound on blocks in a grid-stride launch: enough to fill any current GPU many times,
// far below the 2^31 - 1 limit of gridDim.x.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// Blocks for a flat grid-stride loop over `total` items with `threads` per block.
inline int blocks_for(int64_t total, int threads) {
  return static_cast<int>(std::clamp<int64_t>((total + threads - 1) / threads, 1, kMaxBlocks));
}

// Runs f(i) for every i in [0, total), one thread per item in a grid-stride loop.
template <typename F>
__global__ void for_each_index_kernel(int64_t total, F f) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride)
    f(i);
}

// Launches for_each_index_kernel with 256-thread blocks; `name` names it in a launch error.
template <typename F>
Status for_each_index(int64_t total, F f, CudaStream stream, const char* name) {
  if (total <= 0) return Status::ok();
  constexpr int kThreads = 256;
  for_each_index_kernel<<<blocks_for(total, kThreads), kThreads, 0, native(stream)>>>(total, f);
  return launch_status(name);
}

// Threads for a one-block-per-row kernel over rows of `work` items: whole warps, no more
// than there are items (short rows waste fewer idle lanes), capped at `max_threads`.
inline int threads_for_row(int64_t work, int max_threads) {
  const int64_t warps = (work + kWarpSize - 1) / kWarpSize;
  return static_cast<int>(std::clamp<int64_t>(warps * kWarpSize, kWarpSize, max_threads));
}

struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Every lane gets combine() over the warp's 32 values. The butterfly gives all lanes the same
// bits as long as combine is commutative, which sum and max are.
template <typename Combine>
__device__ float warp_all_reduce(float v, Combine combine) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = combine(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Every thread of the block gets combine() over the block's values. blockDim.x must be a
// multiple of 32 (at most 1024) and every thread must call it; `scratch` is 32 floats of
// shared memory, reusable right after the call returns.
template <typename Combine>
__device__ float block_all_reduce(float v, Combine combine, float* scratch) {
  v = warp_all_reduce(v, combine);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) scratch[warp] = v;
  __syncthreads();
  float total = scratch[0];
  for (int i = 1; i < warps; ++i)
    total = combine(total, scratch[i]);
  __syncthreads();  // scratch is read by all before anyone writes it again
  return total;
}

}  // namespace dserve::kernels::cuda

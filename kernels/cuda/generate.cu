// Device-side generation of benchmark weights and measurements of the device's own limits:
// seeded values written straight into device memory (a V4-Flash layer's experts are 13 GB in
// bf16, too much to make on the host and copy), the device-to-device copy bandwidth and the
// cuBLAS bf16 GEMM rate that bench/forward_gpu reports its figures against.

#include <cuda_bf16.h>

#include <chrono>
#include <vector>

#include "common.cuh"
#include "dserve/kernels/cuda_model_ops.h"

namespace dserve::kernels::cuda {
namespace {

// SplitMix64 of (seed, index): the same value for an element whatever the launch shape.
__device__ uint64_t mix(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Uniform in [-1, 1).
__device__ float symmetric(uint64_t seed, uint64_t i) {
  return static_cast<float>(mix(seed, i) >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

class EventTimer {
 public:
  EventTimer() {
    cudaEventCreate(&start_);
    cudaEventCreate(&stop_);
  }
  ~EventTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  void start() { cudaEventRecord(start_); }
  Result<double> stop_seconds() {
    cudaEventRecord(stop_);
    DSERVE_RETURN_IF_ERROR(cuda_status(cudaEventSynchronize(stop_), "cudaEventSynchronize"));
    float ms = 0.0f;
    DSERVE_RETURN_IF_ERROR(
        cuda_status(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime"));
    return static_cast<double>(ms) / 1000.0;
  }

 private:
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
};

}  // namespace

Status fill_random(void* data, WeightType type, int64_t count, uint64_t seed, float scale,
                   float offset, CudaStream stream) {
  DSERVE_CHECK(count >= 0);
  if (count == 0) return Status::ok();
  DSERVE_CHECK(data != nullptr);
  if (type == WeightType::kBf16) {
    auto* out = static_cast<uint16_t*>(data);
    return for_each_index(
        count,
        [=] __device__(int64_t i) {
          const float v = offset + scale * symmetric(seed, static_cast<uint64_t>(i));
          out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
        },
        stream, "fill_random launch");
  }
  auto* out = static_cast<float*>(data);
  return for_each_index(
      count,
      [=] __device__(int64_t i) {
        out[i] = offset + scale * symmetric(seed, static_cast<uint64_t>(i));
      },
      stream, "fill_random launch");
}

Status fill_random_ints(int32_t* data, int64_t count, uint64_t seed, int32_t bound,
                        CudaStream stream) {
  DSERVE_CHECK(count >= 0 && bound >= 1);
  return for_each_index(
      count,
      [=] __device__(int64_t i) {
        data[i] = static_cast<int32_t>(mix(seed, static_cast<uint64_t>(i)) %
                                       static_cast<uint64_t>(bound));
      },
      stream, "fill_random_ints launch");
}

Result<double> measure_copy_bandwidth(size_t bytes, int repeats) {
  DSERVE_CHECK(bytes > 0 && repeats >= 1);
  DSERVE_ASSIGN_OR_RETURN(DeviceBuffer a, DeviceBuffer::allocate(bytes));
  DSERVE_ASSIGN_OR_RETURN(DeviceBuffer b, DeviceBuffer::allocate(bytes));
  DSERVE_RETURN_IF_ERROR(cuda_status(cudaMemset(a.data(), 1, bytes), "cudaMemset"));
  DSERVE_RETURN_IF_ERROR(cuda_status(
      cudaMemcpy(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice), "cudaMemcpy warm-up"));
  EventTimer timer;
  timer.start();
  for (int r = 0; r < repeats; ++r)
    cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice);
  DSERVE_ASSIGN_OR_RETURN(const double seconds, timer.stop_seconds());
  // A copy reads and writes every byte.
  return 2.0 * static_cast<double>(bytes) * repeats / seconds;
}

Result<double> measure_bf16_gemm_flops(const BlasHandle& blas, int64_t m, int64_t n, int64_t k,
                                       int repeats) {
  DSERVE_CHECK(m > 0 && n > 0 && k > 0 && repeats >= 1);
  DSERVE_ASSIGN_OR_RETURN(DeviceBuffer x, DeviceBuffer::allocate(static_cast<size_t>(n * k) * 2));
  DSERVE_ASSIGN_OR_RETURN(DeviceBuffer w, DeviceBuffer::allocate(static_cast<size_t>(m * k) * 2));
  DSERVE_ASSIGN_OR_RETURN(DeviceBuffer y, DeviceBuffer::allocate(static_cast<size_t>(n * m) * 4));
  DSERVE_RETURN_IF_ERROR(fill_random(x.data(), WeightType::kBf16, n * k, 1, 1.0f, 0.0f, {}));
  DSERVE_RETURN_IF_ERROR(fill_random(w.data(), WeightType::kBf16, m * k, 2, 1.0f, 0.0f, {}));
  DSERVE_RETURN_IF_ERROR(matmul_bf16(blas, x.as<uint16_t>(), n, k, w.as<uint16_t>(), m,
                                     y.as<float>(), m, {}));  // warm-up, picks the algorithm
  EventTimer timer;
  timer.start();
  for (int r = 0; r < repeats; ++r) {
    DSERVE_RETURN_IF_ERROR(
        matmul_bf16(blas, x.as<uint16_t>(), n, k, w.as<uint16_t>(), m, y.as<float>(), m, {}));
  }
  DSERVE_ASSIGN_OR_RETURN(const double seconds, timer.stop_seconds());
  return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) * repeats /
         seconds;
}

Result<DeviceMemory> device_memory() {
  size_t free_bytes = 0, total_bytes = 0;
  DSERVE_RETURN_IF_ERROR(cuda_status(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo"));
  return DeviceMemory{free_bytes, total_bytes};
}

Result<double> time_seconds_synchronized(const std::function<Status()>& work) {
  DSERVE_RETURN_IF_ERROR(cuda_status(cudaDeviceSynchronize(), "cudaDeviceSynchronize"));
  const auto start = std::chrono::steady_clock::now();
  DSERVE_RETURN_IF_ERROR(work());
  DSERVE_RETURN_IF_ERROR(cuda_status(cudaDeviceSynchronize(), "cudaDeviceSynchronize"));
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace dserve::kernels::cuda

#pragma once
// The CUDA backend: host-callable launchers that mirror the CPU reference (cpu_ops.h) op for
// op. No CUDA type appears here, so host code compiles with g++ alone; the kernels live in
// kernels/cuda/*.cu. Every pointer a launcher takes is DEVICE memory, row-major, with shapes
// as in cpu_ops.h. Launchers enqueue work on `stream` and return without waiting: a Status
// reports a failed launch or library call at once, while a fault inside a kernel shows up at
// the next synchronising call (synchronize(), DeviceBuffer copies). Shape or pointer misuse is
// a bug and aborts (DSERVE_CHECK). In a build without the CUDA backend every call that needs
// a device returns UNAVAILABLE (see device.h for how to ask first).

#include <cstddef>
#include <cstdint>
#include <span>

#include "dserve/core/status.h"

namespace dserve::kernels::cuda {

// A CUDA stream, passed by value: `handle` is a cudaStream_t owned by the caller; nullptr is
// the legacy default stream.
struct CudaStream {
  void* handle = nullptr;
};

// Waits until all work enqueued on `stream` has finished; returns the first error any of it
// raised ("cudaStreamSynchronize: <cudaGetErrorString>").
Status synchronize(CudaStream stream);

// Owns one device allocation (cudaMalloc), freed on destruction. Move-only; not thread-safe.
// Copies are synchronous cudaMemcpy calls: they are ordered after work on the legacy default
// stream only, so synchronize() a non-default stream before reading its results.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;  // holds nothing
  // A buffer of `bytes` uninitialised bytes; zero bytes allocate nothing and succeed.
  static Result<DeviceBuffer> allocate(size_t bytes);
  // A buffer holding a copy of `values`.
  template <typename T>
  static Result<DeviceBuffer> from_host(std::span<const T> values);

  DeviceBuffer(DeviceBuffer&& other) noexcept : data_(other.data_), bytes_(other.bytes_) {
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  size_t size_bytes() const { return bytes_; }
  // The device address (nullptr when empty), typed for the launchers.
  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

  // Copies `bytes` from host memory into the buffer at byte `offset` (offset + bytes at most
  // size_bytes()).
  Status copy_from_host(const void* src, size_t bytes, size_t offset = 0);
  // Copies `bytes` of the buffer from byte `offset` on (offset + bytes at most size_bytes())
  // into host memory.
  Status copy_to_host(void* dst, size_t bytes, size_t offset = 0) const;
  // Copies the first out.size() elements of the buffer into `out`.
  template <typename T>
  Status copy_to_host(std::span<T> out) const {
    return copy_to_host(out.data(), out.size_bytes());
  }

 private:
  DeviceBuffer(void* data, size_t bytes) : data_(data), bytes_(bytes) {}
  void release();

  void* data_ = nullptr;
  size_t bytes_ = 0;
};

template <typename T>
Result<DeviceBuffer> DeviceBuffer::from_host(std::span<const T> values) {
  DSERVE_ASSIGN_OR_RETURN(DeviceBuffer buffer, allocate(values.size_bytes()));
  DSERVE_RETURN_IF_ERROR(buffer.copy_from_host(values.data(), values.size_bytes()));
  return buffer;
}

// A cuBLAS context (cublasHandle_t), created on the current device. Move-only. A handle is
// used by one host thread at a time; give each thread its own.
class BlasHandle {
 public:
  // Fails with INTERNAL (naming cublasCreate and cuBLAS's message) when no context can be made.
  static Result<BlasHandle> create();

  BlasHandle(BlasHandle&& other) noexcept
      : handle_(other.handle_),
        workspace_(other.workspace_),
        workspace_bytes_(other.workspace_bytes_) {
    other.handle_ = nullptr;
  }
  BlasHandle& operator=(BlasHandle&& other) noexcept;
  BlasHandle(const BlasHandle&) = delete;
  BlasHandle& operator=(const BlasHandle&) = delete;
  ~BlasHandle();

  void* native() const { return handle_; }  // the cublasHandle_t

  // Makes `stream` the handle's stream, keeping the workspace set by set_blas_workspace (cuBLAS
  // drops it to its own pool at every stream change). Every launcher calls this first.
  Status bind(CudaStream stream) const;
  // The caller's device workspace (owned by the caller, alive as long as the handle is used).
  void use_workspace(void* workspace, size_t bytes) {
    workspace_ = workspace;
    workspace_bytes_ = bytes;
  }

 private:
  explicit BlasHandle(void* handle) : handle_(handle) {}
  void release();

  void* handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
};

// y[n, m] = x[n, k] . w[m, k]^T in fp32 (cuBLAS SGEMM, no TF32), the CUDA twin of
// cpu::matmul_rows: row r of y starts at y + r * y_stride (y_stride >= m). k == 0 zeroes y.
Status matmul(const BlasHandle& blas, const float* x, int64_t n, int64_t k, const float* w,
              int64_t m, float* y, int64_t y_stride, CudaStream stream);

// The same product with bf16 inputs (bit patterns: the upper 16 bits of an fp32) and fp32
// products, accumulation and output (cublasGemmEx, CUBLAS_COMPUTE_32F).
Status matmul_bf16(const BlasHandle& blas, const uint16_t* x, int64_t n, int64_t k,
                   const uint16_t* w, int64_t m, float* y, int64_t y_stride, CudaStream stream);

// x[n, d] <- x * rsqrt(mean(x^2) + eps) * weight, row by row, in place (cpu::rms_norm).
// `weight` is d floats, or nullptr for the unweighted norm.
Status rms_norm(float* x, int64_t n, int64_t d, const float* weight, float eps, CudaStream stream);

// Interleaved partial RoPE (cpu::rope_interleaved) on each of the `rows` vectors of x[rows,
// dim]: pairs (2i, 2i+1) of the last 2 * half channels rotate by the angle of row
// r / rows_per_angle of cos[., half] and sin[., half] (rows_per_angle = heads lets the heads
// of one token share its angles). `inverse` rotates by the negative angle.
Status rope_interleaved(float* x, int64_t rows, int64_t dim, int64_t half, const float* cos,
                        const float* sin, int64_t rows_per_angle, bool inverse, CudaStream stream);

// In-place softmax of each row of x[rows, n] (cpu::softmax); -inf entries get probability 0
// and a row of -inf only becomes all zeros.
Status softmax(float* x, int64_t rows, int64_t n, CudaStream stream);

}  // namespace dserve::kernels::cuda

// DeviceBuffer and stream synchronisation: the memory plumbing of the CUDA backend.

#include <string>

#include "common.cuh"

namespace dserve::kernels::cuda {

Status synchronize(CudaStream stream) {
  return cuda_status(cudaStreamSynchronize(native(stream)), "cudaStreamSynchronize");
}

Result<DeviceBuffer> DeviceBuffer::allocate(size_t bytes) {
  if (bytes == 0) return DeviceBuffer();
  void* data = nullptr;
  const cudaError_t err = cudaMalloc(&data, bytes);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    return resource_exhausted("cudaMalloc: out of device memory allocating " +
                              std::to_string(bytes) + " bytes");
  }
  const Status status = cuda_status(err, "cudaMalloc");
  if (!status.is_ok()) {
    return status.with_context("allocating " + std::to_string(bytes) + " device bytes");
  }
  return DeviceBuffer(data, bytes);
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    release();
    data_ = other.data_;
    bytes_ = other.bytes_;
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() {
  release();
}

void DeviceBuffer::release() {
  // A failing cudaFree means the context is already broken (a kernel faulted); the fault
  // itself was or will be reported by the call that synchronises, so it is dropped here.
  if (data_ != nullptr) cudaFree(data_);
  data_ = nullptr;
  bytes_ = 0;
}

Status DeviceBuffer::copy_from_host(const void* src, size_t bytes, size_t offset) {
  DSERVE_CHECK_MSG(offset <= bytes_ && bytes <= bytes_ - offset,
                   "copy of " + std::to_string(bytes) + " bytes at offset " +
                       std::to_string(offset) + " into a device buffer of " +
                       std::to_string(bytes_));
  if (bytes == 0) return Status::ok();
  return cuda_status(
      cudaMemcpy(static_cast<char*>(data_) + offset, src, bytes, cudaMemcpyHostToDevice),
      "cudaMemcpy(host to device)");
}

Status DeviceBuffer::copy_to_host(void* dst, size_t bytes, size_t offset) const {
  DSERVE_CHECK_MSG(offset <= bytes_ && bytes <= bytes_ - offset,
                   "copy of " + std::to_string(bytes) + " bytes at offset " +
                       std::to_string(offset) + " out of a device buffer of " +
                       std::to_string(bytes_));
  if (bytes == 0) return Status::ok();
  return cuda_status(
      cudaMemcpy(dst, static_cast<const char*>(data_) + offset, bytes, cudaMemcpyDeviceToHost),
      "cudaMemcpy(device to host)");
}

}  // namespace dserve::kernels::cuda

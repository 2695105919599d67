// The CUDA backend's entry points in a build without it (no nvcc, or DSERVE_WITH_CUDA=OFF):
// every call returns UNAVAILABLE, so host code links and decides at run time, as it does on a
// machine without a GPU.

#include <utility>

#include "dserve/kernels/cuda_model_ops.h"
#include "dserve/kernels/cuda_ops.h"

namespace dserve::kernels::cuda {
namespace {

Status not_built() {
  return unavailable("built without the CUDA backend");
}

}  // namespace

Status synchronize(CudaStream) {
  return not_built();
}

Result<DeviceBuffer> DeviceBuffer::allocate(size_t bytes) {
  if (bytes == 0) return DeviceBuffer();
  return not_built();
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  release();
  std::swap(data_, other.data_);
  std::swap(bytes_, other.bytes_);
  return *this;
}

DeviceBuffer::~DeviceBuffer() {
  release();
}

// Nothing is ever allocated without the backend.
void DeviceBuffer::release() {
  data_ = nullptr;
  bytes_ = 0;
}

Status DeviceBuffer::copy_from_host(const void*, size_t bytes, size_t offset) {
  DSERVE_CHECK(offset <= bytes_ && bytes <= bytes_ - offset);
  return bytes == 0 ? Status::ok() : not_built();
}

Status DeviceBuffer::copy_to_host(void*, size_t bytes, size_t offset) const {
  DSERVE_CHECK(offset <= bytes_ && bytes <= bytes_ - offset);
  return bytes == 0 ? Status::ok() : not_built();
}

Result<BlasHandle> BlasHandle::create() {
  return not_built();
}

Status BlasHandle::bind(CudaStream) const {
  return not_built();
}

BlasHandle& BlasHandle::operator=(BlasHandle&& other) noexcept {
  std::swap(handle_, other.handle_);
  return *this;
}

BlasHandle::~BlasHandle() {
  release();
}

void BlasHandle::release() {
  handle_ = nullptr;
}

Status matmul(const BlasHandle&, const float*, int64_t, int64_t, const float*, int64_t, float*,
              int64_t, CudaStream) {
  return not_built();
}

Status matmul_bf16(const BlasHandle&, const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t,
                   float*, int64_t, CudaStream) {
  return not_built();
}

Status rms_norm(float*, int64_t, int64_t, const float*, float, CudaStream) {
  return not_built();
}

Status rope_interleaved(float*, int64_t, int64_t, int64_t, const float*, const float*, int64_t,
                        bool, CudaStream) {
  return not_built();
}

Status softmax(float*, int64_t, int64_t, CudaStream) {
  return not_built();
}

// --- cuda_model_ops.h ---

Status linear(const BlasHandle&, const float*, int64_t, const DeviceMatrix&, float*, int64_t,
              uint16_t*, CudaStream) {
  return not_built();
}

Status linear_grouped(const BlasHandle&, const float*, int64_t, int64_t, const DeviceMatrix&,
                      float*, uint16_t*, CudaStream) {
  return not_built();
}

Status round_to_bf16(const float*, int64_t, uint16_t*, CudaStream) {
  return not_built();
}

Status rms_norm_to(const float*, float*, int64_t, int64_t, const float*, float, CudaStream) {
  return not_built();
}

Status embed_streams(const void*, WeightType, const int32_t*, int64_t, int64_t, int64_t, float*,
                     CudaStream) {
  return not_built();
}

Status rope_at(float*, int64_t, int64_t, const RopeView&, const int32_t*, int64_t, bool,
               CudaStream) {
  return not_built();
}

Status hyper_mix(const float*, const float*, const float*, int64_t, int64_t, int64_t, float, float*,
                 float*, float*, CudaStream) {
  return not_built();
}

Status hyper_collapse(const float*, const float*, int64_t, int64_t, int64_t, float*, CudaStream) {
  return not_built();
}

Status hyper_expand(float*, const float*, const float*, const float*, int64_t, int64_t, int64_t,
                    CudaStream) {
  return not_built();
}

Status hyper_head_weights(const float*, const float*, const float*, int64_t, int64_t, float, float*,
                          CudaStream) {
  return not_built();
}

Status gather_rows(const PagedRowsView&, int64_t, int64_t, int64_t, float*, CudaStream) {
  return not_built();
}

Status round_kv_rows(float*, int64_t, int64_t, int64_t, KvRounding, CudaStream) {
  return not_built();
}

Status compress_batch(const float*, const float*, int64_t, const BatchRows&, const ClosedWindow*,
                      const int32_t*, int64_t, const CompressorView&, const PagedRowsView&,
                      const RopeView&, float, KvRounding, CudaStream) {
  return not_built();
}

Status indexer_scores(const float*, const float*, int64_t, int64_t, int64_t, const int32_t*,
                      int64_t, float, float, float*, CudaStream) {
  return not_built();
}

Status indexer_scores_paged(const float*, const float*, int64_t, int64_t, int64_t, const BatchRows&,
                            const PagedRowsView&, int64_t, int64_t, float, float, float*,
                            CudaStream) {
  return not_built();
}

Status top_k_indices(const float*, int64_t, int64_t, const int32_t*, int64_t, int64_t, int32_t*,
                     int32_t*, CudaStream) {
  return not_built();
}

Status sparse_attention(const AttentionInputs&, const BatchRows&, int64_t, int64_t, int64_t,
                        int64_t, float, AttentionMath, float*, CudaStream) {
  return not_built();
}

Status store_window(const float*, int64_t, const BatchRows&, int64_t, float*, int64_t, CudaStream) {
  return not_built();
}

Status route_tokens(float*, const float*, const int32_t*, const int32_t*, int64_t, int64_t, int64_t,
                    int, float, int32_t*, float*, CudaStream) {
  return not_built();
}

Status swiglu(const float*, int64_t, int64_t, float, float*, CudaStream) {
  return not_built();
}

Status gather_token_rows(const float*, const int32_t*, int64_t, int64_t, float*, CudaStream) {
  return not_built();
}

Status moe_combine(const float*, const int32_t*, const float*, const float*, int64_t, int64_t,
                   int64_t, float*, CudaStream) {
  return not_built();
}

Status moe_group(const int32_t*, const float*, int64_t, int64_t, int64_t, const MoeGroups&,
                 CudaStream) {
  return not_built();
}

Status moe_experts_gemv(const float*, const MoeGroups&, int64_t, const void* const*, WeightType,
                        int64_t, int64_t, float*, CudaStream) {
  return not_built();
}

Status argmax_rows(const float*, int64_t, int64_t, int32_t*, CudaStream) {
  return not_built();
}

Status reserve_shared_memory(size_t, size_t) {
  return not_built();
}

Status set_blas_workspace(BlasHandle&, void*, size_t) {
  return not_built();
}

Result<OwnedStream> OwnedStream::create() {
  return not_built();
}

OwnedStream& OwnedStream::operator=(OwnedStream&& other) noexcept {
  std::swap(handle_, other.handle_);
  return *this;
}

OwnedStream::~OwnedStream() = default;

CapturedGraph& CapturedGraph::operator=(CapturedGraph&& other) noexcept {
  std::swap(exec_, other.exec_);
  return *this;
}

CapturedGraph::~CapturedGraph() = default;

Result<CapturedGraph> CapturedGraph::capture(CudaStream, const std::function<Status()>&) {
  return not_built();
}

Status CapturedGraph::launch(CudaStream) const {
  return not_built();
}

Status fill_random(void*, WeightType, int64_t, uint64_t, float, float, CudaStream) {
  return not_built();
}

Status fill_random_ints(int32_t*, int64_t, uint64_t, int32_t, CudaStream) {
  return not_built();
}

Result<double> measure_copy_bandwidth(size_t, int) {
  return not_built();
}

Result<double> measure_bf16_gemm_flops(const BlasHandle&, int64_t, int64_t, int64_t, int) {
  return not_built();
}

Result<DeviceMemory> device_memory() {
  return not_built();
}

Result<double> time_seconds_synchronized(const std::function<Status()>&) {
  return not_built();
}

}  // namespace dserve::kernels::cuda

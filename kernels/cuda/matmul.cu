// Linear layers on cuBLAS: y[n, m] = x[n, k] . w[m, k]^T, fp32 (SGEMM) or bf16 in / fp32 out
// (GemmEx). cuBLAS is column-major: a row-major [r, c] array is the column-major [c, r] array,
// so y^T[m, n] = w[m, k] . x^T[k, n] is one GEMM with op(w) = T (lda = k), op(x) = N (ldb = k)
// and ldc = y_stride, and no copy of anything.

#include <cublas_v2.h>

#include <climits>
#include <string>

#include "common.cuh"

namespace dserve::kernels::cuda {
namespace {

void check_gemm_shape(const void* x, int64_t n, int64_t k, const void* w, int64_t m, const float* y,
                      int64_t y_stride) {
  DSERVE_CHECK(n >= 0 && k >= 0 && m >= 0 && y_stride >= m);
  // cuBLAS takes int dimensions (the _64 entry points exist but nothing here needs them).
  DSERVE_CHECK_MSG(n <= INT_MAX && k <= INT_MAX && m <= INT_MAX && y_stride <= INT_MAX,
                   "matmul dimensions past INT_MAX");
  DSERVE_CHECK(n == 0 || m == 0 || y != nullptr);
  DSERVE_CHECK(n == 0 || m == 0 || k == 0 || (x != nullptr && w != nullptr));
}

// The empty-sum case: BLAS leaves C = beta * C, which with beta = 0 is not guaranteed to
// clear NaNs already in y, so it is zeroed explicitly (cpu::matmul_rows leaves y all zero).
Status zero_output(int64_t n, int64_t m, float* y, int64_t y_stride, CudaStream stream) {
  return cuda_status(cudaMemset2DAsync(y, static_cast<size_t>(y_stride) * sizeof(float), 0,
                                       static_cast<size_t>(m) * sizeof(float),
                                       static_cast<size_t>(n), native(stream)),
                     "cudaMemset2DAsync");
}

}  // namespace

Result<BlasHandle> BlasHandle::create() {
  cublasHandle_t handle = nullptr;
  DSERVE_RETURN_IF_ERROR(cublas_status(cublasCreate(&handle), "cublasCreate"));
  // The default math mode keeps fp32 GEMMs in fp32 (no TF32 down-conversion), so the fp32
  // path matches the CPU reference to rounding.
  const Status mode =
      cublas_status(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
  if (!mode.is_ok()) {
    cublasDestroy(handle);
    return mode;
  }
  return BlasHandle(handle);
}

BlasHandle& BlasHandle::operator=(BlasHandle&& other) noexcept {
  if (this != &other) {
    release();
    handle_ = other.handle_;
    workspace_ = other.workspace_;
    workspace_bytes_ = other.workspace_bytes_;
    other.handle_ = nullptr;
  }
  return *this;
}

Status BlasHandle::bind(CudaStream stream) const {
  DSERVE_CHECK(handle_ != nullptr);
  const auto handle = static_cast<cublasHandle_t>(handle_);
  DSERVE_RETURN_IF_ERROR(
      cublas_status(cublasSetStream(handle, cuda::native(stream)), "cublasSetStream"));
  if (workspace_ == nullptr) return Status::ok();
  return cublas_status(cublasSetWorkspace(handle, workspace_, workspace_bytes_),
                       "cublasSetWorkspace");
}

BlasHandle::~BlasHandle() {
  release();
}

void BlasHandle::release() {
  // Destroying a context can only fail when the device is already lost; nothing to report.
  if (handle_ != nullptr) cublasDestroy(static_cast<cublasHandle_t>(handle_));
  handle_ = nullptr;
}

Status matmul(const BlasHandle& blas, const float* x, int64_t n, int64_t k, const float* w,
              int64_t m, float* y, int64_t y_stride, CudaStream stream) {
  check_gemm_shape(x, n, k, w, m, y, y_stride);
  if (n == 0 || m == 0) return Status::ok();
  if (k == 0) return zero_output(n, m, y, y_stride, stream);
  DSERVE_CHECK(blas.native() != nullptr);
  DSERVE_RETURN_IF_ERROR(blas.bind(stream));
  const float alpha = 1.0f;
  const float beta = 0.0f;
  const int ik = static_cast<int>(k);
  return cublas_status(cublasSgemm(handle_of(blas), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(m),
                                   static_cast<int>(n), ik, &alpha, w, ik, x, ik, &beta, y,
                                   static_cast<int>(y_stride)),
                       "cublasSgemm");
}

Status matmul_bf16(const BlasHandle& blas, const uint16_t* x, int64_t n, int64_t k,
                   const uint16_t* w, int64_t m, float* y, int64_t y_stride, CudaStream stream) {
  check_gemm_shape(x, n, k, w, m, y, y_stride);
  if (n == 0 || m == 0) return Status::ok();
  if (k == 0) return zero_output(n, m, y, y_stride, stream);
  DSERVE_CHECK(blas.native() != nullptr);
  DSERVE_RETURN_IF_ERROR(blas.bind(stream));
  const float alpha = 1.0f;
  const float beta = 0.0f;
  const int ik = static_cast<int>(k);
  // bf16 x bf16 products are exact in fp32 and CUBLAS_COMPUTE_32F accumulates in fp32 (on the
  // tensor cores), so this differs from the fp32 reference on the rounded inputs by the
  // summation order only.
  return cublas_status(
      cublasGemmEx(handle_of(blas), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(m),
                   static_cast<int>(n), ik, &alpha, w, CUDA_R_16BF, ik, x, CUDA_R_16BF, ik, &beta,
                   y, CUDA_R_32F, static_cast<int>(y_stride), CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx(bf16 -> fp32)");
}

}  // namespace dserve::kernels::cuda

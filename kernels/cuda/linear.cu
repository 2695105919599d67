// Linear layers of the forward pass over DeviceMatrix weights (fp32 or bf16), the grouped output
// projection as one strided-batched GEMM, and the fp32 -> bf16 rounding that feeds bf16 GEMMs.

#include <cuda_bf16.h>

#include <climits>

#include "common.cuh"
#include "dserve/kernels/cuda_model_ops.h"

namespace dserve::kernels::cuda {
namespace {

void check_int_range(int64_t a, int64_t b, int64_t c) {
  DSERVE_CHECK_MSG(a <= INT_MAX && b <= INT_MAX && c <= INT_MAX, "GEMM dimensions past INT_MAX");
}

}  // namespace

Status round_to_bf16(const float* x, int64_t count, uint16_t* y, CudaStream stream) {
  DSERVE_CHECK(count >= 0);
  if (count == 0) return Status::ok();
  DSERVE_CHECK(x != nullptr && y != nullptr);
  return for_each_index(
      count,
      [x, y] __device__(int64_t i) { y[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i])); },
      stream, "round_to_bf16 launch");
}

Status linear(const BlasHandle& blas, const float* x, int64_t n, const DeviceMatrix& w, float* y,
              int64_t y_stride, uint16_t* x_scratch, CudaStream stream) {
  if (w.type == WeightType::kFp32) {
    return matmul(blas, x, n, w.cols, static_cast<const float*>(w.data), w.rows, y, y_stride,
                  stream);
  }
  DSERVE_CHECK_MSG(n == 0 || w.cols == 0 || x_scratch != nullptr,
                   "a bf16 linear needs scratch for its rounded input");
  DSERVE_RETURN_IF_ERROR(round_to_bf16(x, n * w.cols, x_scratch, stream));
  return matmul_bf16(blas, x_scratch, n, w.cols, static_cast<const uint16_t*>(w.data), w.rows, y,
                     y_stride, stream);
}

Status linear_grouped(const BlasHandle& blas, const float* x, int64_t n, int64_t groups,
                      const DeviceMatrix& w, float* y, uint16_t* x_scratch, CudaStream stream) {
  DSERVE_CHECK(groups >= 1 && w.rows % groups == 0 && n >= 0);
  const int64_t m = w.rows / groups;
  const int64_t k = w.cols;
  if (n == 0 || m == 0) return Status::ok();
  DSERVE_CHECK(k > 0 && x != nullptr && y != nullptr && w.data != nullptr);
  check_int_range(n, groups * k, groups * m);
  DSERVE_RETURN_IF_ERROR(blas.bind(stream));
  // Column-major view: per group g, y_g^T[m, n] = w_g[m, k] . x_g^T[k, n], where x_g^T starts at
  // column offset g * k of x^T (ldb = groups * k) and y_g^T at g * m (ldc = groups * m).
  const float alpha = 1.0f;
  const float beta = 0.0f;
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ldb = static_cast<int>(groups * k), ldc = static_cast<int>(groups * m);
  const int batch = static_cast<int>(groups);
  if (w.type == WeightType::kFp32) {
    return cublas_status(
        cublasSgemmStridedBatched(handle_of(blas), CUBLAS_OP_T, CUBLAS_OP_N, im, in, ik, &alpha,
                                  static_cast<const float*>(w.data), ik, m * k, x, ldb, k, &beta, y,
                                  ldc, m, batch),
        "cublasSgemmStridedBatched");
  }
  DSERVE_CHECK_MSG(x_scratch != nullptr, "a bf16 linear needs scratch for its rounded input");
  DSERVE_RETURN_IF_ERROR(round_to_bf16(x, n * groups * k, x_scratch, stream));
  return cublas_status(cublasGemmStridedBatchedEx(
                           handle_of(blas), CUBLAS_OP_T, CUBLAS_OP_N, im, in, ik, &alpha, w.data,
                           CUDA_R_16BF, ik, m * k, x_scratch, CUDA_R_16BF, ldb, k, &beta, y,
                           CUDA_R_32F, ldc, m, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                       "cublasGemmStridedBatchedEx(bf16 -> fp32)");
}

}  // namespace dserve::kernels::cuda

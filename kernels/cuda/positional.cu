// Data movement of the forward pass: the embedding into the residual streams, RoPE by
// position from device tables, an out-of-place RMSNorm, the sliding-window ring and reads of
// paged rows through a block table.

#include "common.cuh"
#include "dserve/kernels/cuda_model_ops.h"

namespace dserve::kernels::cuda {

Status rms_norm_to(const float* x, float* y, int64_t n, int64_t d, const float* weight, float eps,
                   CudaStream stream) {
  DSERVE_CHECK(n >= 0 && d >= 0);
  if (n == 0 || d == 0) return Status::ok();
  DSERVE_RETURN_IF_ERROR(
      cuda_status(cudaMemcpyAsync(y, x, static_cast<size_t>(n * d) * sizeof(float),
                                  cudaMemcpyDeviceToDevice, native(stream)),
                  "cudaMemcpyAsync"));
  return rms_norm(y, n, d, weight, eps, stream);
}

Status embed_streams(const void* table, WeightType type, const int32_t* tokens, int64_t n,
                     int64_t hidden, int64_t hc, float* streams, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && hidden >= 0 && hc >= 1);
  const bool bf16 = type == WeightType::kBf16;
  return for_each_index(
      n * hc * hidden,
      [=] __device__(int64_t i) {
        const int64_t t = i / (hc * hidden);
        const int64_t d = i % hidden;
        const int64_t at = static_cast<int64_t>(tokens[t]) * hidden + d;
        streams[i] =
            bf16 ? __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(table)[at])
                                   << 16)
                 : static_cast<const float*>(table)[at];
      },
      stream, "embed_streams launch");
}

Status rope_at(float* x, int64_t rows, int64_t dim, const RopeView& rope, const int32_t* positions,
               int64_t rows_per_position, bool inverse, CudaStream stream) {
  DSERVE_CHECK(rows >= 0 && rows_per_position >= 1 && 2 * rope.half <= dim);
  if (rows == 0 || rope.half == 0) return Status::ok();
  DSERVE_CHECK(positions != nullptr);
  const int64_t half = rope.half;
  const float* cos = rope.cos;
  const float* sin = rope.sin;
  return for_each_index(
      rows * half,
      [=] __device__(int64_t i) {
        const int64_t row = i / half;
        const int64_t pair = i % half;
        const int64_t angle =
            static_cast<int64_t>(positions[row / rows_per_position]) * half + pair;
        const float c = cos[angle];
        const float s = inverse ? -sin[angle] : sin[angle];
        float* p = x + row * dim + (dim - 2 * half) + 2 * pair;
        const float a = p[0];
        const float b = p[1];
        p[0] = a * c - b * s;
        p[1] = b * c + a * s;
      },
      stream, "rope_at launch");
}

Status store_window(const float* batch_kv, int64_t n, const BatchRows& rows, int64_t head_dim,
                    float* windows, int64_t sliding_window, CudaStream stream) {
  DSERVE_CHECK(n >= 0 && sliding_window >= 1 && head_dim >= 1);
  const BatchRows r = rows;
  return for_each_index(
      n * head_dim,
      [=] __device__(int64_t i) {
        const int64_t t = i / head_dim;
        const int64_t c = i % head_dim;
        const int64_t pos = r.position[t];
        // Only the request's last sliding_window rows: earlier ones would share their slots.
        if (pos < static_cast<int64_t>(r.end_pos[t]) - sliding_window) return;
        float* ring = windows + static_cast<int64_t>(r.slot[t]) * sliding_window * head_dim;
        ring[(pos % sliding_window) * head_dim + c] = batch_kv[i];
      },
      stream, "store_window launch");
}

Status gather_rows(const PagedRowsView& rows, int64_t slot, int64_t first, int64_t count,
                   float* out, CudaStream stream) {
  DSERVE_CHECK(slot >= 0 && first >= 0 && count >= 0 && rows.rows_per_page >= 1);
  const PagedRowsView r = rows;
  const int32_t* table = rows.block_tables + slot * rows.table_stride;
  return for_each_index(
      count * r.width,
      [=] __device__(int64_t i) {
        const int64_t e = first + i / r.width;
        const int64_t c = i % r.width;
        const int64_t page = table[e / r.rows_per_page];
        out[i] = r.pool[(page * r.rows_per_page + e % r.rows_per_page) * r.width + c];
      },
      stream, "gather_rows launch");
}

}  // namespace dserve::kernels::cuda

#pragma once
// The CUDA backend's DeepSeek-V4 operations: the pieces of the forward pass that are not plain
// linear algebra (embedding, mHC, compressors, Lightning Indexer, sparse attention with sinks,
// MoE routing and combine, sampling), each the device twin of a step of model/src (the CPU
// reference, MODEL-V4.md). Conventions are those of cuda_ops.h: every pointer is DEVICE memory,
// row-major fp32 unless said otherwise, launchers enqueue on `stream` and return at once, shape
// misuse aborts, and a build without the CUDA backend returns UNAVAILABLE.
//
// A batch is n token rows: the chunks of one or more requests, each request's rows contiguous
// and at consecutive positions (a prefill chunk is one request's n rows; a decode step is one
// row per request). BatchRows says, per row, where its token is and whose it is; a request's
// state lives in its SLOT of per-layer slabs (window ring, compressor buffers, block table).

#include <cstddef>
#include <cstdint>
#include <functional>

#include "dserve/core/status.h"
#include "dserve/kernels/cuda_ops.h"

namespace dserve::kernels::cuda {

// The widest per-token state the kernels keep in registers: hc_mult streams of the mHC mix and
// experts_per_token routed experts (V4: 4 and 6).
namespace v4_limits {
inline constexpr int64_t kMaxHyperStreams = 8;
inline constexpr int64_t kMaxRoutedPerToken = 16;
}  // namespace v4_limits

// Weights as the launchers take them: fp32, or bf16 bit patterns (upper half of an fp32).
enum class WeightType { kFp32, kBf16 };

// A [rows, cols] Linear weight (y = x . w^T) in device memory.
struct DeviceMatrix {
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  WeightType type = WeightType::kFp32;

  size_t bytes() const {
    return static_cast<size_t>(rows * cols) * (type == WeightType::kBf16 ? 2u : 4u);
  }
};

// y[n, w.rows] = x[n, w.cols] . w^T with rows of y `y_stride` apart (SGEMM for fp32 weights;
// for bf16 weights x is first rounded to bf16 into `x_scratch`, which must hold n * w.cols
// values, then GemmEx with fp32 accumulation).
Status linear(const BlasHandle& blas, const float* x, int64_t n, const DeviceMatrix& w, float* y,
              int64_t y_stride, uint16_t* x_scratch, CudaStream stream);

// The grouped output projection: for each of `groups` groups g, y[:, g*m:(g+1)*m] =
// x[:, g*k:(g+1)*k] . w_g^T, where w holds the groups' [m, k] weights one after another
// (w.rows = groups * m, w.cols = k) and x is [n, groups * k]. One strided-batched GEMM.
Status linear_grouped(const BlasHandle& blas, const float* x, int64_t n, int64_t groups,
                      const DeviceMatrix& w, float* y, uint16_t* x_scratch, CudaStream stream);

// y[i] = bf16(x[i]) (round to nearest even), count values.
Status round_to_bf16(const float* x, int64_t count, uint16_t* y, CudaStream stream);

// y[n, d] = x[n, d] copied then RMS-normalised (rms_norm out of place; weight may be null).
Status rms_norm_to(const float* x, float* y, int64_t n, int64_t d, const float* weight, float eps,
                   CudaStream stream);

// streams[t, k, :] = table[tokens[t], :] for k < hc (the residual's hc_mult copies of the
// embedding); table is [vocab, hidden] of `type`.
Status embed_streams(const void* table, WeightType type, const int32_t* tokens, int64_t n,
                     int64_t hidden, int64_t hc, float* streams, CudaStream stream);

// cos/sin of every position below `capacity`: [capacity, half] each (from RopeTable::angles on
// the host, so both backends rotate by the same bits).
struct RopeView {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t half = 0;
  int64_t capacity = 0;
};

// Per-row facts of a batch, device arrays of n int32 each.
struct BatchRows {
  const int32_t* position = nullptr;   // the row's absolute position
  const int32_t* slot = nullptr;       // its request's state slot
  const int32_t* first_pos = nullptr;  // position of the first row of its request in the batch
  const int32_t* first_row = nullptr;  // index of that row
  const int32_t* end_pos = nullptr;    // position after the last row of its request
};

// Interleaved partial RoPE on x[rows, dim]: row r rotates its last 2 * half channels by the
// angles of position positions[r / rows_per_position] (negated when inverse). Positions must
// be below rope.capacity.
Status rope_at(float* x, int64_t rows, int64_t dim, const RopeView& rope, const int32_t* positions,
               int64_t rows_per_position, bool inverse, CudaStream stream);

// --- mHC --------------------------------------------------------------------------------
// From mix logits [n, (2 + hc) * hc] (the fn projection of the normed streams), base
// [(2 + hc) * hc] and scale [3]: pre [n, hc], post [n, hc], comb [n, hc, hc]
// (v4::hyper_mix, one thread per token).
Status hyper_mix(const float* logits, const float* base, const float* scale, int64_t n, int64_t hc,
                 int64_t sinkhorn_iters, float eps, float* pre, float* post, float* comb,
                 CudaStream stream);
// out[t, :] = sum_k pre[t, k] * streams[t, k, :].
Status hyper_collapse(const float* streams, const float* pre, int64_t n, int64_t hc, int64_t hidden,
                      float* out, CudaStream stream);
// streams[t, k, :] <- post[t, k] * out[t, :] + sum_j comb[t, j, k] * streams[t, j, :].
Status hyper_expand(float* streams, const float* out, const float* post, const float* comb,
                    int64_t n, int64_t hc, int64_t hidden, CudaStream stream);
// hc_head: pre[t, k] = sigmoid(logits[t, k] * scale[0] + base[k]) + eps.
Status hyper_head_weights(const float* logits, const float* base, const float* scale, int64_t n,
                          int64_t hc, float eps, float* pre, CudaStream stream);

// --- Paged rows: the compressed entries or indexer keys of every slot --------------------
// Row e of slot s lives at pool + (block_tables[s * table_stride + e / rows_per_page] *
// rows_per_page + e % rows_per_page) * width.
struct PagedRowsView {
  float* pool = nullptr;
  const int32_t* block_tables = nullptr;  // [slots, table_stride]
  int64_t table_stride = 0;
  int64_t rows_per_page = 0;
  int64_t width = 0;
};
// out[i, :] = row (first + i) of slot `slot`, count rows.
Status gather_rows(const PagedRowsView& rows, int64_t slot, int64_t first, int64_t count,
                   float* out, CudaStream stream);

// --- Compressors --------------------------------------------------------------------------
// One window compressor of a layer, for every slot (MODEL-V4.md "The compressors"). Windows
// are `rate` tokens; `series` is 2 for the overlapping (CSA, indexer) compressors, 1 for HCA.
// A request's open-window tokens wait in its pending slab rows at slot position % rate; the
// last closed window's Ca series (and its gate plus position bias) in its overlap rows.
struct CompressorView {
  int64_t rate = 0;
  int64_t width = 0;
  int64_t series = 1;
  float* pending_kv = nullptr;    // [slots, rate, series * width]
  float* pending_gate = nullptr;  // [slots, rate, series * width], no position bias
  float* overlap_kv = nullptr;    // [slots, rate, width] (series 2)
  float* overlap_gate = nullptr;  // [slots, rate, width] (series 2), position bias added
  const float* ape = nullptr;     // [rate, series * width] position bias
  const float* norm = nullptr;    // [width]
};
// A window some request's rows complete in this batch (the host lists them: it knows every
// position). `last` marks the request's last completed window, whose Ca becomes the overlap.
struct ClosedWindow {
  int32_t row = 0;  // any row of the request (its BatchRows entries say the rest)
  int32_t window = 0;
  int32_t last = 0;
};
// Consumes the batch's projections kv, gate [n, series * width]: every listed window (the
// first *window_count of `windows`, at most max_windows: the launch size, fixed so that a
// captured graph replays any batch) becomes one entry (softmax-pooled per channel, RMSNorm,
// RoPE at the window's first position) written as row `window` of its slot's entries (the
// page must be in the block table); then the overlap and pending rows move on.
// How KV rows are rounded where the GPU writes them (kv_dtype fp8; kvstore/row_format.h): to the
// values kvstore's encode then decode gives (kernels/cuda/v4_math.h, bit for bit), so device
// pages in fp32 hold exactly what the host's encoded pages decode to. kFp4Key rows end in the
// rotated basis, as the host's decoded keys do.
enum class KvRounding : int32_t { kNone = 0, kFp8Entry = 1, kFp4Key = 2 };
// Rounds `n` rows of `width` floats in place (the last rope_channels of an fp8 entry to bf16).
Status round_kv_rows(float* rows, int64_t n, int64_t width, int64_t rope_channels,
                     KvRounding rounding, CudaStream stream);

// `rounding` applies to each entry as it is written (after its RoPE).
Status compress_batch(const float* kv, const float* gate, int64_t n, const BatchRows& rows,
                      const ClosedWindow* windows, const int32_t* window_count, int64_t max_windows,
                      const CompressorView& state, const PagedRowsView& entries,
                      const RopeView& rope, float eps, KvRounding rounding, CudaStream stream);

// --- Lightning Indexer ------------------------------------------------------------------
// Every row t sees the visible(t) = (position[t] + 1) / rate first entries of its request.
// scores[t, s] = sum_h relu(dots[t, h, s]) * score_scale * (weights[t, h] * weight_scale) for
// s < visible(t), -inf after; dots is [n, heads, stride] (one request's rows: the caller's GEMM
// against its gathered keys), scores [n, stride].
Status indexer_scores(const float* dots, const float* weights, int64_t n, int64_t heads,
                      int64_t stride, const int32_t* positions, int64_t rate, float score_scale,
                      float weight_scale, float* scores, CudaStream stream);
// The same scores computed straight from the keys through the block tables, for batches of
// many requests (decode): q [n, heads, dim] rotated, weights [n, heads].
Status indexer_scores_paged(const float* q, const float* weights, int64_t n, int64_t heads,
                            int64_t dim, const BatchRows& rows, const PagedRowsView& keys,
                            int64_t stride, int64_t rate, float score_scale, float weight_scale,
                            float* scores, CudaStream stream);
// Shared memory one block of indexer_scores_paged takes (must fit the device).
constexpr size_t indexer_scores_paged_shared_bytes(int64_t heads, int64_t dim) {
  return static_cast<size_t>(heads * (dim + 1) + heads + 4 * dim + 4 * heads) * sizeof(float);
}
// For each row t of scores [n, stride]: the indices of the min(k, visible(t)) best, highest
// score first and the lower index on ties, written in ascending order to selected[t, 0..count)
// with count in counts[t].
Status top_k_indices(const float* scores, int64_t n, int64_t stride, const int32_t* positions,
                     int64_t rate, int64_t k, int32_t* selected, int32_t* counts,
                     CudaStream stream);

// --- Attention ----------------------------------------------------------------------------
// One layer's attention for a batch (MQA: one key/value head shared by all heads, K = V).
struct AttentionInputs {
  const float* q = nullptr;           // [n, heads, head_dim], normed and rotated
  const float* batch_kv = nullptr;    // [n, head_dim], this batch's keys
  float* windows = nullptr;           // [slots, sliding_window, head_dim] rings: p at p % window
  PagedRowsView compressed;           // the layer's compressed entries (width head_dim)
  int64_t rate = 0;                   // 0: sliding only
  const int32_t* selected = nullptr;  // CSA: [n, selected_stride] picks; null: all visible
  const int32_t* selected_counts = nullptr;
  int64_t selected_stride = 0;
  const float* sinks = nullptr;  // [heads]
};
// out[t, h, :] = softmax over (the window keys of positions (pos - sliding_window, pos]: the
// ring for positions before the request's first row in the batch, the batch's keys after;
// then the compressed entries: the picks, or all (pos + 1) / rate visible ones) of
// q . k * scale, with the head's sink in the denominator, times the same keys as values.
// head_dim is a multiple of 4 up to attention_limits::kMaxHeadDim; the block takes
// sparse_attention_shared_bytes(head_dim) of shared memory whatever the number of keys.
struct attention_limits {
  static constexpr int64_t kMaxHeadDim = 512;
  static constexpr int64_t kMaxHeadsPerBlock = 16;  // heads sharing one read of each key
  static constexpr int64_t kTileKeys = 16;          // keys held in shared memory at once
};
// How sparse_attention multiplies: fp32 on CUDA cores, or queries, keys and probabilities
// rounded to bf16 on tensor cores with fp32 sums (head_dim a multiple of 64; blocks of 16
// heads, so meant for batches of many rows).
enum class AttentionMath { kFp32, kBf16TensorCores };
Status sparse_attention(const AttentionInputs& in, const BatchRows& rows, int64_t n, int64_t heads,
                        int64_t head_dim, int64_t sliding_window, float scale, AttentionMath math,
                        float* out, CudaStream stream);
// Shared memory of one block of the tensor-core kernel (under the default 48 KiB).
constexpr size_t sparse_attention_mma_shared_bytes(int64_t head_dim) {
  // Key addresses [16]; queries and keys, bf16 [16, head_dim + 8] each; partial scores, fp32
  // [4, 16, 16]; probabilities, bf16 [16, 24]; running maximum, sum and rescale, fp32 [3, 16].
  return 16 * sizeof(void*) +
         size_t{2} * 16 * static_cast<size_t>(head_dim + 8) * sizeof(uint16_t) +
         size_t{4} * 16 * 16 * sizeof(float) + size_t{16} * 24 * sizeof(uint16_t) +
         size_t{3} * 16 * sizeof(float);
}
// Shared memory one attention block may take, whichever the math.
constexpr size_t sparse_attention_shared_bytes(int64_t head_dim) {
  using L = attention_limits;
  const size_t fp32 = static_cast<size_t>(L::kTileKeys) * sizeof(void*) +
                      static_cast<size_t>((L::kMaxHeadsPerBlock + L::kTileKeys) * head_dim +
                                          L::kMaxHeadsPerBlock * (L::kTileKeys + 3)) *
                          sizeof(float);
  const size_t mma = sparse_attention_mma_shared_bytes(head_dim);
  return fp32 > mma ? fp32 : mma;
}
// Stores each request's last min(rows, sliding_window) keys of the batch into its ring.
Status store_window(const float* batch_kv, int64_t n, const BatchRows& rows, int64_t head_dim,
                    float* windows, int64_t sliding_window, CudaStream stream);

// --- MoE ----------------------------------------------------------------------------------
// Routes each token: logits [n, experts] (overwritten with scores), bias [experts] or null,
// tid2eid [vocab, k] and tokens [n] for a hash layer (else null); writes ids [n, k] and
// weights [n, k] (v4::route_token). scoring is a v4::Scoring value.
Status route_tokens(float* logits, const float* bias, const int32_t* tid2eid, const int32_t* tokens,
                    int64_t n, int64_t experts, int64_t k, int scoring, float routed_scale,
                    int32_t* ids, float* weights, CudaStream stream);
// out[rows, inter] = swiglu(gate_up[:, :inter], gate_up[:, inter:], limit).
Status swiglu(const float* gate_up, int64_t rows, int64_t inter, float limit, float* out,
              CudaStream stream);
// xs[i, :] = x[rows[i], :] for i < count.
Status gather_token_rows(const float* x, const int32_t* rows, int64_t count, int64_t hidden,
                         float* xs, CudaStream stream);
// out[t, :] = shared[t, :] after sum_i weights[t, i] * ys[slots[t, i], :] over i < k, added
// in that order (slots: [n, k]).
Status moe_combine(const float* ys, const int32_t* slots, const float* weights, const float* shared,
                   int64_t n, int64_t k, int64_t hidden, float* out, CudaStream stream);

// Small batches (decode) keep the grouping of rows by expert on the device, so a step needs no
// copy back to the host. The grouping of n tokens x k routed experts:
struct MoeGroups {
  int32_t* offsets = nullptr;        // [experts + 1]: expert e's slots are offsets[e] .. [e+1]
  int32_t* active = nullptr;         // [experts]: experts with rows, ascending
  int32_t* active_count = nullptr;   // [1]
  int32_t* rows = nullptr;           // [n * k]: the token of each slot (slots in token order)
  int32_t* slot_of = nullptr;        // [n * k]: the slot of pair (t, i)
  int32_t* combine_slots = nullptr;  // [n, k]: token t's slots in ascending expert order
  float* combine_weights = nullptr;  // [n, k]: their routing weights
  int32_t* active_total = nullptr;   // [1] or null: active experts are added here (statistics)
};
// Groups the routed pairs ids/weights [n, k] (one block; experts + n * k at most
// kMoeGroupMaxInts).
constexpr int64_t kMoeGroupMaxInts = 12288;  // 48 KiB of ints
Status moe_group(const int32_t* ids, const float* weights, int64_t n, int64_t k, int64_t experts,
                 const MoeGroups& groups, CudaStream stream);
// out[s, :] = x[s, :] . W_e^T for every slot s of every active expert e, W_e = expert_weights[e]
// ([rows, cols] of `type`, a device array of device pointers); at most max_active experts are
// active (min(experts, n * k)). cols is a multiple of 8 and each W_e is 16-byte aligned: every
// weight row is read in 16-byte vectors, once per 8 slots of its expert.
Status moe_experts_gemv(const float* x, const MoeGroups& groups, int64_t max_active,
                        const void* const* expert_weights, WeightType type, int64_t rows,
                        int64_t cols, float* out, CudaStream stream);

// --- Sampling -----------------------------------------------------------------------------
// out[r] = argmax of row r of x[rows, n], the lowest index among equals.
Status argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* out, CudaStream stream);

// --- Launch set-up ----------------------------------------------------------------------
// Grants the attention and paged-indexer kernels up to these bytes of dynamic shared memory
// now, so that no launch has to ask later (not even one being captured into a graph).
Status reserve_shared_memory(size_t attention_bytes, size_t indexer_bytes);
// Gives cuBLAS a workspace of its own (so it allocates nothing while a graph is captured); every
// later launcher keeps it (BlasHandle::bind).
Status set_blas_workspace(BlasHandle& blas, void* workspace, size_t bytes);

// A stream of the caller's, for work that is captured into graphs (the legacy default stream
// cannot be). It is a blocking stream: synchronous copies still order with its work.
class OwnedStream {
 public:
  static Result<OwnedStream> create();
  OwnedStream(OwnedStream&& other) noexcept : handle_(other.handle_) { other.handle_ = nullptr; }
  OwnedStream& operator=(OwnedStream&& other) noexcept;
  OwnedStream(const OwnedStream&) = delete;
  OwnedStream& operator=(const OwnedStream&) = delete;
  ~OwnedStream();
  CudaStream get() const { return CudaStream{handle_}; }

 private:
  explicit OwnedStream(void* handle) : handle_(handle) {}
  void* handle_ = nullptr;
};

// An instantiated CUDA graph (cudaGraphExec_t).
class CapturedGraph {
 public:
  CapturedGraph() = default;
  CapturedGraph(CapturedGraph&& other) noexcept : exec_(other.exec_) { other.exec_ = nullptr; }
  CapturedGraph& operator=(CapturedGraph&& other) noexcept;
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;
  ~CapturedGraph();

  // Captures what work() enqueues on `stream` (thread-local capture mode) and instantiates it.
  // work()'s own error, or the capture's, comes back; the stream is left out of capture.
  static Result<CapturedGraph> capture(CudaStream stream, const std::function<Status()>& work);
  Status launch(CudaStream stream) const;

 private:
  explicit CapturedGraph(void* exec) : exec_(exec) {}
  void* exec_ = nullptr;
};

// --- Benchmarks ---------------------------------------------------------------------------
// Seeded values in device memory: data[i] = offset + scale * u(seed, i), u uniform in [-1, 1)
// and a function of (seed, i) only; `type` is the element type of data.
Status fill_random(void* data, WeightType type, int64_t count, uint64_t seed, float scale,
                   float offset, CudaStream stream);
// data[i] uniform in [0, bound).
Status fill_random_ints(int32_t* data, int64_t count, uint64_t seed, int32_t bound,
                        CudaStream stream);
// Device-to-device copy bandwidth (bytes read + written per second) over `repeats` copies of
// `bytes`, timed with events.
Result<double> measure_copy_bandwidth(size_t bytes, int repeats);
// cuBLAS bf16 GEMM rate (flop/s) of y[n, m] = x[n, k] . w[m, k]^T over `repeats` runs.
Result<double> measure_bf16_gemm_flops(const BlasHandle& blas, int64_t m, int64_t n, int64_t k,
                                       int repeats);
struct DeviceMemory {
  size_t free_bytes = 0;
  size_t total_bytes = 0;
};
Result<DeviceMemory> device_memory();
// Wall time of work() between two device-wide synchronisations.
Result<double> time_seconds_synchronized(const std::function<Status()>& work);

}  // namespace dserve::kernels::cuda

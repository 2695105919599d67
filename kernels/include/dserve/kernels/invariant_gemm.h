#pragma once
// The CPU backend's batch-invariant matrix product: y[n, m] = x[n, k] . w[m, k]^T (a Linear
// layer, weight [out, in]) whose every output element has the same bits whatever n is, whatever
// row of x it comes from, and however many threads run. A serving engine puts rows of many
// requests into one step; with this product a request's logits do not depend on what else was
// in its step, and each weight is still read once per step for all rows (a per-row GEMV, the
// earlier way to that property, reads it once per row).
//
// The rule (kernels/README.md, "Batch invariance"), for every output element y[i][j]:
//   - k is cut into blocks of kInvariantKBlock (the last may be shorter), at fixed offsets;
//   - within a block, lane l of L (L = 16 with AVX-512, 8 otherwise) accumulates x[i][k] * w[j][k]
//     for k = l, l + L, ... of the block, in increasing k, with a fused multiply-add, from 0;
//     k past the block's end contributes nothing (the lane is not touched);
//   - the L lanes are summed in a fixed tree (lane l + L/2 onto lane l, halving down to 1);
//   - the blocks' sums are added to y in block order, the first one stored.
// None of it depends on n, i, j's neighbours, the tiling or the threads. Which L applies is the
// machine's (cpu_isa()): results are bit-identical within a machine, not across instruction sets.
//
// Thread-compatible; runs on the cores through the backend's row pool (kernels/src/row_pool.h).

#include <cstdint>
#include <string_view>

namespace dserve::kernels::cpu {

// The instruction set the CPU kernels use, chosen once from CPUID at first use.
enum class CpuIsa {
  kPortable,  // plain C++ with 8 lanes, separate multiply and add (no FMA)
  kAvx2,      // AVX2 + FMA, 8 lanes
  kAvx512,    // AVX-512F, 16 lanes
};
CpuIsa cpu_isa();
std::string_view cpu_isa_name(CpuIsa isa);

// K-block length of the rule above: one block's x and w rows stay in L1/L2 while a tile of
// outputs is computed.
inline constexpr int64_t kInvariantKBlock = 512;

// y[i * ldy + j] = sum_k x[i * k + kk] * w[j * k + kk], for i < n, j < m, by the rule above.
void invariant_matmul(const float* x, int64_t n, int64_t k, const float* w, int64_t m, float* y,
                      int64_t ldy);

// The same with x's rows `ldx` apart (a column block of a wider x), same bits.
void invariant_matmul_strided(const float* x, int64_t ldx, int64_t n, int64_t k, const float* w,
                              int64_t m, float* y, int64_t ldy);

// The same product with the instruction set given (tests compare the ones the machine has;
// a set the machine lacks is a programmer error and aborts), x's rows ldx apart and w's ldw
// apart (0: k).
void invariant_matmul_with(CpuIsa isa, const float* x, int64_t n, int64_t k, const float* w,
                           int64_t m, float* y, int64_t ldy, int64_t ldx = 0, int64_t ldw = 0);

// y[i * ldy + j] = beta * y[i * ldy + j] + sum over kk of a[i * lda + kk] * b[kk * ldb + j]
// (rows of b weighted by a row of a: attention's weighted sum of values): each element
// accumulates from 0 in increasing kk with a fused multiply-add, then takes beta * y (beta 0:
// y is not read). Every element's bits are the same for any n, any split over threads, and
// every instruction set (the same fused operations in the same order).
void weighted_row_sum(const float* a, int64_t lda, int64_t n, int64_t k, const float* b,
                      int64_t ldb, int64_t m, float beta, float* y, int64_t ldy);

}  // namespace dserve::kernels::cpu

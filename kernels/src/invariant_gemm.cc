// The batch-invariant product (invariant_gemm.h). Every output element is computed whole by
// one register tile: R rows of x against C rows of w, one accumulator of L lanes per element,
// over one K block; tiles of any shape (the edges use smaller R and C) run the same per-element
// operations, so a row's results do not depend on the tile it fell in, hence not on n.
//
// The loops over a tile's rows and columns are unrolled (#pragma GCC unroll): at -O2 GCC would
// keep the accumulators in memory otherwise.
//
// Blocking: the columns (rows of w) are split across the cores; each part walks the K blocks,
// then panels of kRowPanel rows of x (a panel's K block stays in L2), then C rows of w at a time
// (their K block stays in L1) against every R rows of the panel.

#include "dserve/kernels/invariant_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <string>

#include "dserve/core/check.h"
#include "row_pool.h"

namespace dserve::kernels::cpu {
namespace {

constexpr int64_t kRowPanel = 64;

// What one tile writes: the K block's sum of element (r, c) (sums[r * C + c]), added to y or
// stored in it.
template <int R, int C>
inline void write_tile(const float* sums, float* y, int64_t ldy, bool first) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      float& out = y[r * ldy + c];
      out = first ? sums[r * C + c] : out + sums[r * C + c];
    }
  }
}

// ---- portable: 8 lanes, multiply then add ----------------------------------------------------

template <int R, int C>
void tile_portable(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t kc, float* y,
                   int64_t ldy, bool first) {
  float acc[R][C][8] = {};
  for (int64_t kk = 0; kk < kc; kk += 8) {
    const int lanes = static_cast<int>(std::min<int64_t>(8, kc - kk));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        for (int l = 0; l < lanes; ++l) {
          const float p = x[r * ldx + kk + l] * w[c * ldw + kk + l];
          acc[r][c][l] = acc[r][c][l] + p;
        }
      }
    }
  }
  float sums[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const float* a = acc[r][c];
      const float s4[4] = {a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]};
      const float s2[2] = {s4[0] + s4[2], s4[1] + s4[3]};
      sums[r][c] = s2[0] + s2[1];
    }
  }
  write_tile<R, C>(&sums[0][0], y, ldy, first);
}

// ---- AVX2 + FMA: 8 lanes ---------------------------------------------------------------------

__attribute__((target("avx2,fma"))) inline float reduce8(__m256 a) {
  // lane l + lane l + 4, then l + 2, then l + 1
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
  return _mm_cvtss_f32(s1);
}

__attribute__((target("avx2,fma"))) inline __m256i tail_mask8(int64_t lanes) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes)), index);
}

template <int R, int C>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* x, int64_t ldx, const float* w,
                                                   int64_t ldw, int64_t kc, float* y, int64_t ldy,
                                                   bool first) {
  __m256 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c)
      acc[r][c] = _mm256_setzero_ps();
  }
  int64_t kk = 0;
  for (; kk + 8 <= kc; kk += 8) {
    __m256 xv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      xv[r] = _mm256_loadu_ps(x + r * ldx + kk);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const __m256 wv = _mm256_loadu_ps(w + c * ldw + kk);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
    }
  }
  if (kk < kc) {  // the lanes past the block's end keep their value
    const __m256i mask = tail_mask8(kc - kk);
    const __m256 keep = _mm256_castsi256_ps(mask);
    __m256 xv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      xv[r] = _mm256_maskload_ps(x + r * ldx + kk, mask);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const __m256 wv = _mm256_maskload_ps(w + c * ldw + kk, mask);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm256_blendv_ps(acc[r][c], _mm256_fmadd_ps(xv[r], wv, acc[r][c]), keep);
    }
  }
  float sums[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c)
      sums[r][c] = reduce8(acc[r][c]);
  }
  write_tile<R, C>(&sums[0][0], y, ldy, first);
}

// ---- AVX-512: 16 lanes -----------------------------------------------------------------------

// GCC 12's unmasked 512-bit shuffles pass an undefined operand that its own -Wuninitialized
// flags; the zero-masked forms with every lane kept are the same instruction.
template <int kImm>
__attribute__((target("avx512f"))) inline __m512 shuffle_quarters(__m512 a, __m512 b) {
  return _mm512_maskz_shuffle_f32x4(0xFFFF, a, b, kImm);
}

// The sums of 16 accumulators at once: out[e] = a[e]'s lanes added pairwise, lane l + lane
// l + 8, then l + 4, l + 2, l + 1 (the rule's tree, as reduce8 after the first level). The pairs
// are added across vectors, 45 instructions for 16 sums instead of ~10 for each.
__attribute__((target("avx512f"))) inline void reduce16x16(const __m512 (&a)[16], float* out) {
  __m512 v[8];  // v[i]: lanes 0-7 a[2i]'s l + l + 8, lanes 8-15 a[2i + 1]'s
#pragma GCC unroll 8
  for (int64_t i = 0; i < 8; ++i) {
    v[i] = _mm512_add_ps(shuffle_quarters<0x44>(a[2 * i], a[2 * i + 1]),
                         shuffle_quarters<0xEE>(a[2 * i], a[2 * i + 1]));
  }
  __m512 w[4];  // w[i]: 128-bit quarter q holds a[4i + q]'s four partial sums
#pragma GCC unroll 4
  for (int64_t i = 0; i < 4; ++i) {
    w[i] = _mm512_add_ps(shuffle_quarters<0x88>(v[2 * i], v[2 * i + 1]),
                         shuffle_quarters<0xDD>(v[2 * i], v[2 * i + 1]));
  }
  __m512 u[2];  // u[i], quarter q: a[8i + q]'s two partial sums, then a[8i + 4 + q]'s
#pragma GCC unroll 2
  for (int64_t i = 0; i < 2; ++i) {
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
  }
  // lane 4q + j: the sum of a[4j + q]; the permutation puts a[e]'s in lane e
  const __m512 s =
      _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(out, _mm512_maskz_permutexvar_ps(0xFFFF, order, s));
}

template <int R, int C>
__attribute__((target("avx512f"))) void tile_avx512(const float* x, int64_t ldx, const float* w,
                                                    int64_t ldw, int64_t kc, float* y, int64_t ldy,
                                                    bool first) {
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c)
      acc[r][c] = _mm512_setzero_ps();
  }
  int64_t kk = 0;
  for (; kk + 16 <= kc; kk += 16) {
    __m512 xv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      xv[r] = _mm512_loadu_ps(x + r * ldx + kk);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const __m512 wv = _mm512_loadu_ps(w + c * ldw + kk);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm512_fmadd_ps(xv[r], wv, acc[r][c]);
    }
  }
  if (kk < kc) {  // the lanes past the block's end keep their value
    const auto mask = static_cast<__mmask16>((1u << (kc - kk)) - 1u);
    __m512 xv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      xv[r] = _mm512_maskz_loadu_ps(mask, x + r * ldx + kk);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const __m512 wv = _mm512_maskz_loadu_ps(mask, w + c * ldw + kk);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        acc[r][c] = _mm512_mask3_fmadd_ps(xv[r], wv, acc[r][c], mask);
    }
  }
  // 16 elements at a time (the last group padded with zeros, whose sums are not written)
  constexpr int kElements = R * C;
  alignas(64) float sums[(kElements + 15) / 16 * 16];
#pragma GCC unroll 2
  for (int g = 0; g < kElements; g += 16) {
    __m512 group[16];
#pragma GCC unroll 16
    for (int e = 0; e < 16; ++e) {
      group[e] = g + e < kElements ? acc[(g + e) / C][(g + e) % C] : _mm512_setzero_ps();
    }
    reduce16x16(group, sums + g);
  }
  write_tile<R, C>(sums, y, ldy, first);
}

// ---- tiles of every shape up to the ISA's largest ---------------------------------------------

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t,
                        bool);

struct Tiles {
  int rows = 1, cols = 1;  // the largest tile
  TileFn fn[4][6] = {};    // fn[r - 1][c - 1]
};

template <template <int, int> class Tile, int R, int... Cs>
void fill_row(Tiles& t, std::integer_sequence<int, Cs...>) {
  ((t.fn[R - 1][Cs] = &Tile<R, Cs + 1>::run), ...);
}

template <int R, int C>
struct Portable {
  static void run(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t kc, float* y,
                  int64_t ldy, bool first) {
    tile_portable<R, C>(x, ldx, w, ldw, kc, y, ldy, first);
  }
};
template <int R, int C>
struct Avx2 {
  static void run(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t kc, float* y,
                  int64_t ldy, bool first) {
    tile_avx2<R, C>(x, ldx, w, ldw, kc, y, ldy, first);
  }
};
template <int R, int C>
struct Avx512 {
  static void run(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t kc, float* y,
                  int64_t ldy, bool first) {
    tile_avx512<R, C>(x, ldx, w, ldw, kc, y, ldy, first);
  }
};

template <template <int, int> class Tile, int Rows, int Cols>
Tiles make_tiles() {
  Tiles t;
  t.rows = Rows;
  t.cols = Cols;
  [&]<int... Rs>(std::integer_sequence<int, Rs...>) {
    (fill_row<Tile, Rs + 1>(t, std::make_integer_sequence<int, Cols>{}), ...);
  }
  (std::make_integer_sequence<int, Rows>{});
  return t;
}

const Tiles& tiles_for(CpuIsa isa) {
  static const Tiles portable = make_tiles<Portable, 2, 4>();
  static const Tiles avx2 = make_tiles<Avx2, 3, 4>();
  static const Tiles avx512 = make_tiles<Avx512, 4, 6>();
  switch (isa) {
    case CpuIsa::kAvx512:
      return avx512;
    case CpuIsa::kAvx2:
      return avx2;
    case CpuIsa::kPortable:
      break;
  }
  return portable;
}

bool has_isa(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return __builtin_cpu_supports("avx512f");
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuIsa::kPortable:
      return true;
  }
  return false;
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    for (CpuIsa candidate : {CpuIsa::kAvx512, CpuIsa::kAvx2}) {
      if (has_isa(candidate)) return candidate;
    }
    return CpuIsa::kPortable;
  }();
  return isa;
}

std::string_view cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kPortable:
      break;
  }
  return "portable";
}

void invariant_matmul(const float* x, int64_t n, int64_t k, const float* w, int64_t m, float* y,
                      int64_t ldy) {
  invariant_matmul_with(cpu_isa(), x, n, k, w, m, y, ldy);
}

void invariant_matmul_strided(const float* x, int64_t ldx, int64_t n, int64_t k, const float* w,
                              int64_t m, float* y, int64_t ldy) {
  invariant_matmul_with(cpu_isa(), x, n, k, w, m, y, ldy, ldx);
}

void invariant_matmul_with(CpuIsa isa, const float* x, int64_t n, int64_t k, const float* w,
                           int64_t m, float* y, int64_t ldy, int64_t ldx, int64_t ldw) {
  if (ldx == 0) ldx = k;
  if (ldw == 0) ldw = k;
  DSERVE_CHECK_MSG(has_isa(isa),
                   "invariant_matmul: this CPU has no " + std::string(cpu_isa_name(isa)));
  DSERVE_CHECK_MSG(n >= 0 && m >= 0 && k >= 0 && ldy >= m && ldx >= k && ldw >= k,
                   "invariant_matmul: bad shape");
  if (n == 0 || m == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < n; ++i)
      std::fill(y + i * ldy, y + i * ldy + m, 0.0f);
    return;
  }
  const Tiles& t = tiles_for(isa);
  // Columns are split across the cores in whole tiles; each element is one thread's alone.
  const int64_t col_tiles = (m + t.cols - 1) / t.cols;
  const int64_t min_tiles =
      std::max<int64_t>(1, detail::kMinMacsPerPart / std::max<int64_t>(1, n * k * t.cols));
  detail::for_each_row_part(col_tiles, min_tiles, [&](int64_t tile_begin, int64_t tile_end) {
    const int64_t j_begin = tile_begin * t.cols;
    const int64_t j_end = std::min(m, tile_end * t.cols);
    for (int64_t kb = 0; kb < k; kb += kInvariantKBlock) {
      const int64_t kc = std::min(kInvariantKBlock, k - kb);
      const bool first = kb == 0;
      for (int64_t ib = 0; ib < n; ib += kRowPanel) {
        const int64_t i_end = std::min(n, ib + kRowPanel);
        for (int64_t j = j_begin; j < j_end; j += t.cols) {
          const int cols = static_cast<int>(std::min<int64_t>(t.cols, j_end - j));
          for (int64_t i = ib; i < i_end; i += t.rows) {
            const int rows = static_cast<int>(std::min<int64_t>(t.rows, i_end - i));
            t.fn[rows - 1][cols - 1](x + i * ldx + kb, ldx, w + j * ldw + kb, ldw, kc,
                                     y + i * ldy + j, ldy, first);
          }
        }
      }
    }
  });
}

}  // namespace dserve::kernels::cpu
